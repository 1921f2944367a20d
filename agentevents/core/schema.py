"""Typed payloads: a registry of pydantic models per ``(type, version)``, and upcasters.

Stored history is never edited. When a payload's schema changes, register the new model
as the next version and an upcaster that turns a version-``n`` payload into ``n + 1``;
old events are read through the chain::

    @schemas.payload("task.completed", version=1)
    class TaskCompletedV1(BaseModel):
        task_id: str

    @schemas.payload("task.completed", version=2)
    class TaskCompleted(BaseModel):
        task_id: str
        duration_s: float

    @schemas.upcaster("task.completed", from_version=1)
    def _v1_to_v2(payload: dict) -> dict:
        return {**payload, "duration_s": 0.0}

    schemas.parse(old_v1_event, TaskCompleted)   # -> TaskCompleted(duration_s=0.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from agentevents.core.errors import EventValidationError, UnknownEventTypeError
from agentevents.core.event import Event

__all__ = ["SchemaRegistry", "Upcaster", "schemas"]

M = TypeVar("M", bound=BaseModel)
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class SchemaRegistry:
    """Maps event types and versions to payload models, and chains upcasters."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, int], type[BaseModel]] = {}
        self._types: dict[type[BaseModel], tuple[str, int]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def register(self, event_type: str, model: type[BaseModel], version: int = 1) -> None:
        """Declare ``model`` as the payload of ``event_type`` at ``version``."""
        Event(type=event_type, version=version)  # validates the name and version
        existing = self._models.get((event_type, version))
        if existing is not None and existing is not model:
            raise EventValidationError(
                f"{event_type} v{version} already has payload model {existing.__qualname__}; "
                "register a new version instead of replacing a model"
            )
        self._models[(event_type, version)] = model
        self._types[model] = (event_type, version)

    def payload(self, event_type: str, version: int = 1) -> Callable[[type[M]], type[M]]:
        """Class decorator form of :meth:`register`."""

        def decorate(model: type[M]) -> type[M]:
            self.register(event_type, model, version)
            return model

        return decorate

    def upcaster(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register a function turning a ``from_version`` payload into ``from_version + 1``."""

        def decorate(function: Upcaster) -> Upcaster:
            self._upcasters[(event_type, from_version)] = function
            return function

        return decorate

    def type_of(self, model: type[BaseModel]) -> tuple[str, int]:
        """The ``(type, version)`` a model was registered for."""
        try:
            return self._types[model]
        except KeyError:
            raise UnknownEventTypeError(
                f"{model.__qualname__} is not registered; decorate it with "
                "@schemas.payload('some.type', version=N)"
            ) from None

    def latest_version(self, event_type: str) -> int | None:
        """The highest registered version of ``event_type``, or ``None``."""
        versions = [v for (t, v) in self._models if t == event_type]
        return max(versions) if versions else None

    def event(self, payload: BaseModel, **fields: Any) -> Event:
        """An event whose type and version come from ``payload``'s registered model."""
        event_type, version = self.type_of(type(payload))
        return Event.model_validate(
            {**fields, "type": event_type, "version": version,
             "payload": payload.model_dump(mode="json")}
        )

    def upcast(self, event: Event, to_version: int | None = None) -> Event:
        """``event`` with its payload upcast to ``to_version`` (default: latest registered)."""
        target = to_version or self.latest_version(event.type) or event.version
        if event.version > target:
            raise EventValidationError(
                f"{event.type} v{event.version} is newer than v{target}, which this code "
                "knows; deploy the newer payload model before consuming these events"
            )
        payload, version = event.payload, event.version
        while version < target:
            step = self._upcasters.get((event.type, version))
            if step is None:
                raise UnknownEventTypeError(
                    f"no upcaster from {event.type} v{version} to v{version + 1}; register "
                    f"one with @schemas.upcaster({event.type!r}, from_version={version})"
                )
            payload = step(dict(payload))
            version += 1
        if version == event.version:
            return event
        return event.with_changes(version=version, payload=payload)

    def parse(self, event: Event, model: type[M]) -> M:
        """``event``'s payload as ``model``, upcast to the version ``model`` is registered at.

        A model that was never registered is validated against the payload as it is.
        """
        registered = self._types.get(model)
        if registered is not None:
            event_type, version = registered
            if event_type != event.type:
                raise EventValidationError(
                    f"{model.__qualname__} is the payload of {event_type}, not {event.type}"
                )
            event = self.upcast(event, version)
        try:
            return model.model_validate(event.payload)
        except ValidationError as exc:
            raise EventValidationError(
                f"payload of {event.type} v{event.version} ({event.id}) does not validate as "
                f"{model.__qualname__}: {exc.error_count()} error(s): "
                + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                            for e in exc.errors(include_url=False))
            ) from exc


#: The default, process-wide registry.
schemas = SchemaRegistry()
