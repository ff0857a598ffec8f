"""Cron expressions: parsed and evaluated by cronsim, in a time zone.

Five fields (minute, hour, day of month, month, day of week) or six with a leading
seconds field (``*/10 * * * * *``: every ten seconds), plus the aliases ``@yearly``,
``@annually``, ``@monthly``, ``@weekly``, ``@daily``, ``@midnight`` and ``@hourly``.
Ticks are whole seconds, in epoch milliseconds here (the unit of the scripts). Daylight
saving time follows Debian's cron, as cronsim does: a five-field schedule at a fixed
time that falls in the hour the clocks skip runs right after the jump, and one in the
hour the clocks repeat runs once.
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from taskrunner.exceptions import ConfigurationError

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
OUT_OF_RANGE = (ValueError, OverflowError, OSError)
"""What a time outside datetime's years 1 to 9999 raises (``fromtimestamp``, cronsim)."""
FORMS = (
    "5 fields (minute hour day-of-month month day-of-week) or 6 with a leading seconds "
    "field, e.g. '*/5 * * * *'"
)


def zone(tz: str | tzinfo) -> tzinfo:
    """A time zone from an IANA name (``"Europe/Paris"``) or a ``tzinfo``."""
    if isinstance(tz, tzinfo):
        return tz
    if not isinstance(tz, str) or not tz:
        raise ConfigurationError(f"tz must be an IANA time zone name, got {tz!r}")
    if tz.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(f"unknown time zone {tz!r}") from None


class CronExpression:
    """A validated cron expression in a time zone; ``after(ms)`` gives the next tick."""

    __slots__ = ("_fields", "text", "tz")

    def __init__(self, text: str, tz: str | tzinfo = "UTC") -> None:
        if not isinstance(text, str):
            raise ConfigurationError(f"a cron expression is a string, got {text!r}")
        self.text = text
        self.tz = zone(tz)
        self._fields = ALIASES.get(text.strip().lower(), text)
        try:
            first = self.after(0, now=True)
        except CronSimError as exc:
            reason = str(exc)
            reason = reason[:1].lower() + reason[1:]
            raise ConfigurationError(
                f"invalid cron expression {text!r}: {reason}; expected {FORMS}"
            ) from None
        if first is None:
            raise ConfigurationError(f"the cron expression {text!r} never matches a date")

    def __repr__(self) -> str:
        return f"CronExpression({self.text!r}, tz={self.tz_name!r})"

    @property
    def tz_name(self) -> str:
        return "UTC" if self.tz is UTC else str(getattr(self.tz, "key", self.tz))

    @property
    def seconds(self) -> bool:
        """Whether the expression has a seconds field."""
        return len(self._fields.split()) == 6

    def after(self, ms: int, *, now: bool = False) -> int | None:
        """The first tick strictly after ``ms`` (epoch ms; ``now=True``: after the
        present), or None if there is none in the next 50 years or before the end of
        year 9999 (what a datetime can hold)."""
        try:
            start = datetime.now(self.tz) if now else datetime.fromtimestamp(ms // 1000, self.tz)
            found = next(CronSim(self._fields, start))
        except (StopIteration, *OUT_OF_RANGE):
            return None
        return int(found.timestamp()) * 1000

    def at_or_after(self, ms: int) -> int | None:
        """The first tick at or after ``ms``."""
        return self.after(ms - 1)

    def at_or_before(self, ms: int) -> int | None:
        """The last tick at or before ``ms`` (None if none in the last 50 years)."""
        try:
            start = datetime.fromtimestamp(ms // 1000 + 1, self.tz)
            found = next(CronSim(self._fields, start, reverse=True))
        except (StopIteration, *OUT_OF_RANGE):
            return None
        return int(found.timestamp()) * 1000

    def explain(self) -> str:
        """In words (cronsim's ``explain``), e.g. "Every 5 minutes"."""
        start = datetime.now(self.tz)
        return CronSim(self._fields, start).explain()
