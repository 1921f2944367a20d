"""Event-driven agents: handlers declared with :func:`handles`, events sent with ``emit``.

An agent is a class whose methods react to events::

    class DeploymentAgent(EventDrivenAgent):
        capabilities = ("deployment", "rollback")

        @handles("code.review.completed")
        async def consider(self, review: ReviewCompleted, event: Event) -> None:
            if review.recommendation == "APPROVE":
                await self.emit("code.deployment.started", {"pr_id": review.pr_id})

    async with DeploymentAgent(bus):      # subscribes, emits agent.started
        ...                               # stops (draining), emits agent.stopped

**Handlers.** ``@handles(pattern, ...)`` marks an ``async`` method; a method may carry several
patterns and several ``@handles``, a class several handlers. They are collected once, when
the class is created (subclasses inherit them; an undecorated override keeps the inherited
subscriptions and runs the override). How the method is called depends on the annotation of
its first parameter after ``self``, resolved with :func:`typing.get_type_hints` (so
``from __future__ import annotations`` works; a payload model must be imported at run time
in the method's module, not under ``TYPE_CHECKING`` and not local to a function):

* a pydantic model other than :class:`Event` -> the payload, parsed with
  :meth:`SchemaRegistry.parse` (upcast to the model's registered version); an optional
  second positional parameter then receives the :class:`Event`;
* :class:`Event`, ``Any`` or no annotation -> the event, and no second parameter.

Anything else is a :class:`ConfigurationError` when the agent starts. A payload that does
not validate is dead-lettered at once (:class:`RejectEvent`): retrying cannot fix it.

**Groups.** Each ``(handler, pattern)`` is one bus subscription in the durable group
``"<agent_id>.<method name>"`` unless ``group=`` says otherwise (``None``: ephemeral). So
replicas of one agent (same ``agent_id``) share the work, and different agents, or different
handlers of one agent, each receive every event. An event matching two patterns of the same
handler is delivered to it once per pattern: keep a handler's patterns disjoint.

**Emitting.** :meth:`EventDrivenAgent.emit` publishes with ``source=agent_id``. Inside a
handler the event being handled is the cause: the new event gets its ``correlation_id``
(or its id, if it had none) and ``causation_id=<its id>``, so a workflow is traceable end
to end. An event emitted with no cause starts a workflow: its ``correlation_id`` is its own
id, so a query by correlation id finds the root too. ``emit`` only publishes; to keep an
audit trail, run an :class:`AuditAgent`, which appends what it receives to an
:class:`EventStore` (no dual write: the bus is the single source the store follows).

**Lifecycle.** ``start()`` subscribes every handler, then emits ``agent.started``
(:class:`AgentStarted`). ``stop()`` stops the subscriptions, letting running handlers finish,
then emits ``agent.stopped``. ``agent.failed`` (:class:`AgentFailed`) is emitted when
``start()`` fails (``phase="start"``; ``start`` then re-raises) and when a handler raises on
its last attempt (``phase="handler"``), i.e. just before the bus dead-letters the event; it
is caused by that event, so it joins the workflow. A handler failing on an ``agent.failed``
event does not emit another one (no failure loops). Earlier, retried attempts emit nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import typing
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Self, TypeVar

from pydantic import BaseModel

from agentevents.core.bus import current_delivery
from agentevents.core.errors import (
    BusClosedError,
    ConfigurationError,
    DuplicateEventError,
    EventValidationError,
    RejectEvent,
    UnknownEventTypeError,
)
from agentevents.core.event import Event, new_event_id
from agentevents.core.patterns import compile_pattern
from agentevents.core.schema import SchemaRegistry, schemas

if TYPE_CHECKING:
    from agentevents.core.bus import Bus, Handler, Subscription
    from agentevents.core.store import EventStore
    from agentevents.core.transport import StartPosition

__all__ = [
    "AgentFailed",
    "AgentStarted",
    "AgentStopped",
    "AuditAgent",
    "EventDrivenAgent",
    "HandlerSpec",
    "handles",
]

log = logging.getLogger("agentevents.agents")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class _DefaultGroup:
    """Marker: the group is ``"<agent_id>.<method name>"``."""

    def __repr__(self) -> str:
        return "DEFAULT_GROUP"


DEFAULT_GROUP: Final = _DefaultGroup()
_MARK = "__agentevents_handles__"

#: The event whose handler is running in this context: the cause of what ``emit`` sends.
_handling: ContextVar[Event | None] = ContextVar("agentevents_handling", default=None)


# -- lifecycle payloads ----------------------------------------------------------------------


@schemas.payload("agent.started")
class AgentStarted(BaseModel):
    """Payload of ``agent.started``: who started and what it does."""

    agent_id: str
    instance_id: str
    capabilities: list[str]
    #: The patterns the agent subscribed to.
    handles: list[str]


@schemas.payload("agent.stopped")
class AgentStopped(BaseModel):
    """Payload of ``agent.stopped``."""

    agent_id: str
    instance_id: str


@schemas.payload("agent.failed")
class AgentFailed(BaseModel):
    """Payload of ``agent.failed``: ``start()`` failed, or a handler gave up on an event."""

    agent_id: str
    instance_id: str
    phase: Literal["start", "handler"]
    error: str
    error_type: str
    #: For ``phase="handler"``: the method, the event it gave up on, attempts, group.
    handler: str | None = None
    event_id: str | None = None
    event_type: str | None = None
    attempts: int | None = None
    group: str | None = None


# -- declaring handlers ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """One ``@handles(...)`` declaration on an agent method."""

    method: str
    patterns: tuple[str, ...]
    #: A group name, ``None`` (ephemeral) or :data:`DEFAULT_GROUP`.
    group: str | _DefaultGroup | None
    start: StartPosition
    #: Subscription options given explicitly (``max_attempts``, ``max_in_flight``, ...).
    options: dict[str, float] = field(default_factory=dict)


def handles(
    *patterns: str,
    group: str | _DefaultGroup | None = DEFAULT_GROUP,
    start: StartPosition = "latest",
    max_attempts: int | None = None,
    max_in_flight: int | None = None,
    ack_timeout: float | None = None,
    retry_backoff: float | None = None,
    max_backoff: float | None = None,
    drain_timeout: float | None = None,
) -> Callable[[F], F]:
    """Mark an ``async`` agent method as the handler of events matching ``patterns``.

    ``group`` defaults to ``"<agent_id>.<method name>"``; pass a name to share a group, or
    ``None`` for an ephemeral subscription. ``start`` applies to a group seen for the first
    time. The other options override the bus defaults for these subscriptions (see
    :meth:`Bus.subscribe`).
    """
    if not patterns:
        raise TypeError("@handles needs at least one pattern, e.g. @handles('code.>')")
    for pattern in patterns:
        compile_pattern(pattern)  # a bad pattern fails at class definition, not at start
    given = {
        "max_attempts": max_attempts,
        "max_in_flight": max_in_flight,
        "ack_timeout": ack_timeout,
        "retry_backoff": retry_backoff,
        "max_backoff": max_backoff,
        "drain_timeout": drain_timeout,
    }
    options = {name: value for name, value in given.items() if value is not None}

    def decorate(function: F) -> F:
        is_async = inspect.iscoroutinefunction(function)
        if not is_async:
            raise TypeError(f"@handles: {function.__qualname__} must be an 'async def' method")
        spec = HandlerSpec(function.__name__, tuple(patterns), group, start, options)
        marks: list[HandlerSpec] = getattr(function, _MARK, [])
        setattr(function, _MARK, [*marks, spec])
        return function

    return decorate


@dataclass(frozen=True, slots=True)
class _CallShape:
    """How to call a handler method: with the typed payload (and the event), or the event."""

    model: type[BaseModel] | None
    pass_event: bool


_shapes: dict[tuple[type, str], _CallShape] = {}


def _call_shape(cls: type[EventDrivenAgent], method: str) -> _CallShape:
    """How ``cls.method`` wants to be called (cached per class)."""
    shape = _shapes.get((cls, method))
    if shape is None:
        shape = _shapes[(cls, method)] = _analyse(cls, method)
    return shape


def _analyse(cls: type[EventDrivenAgent], method: str) -> _CallShape:
    function = getattr(cls, method)
    where = f"{cls.__qualname__}.{method}"
    try:
        try:
            hints = typing.get_type_hints(function)
        except NameError:  # ``Event`` imported under TYPE_CHECKING only: that one we know
            hints = typing.get_type_hints(function, localns={"Event": Event, "Any": Any})
    except Exception as exc:
        raise ConfigurationError(
            f"cannot resolve the annotations of {where}: {exc!r}; a payload model must be "
            "imported at run time in the handler's module (not under TYPE_CHECKING, not "
            "defined inside a function)"
        ) from exc
    params = [
        p for p in list(inspect.signature(function).parameters.values())[1:]
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not 1 <= len(params) <= 2:
        raise ConfigurationError(
            f"{where} must take (self, event: Event), (self, payload: Model) or "
            f"(self, payload: Model, event: Event); it takes {len(params)} argument(s)"
        )
    first = hints.get(params[0].name, Any)
    if isinstance(first, type) and issubclass(first, BaseModel) and not issubclass(first, Event):
        second = hints.get(params[1].name, Any) if len(params) == 2 else Event
        if second is not Event and second is not Any:
            raise ConfigurationError(f"{where}: the second parameter receives the Event")
        return _CallShape(first, len(params) == 2)
    if first is not Event and first is not Any:
        raise ConfigurationError(
            f"{where}: annotate the first parameter with Event or a pydantic payload model, "
            f"not {first!r}"
        )
    if len(params) == 2:
        raise ConfigurationError(
            f"{where}: a second parameter (the Event) is only passed after a typed payload"
        )
    return _CallShape(None, False)


def _default_agent_id(cls: type) -> str:
    name = cls.__name__
    if name.endswith("Agent") and name != "Agent":
        name = name[: -len("Agent")]
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()


# -- the agent -------------------------------------------------------------------------------


class EventDrivenAgent:
    """Base class of agents that react to events and emit new ones (see the module doc).

    ``agent_id`` (default: the class name in kebab case without ``Agent``, e.g.
    ``code-review``) is the ``source`` of everything the agent emits and names its groups;
    replicas of one agent use the same id. ``schemas`` is the registry typed handlers parse
    with (default: the process-wide :data:`agentevents.schemas`).
    """

    #: What the agent can do; announced in ``agent.started``.
    capabilities: ClassVar[Sequence[str]] = ()
    #: Every ``@handles`` declaration of the class, collected when the class is created.
    handlers: ClassVar[tuple[HandlerSpec, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        by_method: dict[str, list[HandlerSpec]] = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                marks = getattr(value, _MARK, None)
                if marks is not None:
                    by_method[name] = list(marks)
        seen: set[tuple[str, str]] = set()
        for specs in by_method.values():
            for spec in specs:
                for pattern in spec.patterns:
                    if (spec.method, pattern) in seen:
                        raise TypeError(
                            f"{cls.__qualname__}.{spec.method} handles {pattern!r} twice"
                        )
                    seen.add((spec.method, pattern))
        cls.handlers = tuple(spec for specs in by_method.values() for spec in specs)

    def __init__(
        self, bus: Bus, agent_id: str | None = None, *, schemas: SchemaRegistry | None = None
    ) -> None:
        self.bus = bus
        self.agent_id = agent_id or _default_agent_id(type(self))
        #: Distinguishes replicas of one agent (in lifecycle payloads and member names).
        self.instance_id = uuid.uuid4().hex[:8]
        self._schemas = schemas if schemas is not None else _default_schemas()
        self._subscriptions: list[Subscription] = []
        self._running = False

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        return self._running

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """The bus subscriptions of the running agent."""
        return tuple(self._subscriptions)

    def group_for(self, spec: HandlerSpec) -> str | None:
        """The group ``spec`` subscribes in (``None``: ephemeral)."""
        if isinstance(spec.group, _DefaultGroup):
            return f"{self.agent_id}.{spec.method}"
        return spec.group

    # -- emitting ----------------------------------------------------------------------------

    async def emit(
        self,
        type_or_model: str | BaseModel,
        payload: dict[str, Any] | BaseModel | None = None,
        *,
        key: str | None = None,
        caused_by: Event | None = None,
        **fields: Any,
    ) -> Event:
        """Publish an event from this agent and return it.

        ``emit("type", {...})``, ``emit("type", Model(...))`` or ``emit(Model(...))`` (type
        and version from the model's registration). The cause is ``caused_by``, else the
        event whose handler is running; see the module doc for correlation. ``fields`` are
        other :class:`Event` fields (``metadata``, ``correlation_id``, ``version``, ...).
        """
        if "source" in fields:
            raise TypeError("emit() sets source to the agent id; it cannot be overridden")
        body: dict[str, Any] | BaseModel | None
        if isinstance(type_or_model, BaseModel):
            if payload is not None:
                raise TypeError("emit(model) takes the payload model alone")
            event_type, body = self._schemas.type_of(type(type_or_model))[0], type_or_model
        else:
            event_type, body = type_or_model, payload
        if isinstance(body, BaseModel):
            try:
                registered, version = self._schemas.type_of(type(body))
            except UnknownEventTypeError:
                pass
            else:
                if registered != event_type:
                    raise EventValidationError(
                        f"{type(body).__qualname__} is the payload of {registered}, "
                        f"not {event_type}"
                    )
                fields.setdefault("version", version)
            body = body.model_dump(mode="json")
        event_id = fields.pop("id", None) or new_event_id()
        cause = caused_by if caused_by is not None else _handling.get()
        if cause is not None:
            fields.setdefault("correlation_id", cause.correlation_id or str(cause.id))
            fields.setdefault("causation_id", str(cause.id))
        else:
            fields.setdefault("correlation_id", str(event_id))
        event = Event.model_validate(
            {**fields, "id": event_id, "type": event_type, "source": self.agent_id,
             "key": key, "payload": body or {}}
        )
        await self.bus.publish(event)
        return event

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe every handler, then emit ``agent.started``; idempotent.

        On failure the subscriptions made so far are stopped, ``agent.failed`` is emitted
        (if the bus still takes events) and the error is re-raised.
        """
        if self._running:
            return
        subscriptions: list[Subscription] = []
        try:
            for index, spec in enumerate(self.handlers):
                handler = self._bind(spec)
                for pattern in spec.patterns:
                    member = f"{self.agent_id}-{self.instance_id}-{index}-{len(subscriptions)}"
                    subscriptions.append(
                        await self.bus.subscribe(
                            pattern, handler, group=self.group_for(spec), start=spec.start,
                            consumer=member, **spec.options,
                        )
                    )
            self._subscriptions = subscriptions
            self._running = True
            await self.emit(
                "agent.started",
                AgentStarted(
                    agent_id=self.agent_id, instance_id=self.instance_id,
                    capabilities=list(self.capabilities),
                    handles=[p for spec in self.handlers for p in spec.patterns],
                ),
            )
        except Exception as exc:
            self._running = False
            self._subscriptions = []
            await _stop_all(subscriptions, None)
            await self._announce_failure(
                AgentFailed(agent_id=self.agent_id, instance_id=self.instance_id,
                            phase="start", error=str(exc) or repr(exc),
                            error_type=type(exc).__qualname__),
                cause=None,
            )
            raise

    async def stop(self, timeout: float | None = None) -> None:
        """Stop every subscription (running handlers finish within ``timeout`` seconds,
        default the subscriptions' ``drain_timeout``), then emit ``agent.stopped``.

        Idempotent. If the bus is already closed, ``agent.stopped`` is not sent.
        """
        if not self._running:
            return
        self._running = False
        subscriptions, self._subscriptions = self._subscriptions, []
        await _stop_all(subscriptions, timeout)
        try:
            await self.emit(
                "agent.stopped", AgentStopped(agent_id=self.agent_id, instance_id=self.instance_id)
            )
        except BusClosedError:
            log.debug("bus closed before %s stopped; agent.stopped not sent", self.agent_id)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- handling ----------------------------------------------------------------------------

    def _bind(self, spec: HandlerSpec) -> Handler:
        """The bus handler for ``spec``: parses the payload, sets the cause, reports failure."""
        shape = _call_shape(type(self), spec.method)
        method: Callable[..., Awaitable[Any]] = getattr(self, spec.method)
        registry = self._schemas

        async def handle(event: Event) -> None:
            token = _handling.set(event)
            try:
                if shape.model is None:
                    await method(event)
                else:
                    try:
                        payload = registry.parse(event, shape.model)
                    except EventValidationError as exc:  # retrying cannot make it valid
                        raise RejectEvent(str(exc)) from exc
                    if shape.pass_event:
                        await method(payload, event)
                    else:
                        await method(payload)
            except Exception as exc:
                delivery = current_delivery()
                final = delivery.is_last_attempt or isinstance(exc, RejectEvent)
                if final and event.type != "agent.failed":
                    await self._announce_failure(
                        AgentFailed(
                            agent_id=self.agent_id, instance_id=self.instance_id,
                            phase="handler", error=str(exc) or repr(exc),
                            error_type=type(exc).__qualname__, handler=spec.method,
                            event_id=str(event.id), event_type=event.type,
                            attempts=delivery.attempt, group=delivery.group,
                        ),
                        cause=event,
                    )
                raise
            finally:
                _handling.reset(token)

        handle.__qualname__ = f"{type(self).__qualname__}.{spec.method}"
        return handle

    async def _announce_failure(self, failure: AgentFailed, cause: Event | None) -> None:
        try:
            await self.emit("agent.failed", failure, caused_by=cause)
        except BusClosedError:
            log.warning("%s failed (%s); the bus is closed, agent.failed not sent",
                        self.agent_id, failure.error)
        except Exception:
            log.exception("%s could not emit agent.failed (%s)", self.agent_id, failure.error)

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<{type(self).__qualname__} {self.agent_id!r} {state}>"


def _default_schemas() -> SchemaRegistry:
    return schemas


async def _stop_all(subscriptions: Sequence[Subscription], timeout: float | None) -> None:
    results = await asyncio.gather(
        *(sub.stop(timeout) for sub in subscriptions), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result
        if isinstance(result, Exception):
            log.warning("stopping a subscription failed: %r", result)


class AuditAgent(EventDrivenAgent):
    """Appends every event it receives to an :class:`EventStore`: the audit trail.

    One stream per workflow, ``workflow-<correlation id>`` (:meth:`stream_for`). Delivery
    is at-least-once, so an event already stored (:class:`DuplicateEventError`) counts as
    recorded. The handler takes one event at a time (``max_in_flight=1``), so a stream's
    versions follow the order the bus delivered; with several replicas of the audit agent,
    that order holds per replica only.
    """

    capabilities = ("audit", "event_store")

    def __init__(
        self,
        bus: Bus,
        store: EventStore,
        agent_id: str | None = None,
        *,
        schemas: SchemaRegistry | None = None,
    ) -> None:
        super().__init__(bus, agent_id, schemas=schemas)
        self.store = store

    def stream_for(self, event: Event) -> str:
        """The stream ``event`` is recorded in."""
        return f"workflow-{event.correlation_id or event.id}"

    @handles(">", max_in_flight=1)
    async def record(self, event: Event) -> None:
        """Append ``event`` to its workflow stream, once."""
        with contextlib.suppress(DuplicateEventError):
            await self.store.append(self.stream_for(event), [event])
