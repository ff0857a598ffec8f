"""The worker: reading and claiming (``reader``), running (``consumers``), recording
outcomes (``committer``), promoting due jobs (``scheduler``), events (``listener``),
composed by ``Worker``."""

from taskrunner.worker.held import Claimed
from taskrunner.worker.worker import Worker

__all__ = ["Claimed", "Worker"]
