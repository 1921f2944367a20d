"""Two agents, one event flow: a signup triggers a welcome email; the auditor sees both."""
import asyncio

from agentevents import Event, create_bus
from agentevents.agents import EventDrivenAgent, handles


class Greeter(EventDrivenAgent):
    @handles("user.signed_up")
    async def welcome(self, event: Event) -> None:
        await self.emit("email.sent", {"to": event.payload["email"]})  # caused by the signup


class Auditor(EventDrivenAgent):
    @handles("user.*", "email.*")
    async def log(self, event: Event) -> None:
        print(f"{event.source:>11}  {event.type:<15} {event.payload}")


async def main() -> None:
    async with create_bus("memory://") as bus, Greeter(bus), Auditor(bus):
        await bus.publish(Event(type="user.signed_up", payload={"email": "ada@example.com"}))
        await asyncio.sleep(0.1)  # let the flow run; on exit the agents stop, then the bus


asyncio.run(main())
