"""URL helpers shared by every backend: parsing the scheme, hiding secrets."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["redact_url", "url_scheme"]

_SECRET_QUERY = re.compile(
    r"(?P<name>(?:[a-z0-9_]*(?:password|passwd|pwd|pass|secret|token|key|auth|sig|signature|"
    r"nkey|jwt|credential)[a-z0-9_]*)=)[^&#]*",
    re.IGNORECASE,
)


def redact_url(url: str) -> str:
    """``url`` with any password or secret query value replaced by ``***``.

    ``redis://user:pw@host/0`` becomes ``redis://user:***@host/0``; a token alone in the
    userinfo (``nats://tok@host``) becomes ``***``; query values whose name mentions a
    password, secret, token, key, auth or signature are hidden too. The userinfo ends at the
    *last* ``@`` before the path, so passwords containing ``@`` or ``/`` are hidden whole.
    Use it for every repr, log and error.
    """
    scheme, sep, rest = url.partition("://")
    if sep:
        end = len(rest)
        for stop in ("?", "#"):
            index = rest.find(stop)
            if index != -1:
                end = min(end, index)
        at = -1 if rest.startswith("/") else rest.rfind("@", 0, end)  # "///path": no host
        if at != -1:
            userinfo = rest[:at]
            shown = f"{userinfo.split(':', 1)[0]}:***" if ":" in userinfo else "***"
            rest = f"{shown}{rest[at:]}"
        url = f"{scheme}{sep}{rest}"
    return _SECRET_QUERY.sub(r"\g<name>***", url)


def url_scheme(url: str) -> str:
    """The scheme of ``url``, lower-cased (``postgresql+asyncpg`` stays whole)."""
    return urlsplit(url).scheme.lower()
