"""The agent's schedule (node/schedule.py, APScheduler) on a real event loop, and its trace ids
without the OpenTelemetry SDK (node/telemetry.py): what a node without an OTLP endpoint runs."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from conftest import eventually_async

from reconciler.node.schedule import Schedule
from reconciler.node.telemetry import Telemetry


async def test_scheduled_calls_run_on_the_loop_thread_until_shut_down_and_survive_a_failure(
) -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def action() -> None:
        threads.append(threading.get_ident())
        if len(threads) == 2:
            raise RuntimeError("one bad call")  # logged; the schedule goes on

    schedule = Schedule(asyncio.get_running_loop())
    schedule.every("tick", action, interval=0.05, jitter=0.02)
    schedule.start()
    await eventually_async(lambda: asyncio.sleep(0, len(threads) >= 4), what="4 calls")
    # the agent's actions use asyncio APIs that only the loop's own thread may call
    assert set(threads) == {loop_thread}
    schedule.reschedule("tick", 0.05)
    seen = len(threads)
    await eventually_async(lambda: asyncio.sleep(0, len(threads) > seen), what="after reschedule")
    schedule.shutdown()
    stopped_at = len(threads)
    await asyncio.sleep(0.2)
    assert len(threads) == stopped_at
    assert set(threads) == {loop_thread}


async def test_a_shutdown_as_a_call_falls_due_logs_no_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """The agent stops in the loop turn in which a call fell due (a busy loop): APScheduler
    handed the call over after the stop was queued, then cancelled it and logged an ERROR
    traceback ("Error running job heartbeat", seen when a bench stopped 100 agents). A stop
    takes effect at once: no call is handed over after it, and nothing is logged."""
    calls: list[int] = []
    loop = asyncio.get_running_loop()
    schedule = Schedule(loop)
    schedule.every("tick", lambda: calls.append(1), interval=0.05)
    with caplog.at_level(logging.ERROR):
        schedule.start()
        await asyncio.sleep(0)  # the scheduler's timer is set: the first call in 0.05 s
        loop.call_later(0.07, schedule.shutdown)  # a stop due just after it
        time.sleep(0.15)  # a busy loop: both fall due in the same turn, the call's first
        await asyncio.sleep(0.2)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert calls == []  # nothing runs once the stop was asked for


async def test_trace_ids_without_the_sdk_nest_and_differ_per_run() -> None:
    telemetry = Telemetry("t1", environ={})
    assert telemetry.trace_id() is None
    with telemetry.span("reconcile", run_id="r1") as outer:
        first = telemetry.trace_id()
        assert outer is not None
        outer.set_attribute("outcome", "success")
        with telemetry.span("action", app="a"):
            assert telemetry.trace_id() == first
        inner = await asyncio.to_thread(telemetry.trace_id)  # a thread the loop hands work to
        assert inner == first
    with telemetry.span("reconcile", run_id="r2"):
        second = telemetry.trace_id()
    assert first is not None and second is not None and len(first) == 32 != first.count("0")
    assert first != second
    telemetry.actions.add(1, {"kind": "deploy"})  # no-op instruments
    telemetry.reconcile_duration.record(0.1)
    telemetry.shutdown()


def test_sdk_disabled_means_no_trace_ids() -> None:
    telemetry = Telemetry("t1", environ={"OTEL_SDK_DISABLED": "true"})
    with telemetry.span("reconcile"):
        assert telemetry.trace_id() is None
