"""TaskRunner settings are validated like task options: one sentence per bad setting,
raised where the runner is built (taskrunner.config). No Redis needed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from taskrunner import ConfigurationError, TaskRunner
from taskrunner.config import DEFAULT_DEAD_LETTER_LIMIT, DEFAULT_DEAD_LETTER_TTL

URL = "redis://127.0.0.1:1/0"  # never connected to


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"max_retries": -1}, "max_retries=-1: it must be 0 or more"),
        ({"max_retries": 1.5}, "max_retries=1.5: it must be a whole number"),
        ({"max_retries": "3"}, "max_retries='3': it must be a whole number"),
        ({"max_retries": True}, "max_retries=True: it must be a whole number"),
        ({"retry_delay": -1}, "retry_delay=-1: it must be 0 or more"),
        ({"retry_delay": timedelta(seconds=-1)}, "retry_delay=-1.0: it must be 0 or more"),
        ({"result_ttl": 0}, "result_ttl=0: it must be more than 0"),
        ({"result_ttl": timedelta(0)}, "result_ttl=0.0: it must be more than 0"),
        ({"timeout": 0}, "timeout=0: it must be more than 0"),
        ({"timeout": -5}, "timeout=-5: it must be more than 0"),
        ({"timeout": "soon"}, "timeout='soon': it must be a number of seconds or a timedelta"),
        ({"socket_timeout": 0}, "socket_timeout=0: it must be more than 0"),
        ({"heartbeat_interval": 0}, "heartbeat_interval=0: it must be more than 0"),
        ({"stale_after": -1}, "stale_after=-1: it must be more than 0"),
        ({"lock_ttl": 0}, "lock_ttl=0: it must be more than 0"),
        ({"dead_letter_limit": 0}, "dead_letter_limit=0: it must be 1 or more"),
        ({"dead_letter_limit": 10.5}, "dead_letter_limit=10.5: it must be a whole number"),
        ({"dead_letter_ttl": 0}, "dead_letter_ttl=0: it must be more than 0"),
        ({"result_ttl": True}, "result_ttl=True: it must be a number of seconds or a timedelta"),
        (
            {"heartbeat_interval": 1.0, "stale_after": 1.9},
            "stale_after (1.9s) must be at least twice heartbeat_interval (1s)",
        ),
    ],
)
def test_a_bad_runner_setting_is_refused_in_one_sentence_naming_it(
    settings: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        TaskRunner(URL, **settings)
    message = str(caught.value)
    assert fragment in message
    assert message.startswith("invalid TaskRunner setting")
    assert message.endswith(".")
    assert "\n" not in message


def test_two_bad_settings_are_both_named_in_one_line() -> None:
    with pytest.raises(ConfigurationError) as caught:
        TaskRunner(URL, max_retries=-1, timeout=0)
    message = str(caught.value)
    assert "max_retries=-1" in message
    assert "timeout=0" in message
    assert "\n" not in message


def test_good_settings_are_kept_in_seconds() -> None:
    tr = TaskRunner(
        URL,
        result_ttl=timedelta(minutes=1),
        socket_timeout=timedelta(seconds=4),
        retry_delay=0,
        max_retries=0,
        dead_letter_ttl=timedelta(days=1),
        dead_letter_limit=5,
    )
    assert tr.result_ttl == 60.0
    assert tr.socket_timeout == 4.0
    assert (tr.dead_letter_limit, tr.dead_letter_ttl) == (5, 86400.0)
    default = TaskRunner(URL)
    assert default.dead_letter_limit == DEFAULT_DEAD_LETTER_LIMIT == 10_000
    assert default.dead_letter_ttl == DEFAULT_DEAD_LETTER_TTL == 30 * 86400.0


def test_a_bad_url_is_refused_when_the_runner_is_built() -> None:
    with pytest.raises(ConfigurationError, match=r"invalid Redis URL 'http://:\*\*\*@h'"):
        TaskRunner("http://:hunter2@h")


@pytest.mark.parametrize("delay", [0, 0.01, timedelta(milliseconds=49)])
def test_reschedule_delay_below_its_floor_is_refused(delay: float | timedelta) -> None:
    tr = TaskRunner(URL)
    with pytest.raises(ConfigurationError) as caught:

        @tr.task(lock="while_executing", on_conflict="reschedule", reschedule_delay=delay)
        async def spin() -> None: ...

    message = str(caught.value)
    assert "reschedule_delay=" in message
    assert "it must be 0.05 or more" in message
    assert "\n" not in message


def test_reschedule_delay_at_its_floor_is_accepted() -> None:
    tr = TaskRunner(URL)

    @tr.task(lock="while_executing", on_conflict="reschedule", reschedule_delay=0.05)
    async def polite() -> None: ...

    assert polite.name.endswith("polite")
