"""The agent's telemetry: spans (trace ids on every event), a few metrics, OTLP export when asked.

Which signals go out is decided here from the standard OTEL_* variables (export_plan). The
OpenTelemetry SDK (reconciler/node/otel.py, ~0.1 s of imports) is loaded only when something
reads what it records: an OTLP endpoint, or an exporter or reader a test passes. Otherwise a
span is only its trace id, made the way the SDK makes them, and the metrics are no-ops.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace.export import SpanExporter

OTLP_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
INSTRUMENTATION = "gitops-mesh.agent"
SERVICE_NAME = "gitops-mesh-node"
DEFAULT_ENDPOINT = "http://localhost:4318"  # OTLP/HTTP's default, as the specification says
PROTOCOL = "http/protobuf"  # the only OTLP protocol shipped (no gRPC dependency)
SHUTDOWN_TIMEOUT_S = 3.0  # a collector that is gone must not hold the agent's exit

log = logging.getLogger(__name__)


def resource_attributes(node_id: str, agent_version: str,
                        env: Mapping[str, str]) -> dict[str, str]:
    """Our defaults, then OTEL_RESOURCE_ATTRIBUTES (k=v,k2=v2, values percent-encoded), then
    OTEL_SERVICE_NAME: the operator's variables win, as the OpenTelemetry specification asks."""
    attributes = {"service.name": SERVICE_NAME, "service.instance.id": node_id,
                  "service.version": agent_version}
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
        elif item.strip():
            log.warning("OTEL_RESOURCE_ATTRIBUTES: ignoring %r (expected key=value)", item)
    if env.get("OTEL_SERVICE_NAME", "").strip():
        attributes["service.name"] = env["OTEL_SERVICE_NAME"].strip()
    return attributes


@dataclass(frozen=True)
class ExportPlan:
    """Which signals go out over OTLP/HTTP and where; `problem` says why export is off."""

    traces_url: str | None = None
    metrics_url: str | None = None
    metrics_interval_ms: float = 60_000.0
    problem: str | None = None


def export_plan(env: Mapping[str, str]) -> ExportPlan:
    """The standard variables -> what to export. A signal is exported when its
    OTEL_<SIGNAL>_EXPORTER is "otlp", or unset while an OTLP endpoint is set; "none" turns
    it off. Only the http/protobuf protocol is supported: another one turns export off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ExportPlan()
    base = env.get(OTLP_ENV, "").strip()
    urls: dict[str, str | None] = {}
    for signal, path in (("traces", "v1/traces"), ("metrics", "v1/metrics")):
        upper = signal.upper()
        own = env.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT", "").strip()
        exporter = env.get(f"OTEL_{upper}_EXPORTER", "").strip().lower()
        wanted = exporter == "otlp" or (not exporter and bool(base or own))
        if exporter not in ("", "otlp", "none"):
            log.warning("OTEL_%s_EXPORTER=%s is not supported (otlp or none): %s are not "
                        "exported", upper, exporter, signal)
        protocol = (env.get(f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL")
                    or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or PROTOCOL).strip()
        if wanted and protocol != PROTOCOL:
            return ExportPlan(problem=(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported: only {PROTOCOL} "
                "(OTLP over HTTP, port 4318): telemetry is not exported"))
        # a signal's own endpoint is used as it is; the base one gets the signal's path
        urls[signal] = (own or f"{(base or DEFAULT_ENDPOINT).rstrip('/')}/{path}") \
            if wanted else None
    try:
        interval = float(env.get("OTEL_METRIC_EXPORT_INTERVAL") or 60_000)
    except ValueError:
        interval = 60_000.0
    return ExportPlan(urls["traces"], urls["metrics"], max(interval, 50.0))


class Span(Protocol):
    def set_attribute(self, key: str, value: Any) -> None: ...


class Histogram(Protocol):
    def record(self, amount: float, attributes: Any = None) -> None: ...


class Counter(Protocol):
    def add(self, amount: float, attributes: Any = None) -> None: ...


class Signals(Protocol):
    """The part of Telemetry that records: OpenTelemetry's SDK, or trace ids alone."""

    @property
    def reconcile_duration(self) -> Histogram: ...

    @property
    def actions(self) -> Counter: ...

    @property
    def fetch_duration(self) -> Histogram: ...

    def span(self, name: str, attributes: dict[str, Any]) -> Any: ...

    def trace_id(self) -> str | None: ...

    def shutdown(self, timeout: float) -> None: ...


@dataclass
class _IdSpan:
    trace_id: int

    def set_attribute(self, key: str, value: Any) -> None:
        """Nothing records it."""


class _NoOpInstrument:
    def record(self, amount: float, attributes: Any = None) -> None:
        """Nothing reads it."""

    def add(self, amount: float, attributes: Any = None) -> None:
        """Nothing reads it."""


_CURRENT_SPAN: ContextVar[_IdSpan | None] = ContextVar("gitops_mesh_span", default=None)


class TraceIdsOnly:
    """Spans that are only trace ids: a random 128-bit id per outermost span, shared by the
    spans inside it (contextvars: asyncio tasks and to_thread calls inherit it), as the SDK's
    tracer would give; none at all with OTEL_SDK_DISABLED=true, as the SDK would."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.reconcile_duration = self.actions = self.fetch_duration = _NoOpInstrument()

    @contextmanager
    def span(self, name: str, attributes: dict[str, Any]) -> Iterator[_IdSpan | None]:
        if not self.enabled:
            yield None
            return
        parent = _CURRENT_SPAN.get()
        span = _IdSpan(parent.trace_id if parent is not None else _new_trace_id())
        token = _CURRENT_SPAN.set(span)
        try:
            yield span
        finally:
            _CURRENT_SPAN.reset(token)

    def trace_id(self) -> str | None:
        span = _CURRENT_SPAN.get()
        return format(span.trace_id, "032x") if span is not None else None

    def shutdown(self, timeout: float) -> None:
        """Nothing to flush."""


def _new_trace_id() -> int:
    trace_id = 0
    while trace_id == 0:  # 0 is the invalid trace id
        trace_id = random.getrandbits(128)
    return trace_id


class Telemetry:
    """Tracer + meter for one agent.

    Spans are always made so every event and status can carry a real trace id. OTLP/HTTP
    exporters are set up as the standard OTEL_* variables say (export_plan;
    docs/operations.md); tests pass their own in-memory exporter/reader. Providers are
    private to the agent (not the global ones), so several agents in one process
    (benchmarks, tests) do not fight over them."""

    def __init__(
        self,
        node_id: str,
        *,
        environ: Mapping[str, str] | None = None,
        span_exporter: SpanExporter | None = None,
        metric_reader: MetricReader | None = None,
        agent_version: str = "",
    ) -> None:
        env = os.environ if environ is None else environ
        plan = export_plan(env)
        if plan.problem:
            log.error("%s", plan.problem)
        self._phases: Mapping[str, int] = {}
        self._signals: Signals
        if span_exporter or metric_reader or plan.traces_url or plan.metrics_url:
            # the SDK only when something reads what it records
            from reconciler.node.otel import OtelSignals

            self._signals = OtelSignals(
                node_id, agent_version, env, plan, span_exporter=span_exporter,
                metric_reader=metric_reader, phases=lambda: self._phases)
        else:
            self._signals = TraceIdsOnly(
                enabled=env.get("OTEL_SDK_DISABLED", "").strip().lower() != "true")
        self.reconcile_duration: Histogram = self._signals.reconcile_duration
        self.actions: Counter = self._signals.actions
        self.fetch_duration: Histogram = self._signals.fetch_duration

    def set_phases(self, counts: Mapping[str, int]) -> None:
        """{phase: number of apps} now. The agent calls this on its loop after changes: the
        exporter collects on its own thread, which must not read the agent's store."""
        self._phases = dict(counts)

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Span | None]:
        clean = {k: v for k, v in attributes.items() if v is not None}
        with self._signals.span(name, clean) as span:
            yield span

    def trace_id(self) -> str | None:
        """Hex id of the current trace (the one the calling code runs in), or None."""
        return self._signals.trace_id()

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Flush and stop the exporters, waiting at most `timeout`: a collector that is
        unreachable costs that long and a warning, never a hung exit or a traceback."""
        self._signals.shutdown(timeout)
