"""A small app whose tasks are tested with taskrunner's testing kit (docs/testing.md):
a sign-up sends a welcome email (retried while the mail server fails) and schedules a
reminder for the next day. Its tests are examples/test_signup.py; run them with::

    python -m pytest examples/test_signup.py -q -p no:cacheprovider

The pytest plugin starts a private redis-server for the run and gives every test a
fresh namespace: no Redis to set up, and TASKRUNNER_REDIS_URL is not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from taskrunner import TaskRunner, current_job

tr = TaskRunner(retry_delay=30.0)

REMIND_AFTER = timedelta(days=1)


class MailServerDown(Exception):
    """The mail server refused the message (worth a retry)."""


@dataclass
class Mailer:
    """A stand-in for a mail service: the tests look at ``sent`` and set ``failures``."""

    sent: list[tuple[str, str]] = field(default_factory=list)
    failures: int = 0
    """How many of the next sends fail with MailServerDown."""

    def send(self, to: str, subject: str) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise MailServerDown(f"cannot send {subject!r} to {to}")
        self.sent.append((to, subject))


mailer = Mailer()


@tr.task(max_retries=3)
async def send_email(to: str, subject: str) -> int:
    """Send one email; returns the attempt that succeeded."""
    mailer.send(to, subject)
    return current_job().attempt


@tr.task(max_retries=0)
async def sign_up(email: str) -> str:
    """Check the address, then send the welcome email now and the reminder tomorrow."""
    if "@" not in email:
        raise ValueError(f"not an email address: {email!r}")
    await send_email.enqueue(email, "welcome")
    await send_email.options(delay=REMIND_AFTER).enqueue(email, "how is it going?")
    return email
