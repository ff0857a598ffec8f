"""The order in which a worker takes ready jobs: the priority fairness rule.

A worker takes the ready job of the highest priority level first, the oldest first
within a level (by the time its stream entry was written: its enqueue, its promotion
from the delayed set, its requeue after a reclaim, a retry by hand). One take in
``AGED_SHARE`` (the 10th, 20th, ... job the worker takes) is reserved: it goes to the
oldest job of a level below the highest whose entry has waited longer than
``priority_aging``, if there is one, and otherwise to the usual order. So while
higher levels keep the worker busy, lower levels still get one job in ten of it as
soon as they have waited ``priority_aging``; no level waits forever.

One partition (the common case) applies the rule inside fetch.lua, given how many of
its reads are reserved (``Turns.reserved``). A worker that reads several partitions
(a partitioned queue, several queues) first looks at every partition's unread entries
(peek.lua, one pipelined round trip), chooses here which to read (``choose``), then
reads exactly those levels of each partition (fetch.lua with a cap per level).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

AGED_SHARE = 10
"""One take in this many is reserved for aged jobs of lower levels."""


class Turns:
    """Counts the jobs a worker took, to know which takes are reserved."""

    __slots__ = ("taken",)

    def __init__(self) -> None:
        self.taken = 0

    def reserved(self, n: int) -> int:
        """How many of the next ``n`` takes are reserved ones."""
        return (self.taken + n) // AGED_SHARE - self.taken // AGED_SHARE

    def is_reserved(self, k: int) -> bool:
        """Whether the ``k``-th next take (1-based) is a reserved one."""
        return (self.taken + k) % AGED_SHARE == 0

    def took(self, n: int) -> None:
        self.taken += n


@dataclass(frozen=True, slots=True)
class Unread:
    """One unread entry seen by peek.lua."""

    partition: int
    """Its index in the worker's list of partitions."""
    level: int
    """Its level's index, 0 for the highest."""
    age_ms: int
    """How long ago its entry was written (by its own server's clock)."""
    entry_id: str


def entry_ms(entry_id: str) -> int:
    """The time (ms) in a stream entry id."""
    return int(entry_id.partition("-")[0])


def unread_of(partition: int, now_ms: int, levels: Sequence[Sequence[str]]) -> list[Unread]:
    """The entries of one partition's peek reply (ids per level, oldest first)."""
    return [
        Unread(partition, level, now_ms - entry_ms(entry_id), entry_id)
        for level, ids in enumerate(levels)
        for entry_id in ids
    ]


def one_clock(nows: Sequence[int], servers: Sequence[str]) -> list[int]:
    """The "now" to measure each partition's ages against: the latest ``now`` any
    partition of the same server reported (``servers``: which server each partition
    is on).

    peek.lua reads the server's clock once per script run, and the partitions of one
    server are looked at by separate runs (one per partition's Cluster slot), some
    milliseconds apart on a busy server. Measured against their own instants, an entry
    written later could look older than one of another partition and be taken first;
    against one instant per server, entries of one server are taken in the order they
    were written (to the millisecond; entries of the same millisecond in the
    partitions' order). Across servers (a Cluster's nodes, each on its own clock) the
    ages compare how long each entry has waited, whatever the clocks' offsets."""
    latest: dict[str, int] = {}
    for now, server in zip(nows, servers, strict=True):
        latest[server] = max(now, latest.get(server, now))
    return [latest[server] for server in servers]


def choose(unread: Sequence[Unread], count: int, aging_ms: int, turns: Turns) -> list[Unread]:
    """The ``count`` (or fewer) entries to take next, by the fairness rule."""
    usual = sorted(unread, key=lambda u: (u.level, -u.age_ms))
    aged = sorted(
        (u for u in unread if u.level > 0 and u.age_ms > aging_ms), key=lambda u: -u.age_ms
    )
    picks = _Picks(usual), _Picks(aged)
    chosen: list[Unread] = []
    for k in range(1, count + 1):
        pick = picks[1].next() if turns.is_reserved(k) else None
        pick = pick or picks[0].next()
        if pick is None:
            break
        chosen.append(pick)
        for each in picks:
            each.taken.add(pick)
    return chosen


class _Picks:
    """One ordering of the candidates, skipping those taken by another."""

    def __init__(self, items: list[Unread]) -> None:
        self.items = items
        self.at = 0
        self.taken: set[Unread] = set()

    def next(self) -> Unread | None:
        while self.at < len(self.items) and self.items[self.at] in self.taken:
            self.at += 1
        if self.at == len(self.items):
            return None
        self.at += 1
        return self.items[self.at - 1]


def caps(chosen: Sequence[Unread], partitions: int, levels: int) -> list[list[int]]:
    """How many entries to read of each level of each partition."""
    counts = [[0] * levels for _ in range(partitions)]
    for item in chosen:
        counts[item.partition][item.level] += 1
    return counts
