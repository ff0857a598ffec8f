"""Chains and groups: a job that starts the next when it succeeds, and jobs awaited together.

Run a worker, then the producer (the embedded redis-server is used unless
``TASKRUNNER_REDIS_URL`` is set)::

    taskrunner worker examples.chains:tr
    python -m examples.chains

``fetch_order(42)`` returns an ``Order``; ``price`` takes that ``Order`` as its first
argument (mypy and pyright check it) and a currency; ``receipt`` takes the price. The
follow-ups are written with the commit of the step before them, so a worker killed
between the two loses nothing. The group prices three orders at once and gives the
results in order; ``return_exceptions=True`` keeps a failure in its place.
"""

from __future__ import annotations

from decimal import Decimal

import anyio
from pydantic import BaseModel

from taskrunner import JobFailed, TaskRunner

tr = TaskRunner(namespace="examples-chains")


class Order(BaseModel):
    id: int
    items: list[Decimal]


@tr.task
async def fetch_order(order_id: int) -> Order:
    if order_id < 0:
        raise ValueError(f"no order {order_id}")
    return Order(id=order_id, items=[Decimal("9.90"), Decimal("5.10")])


@tr.task(queue="billing")
async def price(order: Order, currency: str) -> str:
    return f"{sum(order.items)} {currency}"


@tr.task
async def receipt(total: str, *, email: str) -> str:
    return f"receipt for {total} sent to {email}"


async def main() -> None:
    async with tr:
        chain = await (
            fetch_order.chain(42)
            .then(price, "EUR")
            .then(receipt, email="ann@example.com")
            .enqueue()
        )
        print(await chain.result(timeout=30))  # receipt for 15.00 EUR sent to ann@...

        broken = await fetch_order.chain(-1).then(price, "EUR").enqueue()
        try:
            await broken.result(timeout=30)
        except JobFailed as exc:  # the first step failed: price never ran
            print("chain stopped:", exc.exc_message)

        group = await tr.group([fetch_order.call(n) for n in (1, 2, -3)])
        for outcome in await group.results(timeout=30, return_exceptions=True):
            print(outcome if isinstance(outcome, Exception) else f"order {outcome.id}")


if __name__ == "__main__":
    anyio.run(main)
