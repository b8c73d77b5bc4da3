"""The agent's periodic calls (poll, heartbeat) on APScheduler's AsyncIOScheduler. I/O shell."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from apscheduler.schedulers.asyncio import AsyncIOScheduler


class Schedule:
    """Named calls every `interval` seconds, each up to `jitter` seconds late (so a fleet
    polling one repository does not poll in step); missed runs are coalesced into one, a run
    never overlaps the previous one, and a failed call is logged and the schedule goes on.

    Every call runs on `loop`'s thread: APScheduler's AsyncIOExecutor hands a plain function
    to a thread pool but runs a coroutine function as a task on the loop, so each action is
    registered wrapped in one (the actions use asyncio APIs that are not thread-safe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduler = AsyncIOScheduler(event_loop=loop)

    def every(self, job_id: str, action: Callable[[], object], interval: float,
              jitter: float = 0.0) -> None:
        async def on_the_loop() -> None:
            action()

        self._scheduler.add_job(
            on_the_loop, "interval", id=job_id, name=job_id, replace_existing=True,
            coalesce=True, max_instances=1, misfire_grace_time=None, **_trigger(interval, jitter))

    def reschedule(self, job_id: str, interval: float, jitter: float = 0.0) -> None:
        """A new interval from now on (the next call one interval from now)."""
        self._scheduler.reschedule_job(job_id, trigger="interval", **_trigger(interval, jitter))

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        """No call starts after this. AsyncIOScheduler defers its shutdown to the next loop
        turn: a call falling due in this one would still be handed over, then cancelled
        with an ERROR traceback. Pausing takes effect at once."""
        if self._scheduler.running:
            self._scheduler.pause()
            self._scheduler.shutdown(wait=False)


def _trigger(interval: float, jitter: float) -> dict[str, float | None]:
    return {"seconds": max(interval, 0.05), "jitter": max(jitter, 0.0) or None}
