"""NATS-style subscription patterns over dotted event types.

``*`` matches exactly one token, ``>`` (last token only) matches one or more trailing
tokens; any other token matches itself. ``code.>`` matches ``code.build.failed`` but not
``code``; ``*.failed`` matches ``task.failed`` but not ``code.build.failed``.
"""

from __future__ import annotations

import re
from functools import lru_cache

from agentevents.core.errors import SubscribeError

__all__ = ["Pattern", "compile_pattern"]

_TOKEN = re.compile(r"^[a-z0-9_]+$")


class Pattern:
    """A validated, compiled subscription pattern."""

    __slots__ = ("_exact", "_known", "_regex", "text", "tokens")

    def __init__(self, text: str) -> None:
        tokens = text.split(".")
        for index, token in enumerate(tokens):
            if token == ">" and index != len(tokens) - 1:
                raise SubscribeError(f"pattern {text!r}: '>' is only allowed as the last token")
            if token not in ("*", ">") and not _TOKEN.match(token):
                raise SubscribeError(
                    f"pattern {text!r}: token {token!r} must be lower-case letters, digits "
                    "and '_', or the wildcards '*' (one token) and '>' (the rest)"
                )
        self.text = text
        self.tokens = tuple(tokens)
        self._exact = "*" not in tokens and ">" not in tokens
        self._regex = re.compile(self.to_regex())
        self._known: dict[str, bool] = {}  # event types seen so far -> match result

    @property
    def is_literal(self) -> bool:
        """True when the pattern has no wildcard and so names one event type."""
        return self._exact

    def matches(self, event_type: str) -> bool:
        """Whether ``event_type`` is selected by this pattern."""
        if self._exact:
            return event_type == self.text
        known = self._known.get(event_type)
        if known is None:
            known = self._regex.match(event_type) is not None
            if len(self._known) >= 4096:  # bounded: event types are few, but be safe
                self._known.clear()
            self._known[event_type] = known
        return known

    def to_regex(self) -> str:
        """An anchored regular expression equivalent to the pattern (e.g. for Kafka topics)."""
        parts = []
        for token in self.tokens:
            if token == "*":
                parts.append(r"[a-z0-9_]+")
            elif token == ">":
                parts.append(r"[a-z0-9_]+(?:\.[a-z0-9_]+)*")
            else:
                parts.append(re.escape(token))
        return "^" + r"\.".join(parts) + "$"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"


@lru_cache(maxsize=1024)
def compile_pattern(text: str) -> Pattern:
    """Parse and cache ``text``; raises :class:`SubscribeError` when it is malformed."""
    return Pattern(text)
