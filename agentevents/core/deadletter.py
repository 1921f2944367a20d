"""Dead letters: events (or bytes) a group gave up on, with the reason."""

from __future__ import annotations

import base64
from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from agentevents.core.event import new_event_id, utcnow

__all__ = ["DeadLetter"]


class DeadLetter(BaseModel):
    """One message that a group could not handle, as stored by every backend.

    ``body`` is the original wire message as text (UTF-8, or base64 when
    ``body_base64`` is true), so undecodable bytes survive unchanged for inspection
    and replay.
    """

    model_config = ConfigDict(frozen=True)

    id: UUID = Field(default_factory=new_event_id)
    time: datetime = Field(default_factory=utcnow)
    group: str | None
    pattern: str
    topic: str
    event_id: str | None = None
    event_type: str | None = None
    error: str
    error_type: str
    attempts: int
    body: str
    body_base64: bool = False

    @staticmethod
    def encode_body(body: bytes) -> tuple[str, bool]:
        """Text form of ``body`` and whether it needed base64."""
        try:
            return body.decode("utf-8"), False
        except UnicodeDecodeError:
            return base64.b64encode(body).decode("ascii"), True

    def original_bytes(self) -> bytes:
        """The original wire message, byte for byte."""
        return base64.b64decode(self.body) if self.body_base64 else self.body.encode("utf-8")
