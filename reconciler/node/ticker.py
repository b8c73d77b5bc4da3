"""A periodic call on the asyncio loop: the agent's poll and heartbeat schedule. I/O shell."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

log = logging.getLogger(__name__)


class Ticker:
    """Calls `action` on `loop` every `interval` seconds, each call up to `jitter` seconds late
    (so a fleet polling one repository does not poll in step). The beat is kept (start +
    k * interval, not drifting by the jitter); beats missed while the loop was busy are
    coalesced into one call. `action` runs on the loop's thread and must not block."""

    def __init__(self, loop: asyncio.AbstractEventLoop, action: Callable[[], object],
                 interval: float, jitter: float = 0.0) -> None:
        self._loop = loop
        self._action = action
        self.interval = max(interval, 0.05)
        self.jitter = max(jitter, 0.0)
        self._beat = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.stop()
        self._beat = self._loop.time()
        self._arm()

    def reschedule(self, interval: float, jitter: float = 0.0) -> None:
        """A new interval from now on (the first call one interval from now)."""
        self.interval, self.jitter = max(interval, 0.05), max(jitter, 0.0)
        self.start()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self) -> None:
        now = self._loop.time()
        self._beat += self.interval
        if self._beat <= now:  # missed beats: one call now-ish, then on the beat again
            self._beat += self.interval * ((now - self._beat) // self.interval + 1)
        late = random.uniform(0.0, self.jitter) if self.jitter else 0.0
        self._handle = self._loop.call_at(self._beat + late, self._fire)

    def _fire(self) -> None:
        fired = self._handle
        try:
            self._action()
        except Exception:  # one failed call must not end the schedule
            log.exception("periodic call %r failed", self._action)
        finally:
            if self._handle is fired and fired is not None:  # not stopped or rescheduled
                self._arm()
