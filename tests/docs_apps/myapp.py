"""``myapp``: the sample application as the docs' shortest examples name it (``myapp:tr``)."""

from __future__ import annotations

from app.tasks import add, send_email, tr

__all__ = ["add", "send_email", "tr"]
