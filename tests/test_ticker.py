"""The agent's schedule (node/ticker.py) on a real event loop, and its trace ids without the
OpenTelemetry SDK (node/telemetry.py): what a node without an OTLP endpoint runs on."""

from __future__ import annotations

import asyncio

from conftest import eventually_async

from reconciler.node.telemetry import Telemetry
from reconciler.node.ticker import Ticker


async def test_a_ticker_calls_on_the_loop_thread_until_stopped_and_survives_a_failing_call(
) -> None:
    loop = asyncio.get_running_loop()
    calls: list[int] = []

    def action() -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("one bad call")  # logged; the schedule goes on

    ticker = Ticker(loop, action, interval=0.05, jitter=0.02)
    ticker.start()
    await eventually_async(lambda: asyncio.sleep(0, len(calls) >= 4), what="4 calls")
    ticker.reschedule(0.05)
    seen = len(calls)
    await eventually_async(lambda: asyncio.sleep(0, len(calls) > seen), what="after reschedule")
    ticker.stop()
    stopped_at = len(calls)
    await asyncio.sleep(0.2)
    assert len(calls) == stopped_at


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
