"""Tests of examples/signup.py with taskrunner's testing kit (docs/testing.md)::

    python -m pytest examples/test_signup.py -q -p no:cacheprovider

It relies on pytest-asyncio's auto mode, which the repository's pyproject.toml sets
(``asyncio_mode = auto``); elsewhere, configure it as docs/testing.md says.

A real worker runs the jobs in the test's process (``run_until_idle``), on a private
redis-server; ``frozen_time`` moves time for the retries and the next-day reminder.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from examples import signup
from taskrunner import JobFailed, TaskRunner
from taskrunner.testing import TaskRunnerBinder, frozen_time


@pytest.fixture
async def tr(bind_taskrunner: TaskRunnerBinder) -> AsyncIterator[TaskRunner]:
    """The app's own TaskRunner, on the test's private Redis and namespace."""
    async with bind_taskrunner(signup.tr) as runner:
        yield runner


@pytest.fixture(autouse=True)
def mailer() -> signup.Mailer:
    signup.mailer = signup.Mailer()
    return signup.mailer


async def test_sign_up_sends_the_welcome_email(tr: TaskRunner, mailer: signup.Mailer) -> None:
    job = await signup.sign_up.enqueue("ann@example.com")

    await tr.run_until_idle()

    assert await job.result() == "ann@example.com"
    assert mailer.sent == [("ann@example.com", "welcome")]  # the reminder is for tomorrow


async def test_the_reminder_goes_out_a_day_later(tr: TaskRunner, mailer: signup.Mailer) -> None:
    async with frozen_time(tr) as clock:
        await signup.sign_up.enqueue("bob@example.com")
        await tr.run_until_idle()
        await clock.advance(signup.REMIND_AFTER - timedelta(minutes=1))
        await tr.run_until_idle()
        assert len(mailer.sent) == 1  # not yet

        await clock.advance(timedelta(minutes=1))
        await tr.run_until_idle()

    assert mailer.sent[1] == ("bob@example.com", "how is it going?")


async def test_the_welcome_email_is_retried_while_the_mail_server_is_down(
    tr: TaskRunner, mailer: signup.Mailer
) -> None:
    mailer.failures = 2
    async with frozen_time(tr) as clock:
        job = await signup.send_email.enqueue("cy@example.com", "welcome")
        for _ in range(2):  # each failed attempt schedules a retry (30 s, then 60 s + jitter)
            await tr.run_until_idle()
            assert await job.status() == "scheduled"
            await clock.advance(120)
        await tr.run_until_idle()

    assert await job.result() == 3
    assert mailer.sent == [("cy@example.com", "welcome")]


async def test_a_bad_address_fails_the_sign_up(tr: TaskRunner, mailer: signup.Mailer) -> None:
    await signup.sign_up.enqueue("not-an-address")

    with pytest.raises(JobFailed, match="not an email address"):
        await tr.run_until_idle()
    assert mailer.sent == []
