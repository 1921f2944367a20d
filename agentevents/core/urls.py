"""URL helpers shared by every backend: parsing the scheme, hiding secrets."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["redact_url", "url_scheme"]

_USERINFO = re.compile(r"^(?P<scheme>[^:/?#]+://)(?P<userinfo>[^@/?#]*)@")
_SECRET_QUERY = re.compile(
    r"(?P<name>(?:password|passwd|pwd|secret|token|access_key|secret_key|aws_secret_access_key|"
    r"aws_session_token|session_token|api_key|apikey|nkey|jwt)=)[^&#]*",
    re.IGNORECASE,
)


def redact_url(url: str) -> str:
    """``url`` with any password or secret query value replaced by ``***``.

    ``redis://user:pw@host/0`` becomes ``redis://user:***@host/0``; a token alone in the
    userinfo (``nats://tok@host``) becomes ``***``. Use it for every repr, log and error.
    """
    match = _USERINFO.match(url)
    if match:
        userinfo = match.group("userinfo")
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            shown = f"{user}:***"
        else:
            shown = "***"
        url = f"{match.group('scheme')}{shown}@{url[match.end():]}"
    return _SECRET_QUERY.sub(r"\g<name>***", url)


def url_scheme(url: str) -> str:
    """The scheme of ``url``, lower-cased (``postgresql+asyncpg`` stays whole)."""
    return urlsplit(url).scheme.lower()
