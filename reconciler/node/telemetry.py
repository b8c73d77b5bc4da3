"""OpenTelemetry for the agent: spans, a few metrics, OTLP exporters only when asked."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from opentelemetry import metrics, trace

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


class Telemetry:
    """Tracer + meter for one agent.

    Spans are always recorded by an SDK tracer (without an exporter they cost little) so
    every event and status can carry a real trace id. OTLP/HTTP exporters are set up as the
    standard OTEL_* variables say (export_plan; docs/operations.md); tests pass their own
    in-memory exporter/reader. Providers are private to the agent (not the global ones), so
    several agents in one process (benchmarks, tests) do not fight over them."""

    def __init__(
        self,
        node_id: str,
        *,
        environ: Mapping[str, str] | None = None,
        span_exporter: SpanExporter | None = None,
        metric_reader: MetricReader | None = None,
        agent_version: str = "",
    ) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        env = os.environ if environ is None else environ
        resource = Resource.create(resource_attributes(node_id, agent_version, env))
        plan = export_plan(env)
        if plan.problem:
            log.error("%s", plan.problem)
        # we shut down ourselves, bounded (shutdown()); the SDK's atexit hook would not be
        self._tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        batch = span_exporter is None and plan.traces_url is not None
        if batch:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            span_exporter = OTLPSpanExporter(endpoint=plan.traces_url)
        if span_exporter is not None:
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

            processor = (BatchSpanProcessor(span_exporter) if batch
                         else SimpleSpanProcessor(span_exporter))
            self._tracer_provider.add_span_processor(processor)
        self.tracer = self._tracer_provider.get_tracer(INSTRUMENTATION, agent_version)

        readers: list[MetricReader] = []
        if metric_reader is not None:
            readers.append(metric_reader)
        elif plan.metrics_url is not None:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers.append(PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=plan.metrics_url),
                export_interval_millis=plan.metrics_interval_ms))
        if plan.traces_url or plan.metrics_url:
            log.info("OpenTelemetry: exporting %s over OTLP/HTTP as service %r",
                     " and ".join(f"{name} to {url}" for name, url in
                                  (("traces", plan.traces_url), ("metrics", plan.metrics_url))
                                  if url),
                     resource.attributes.get("service.name"))
        self._meter_provider: Any = None
        if readers:
            from opentelemetry.sdk.metrics import MeterProvider

            self._meter_provider = MeterProvider(resource=resource, metric_readers=readers,
                                                 shutdown_on_exit=False)
            meter = self._meter_provider.get_meter(INSTRUMENTATION, agent_version)
        else:
            # nothing would read the numbers: the API's no-op meter costs nothing
            meter = metrics.NoOpMeter(INSTRUMENTATION)
        self.reconcile_duration = meter.create_histogram(
            "gitops.reconcile.duration", unit="s", description="duration of one reconcile",
        )
        self.actions = meter.create_counter(
            "gitops.actions", description="actions applied, by kind and outcome",
        )
        self.fetch_duration = meter.create_histogram(
            "gitops.git.fetch.duration", unit="s", description="git ls-remote + fetch time",
        )
        self._phases: Mapping[str, int] = {}
        meter.create_observable_gauge(
            "gitops.apps", callbacks=[self._observe_phases],
            description="apps on this node by phase",
        )

    def set_phases(self, counts: Mapping[str, int]) -> None:
        """{phase: number of apps} now. The agent calls this on its loop after changes: the
        exporter collects on its own thread, which must not read the agent's store."""
        self._phases = dict(counts)

    def _observe_phases(self, _options: Any) -> Iterator[metrics.Observation]:
        for phase, count in sorted(self._phases.items()):
            yield metrics.Observation(count, {"phase": phase})

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[trace.Span]:
        clean = {k: v for k, v in attributes.items() if v is not None}
        with self.tracer.start_as_current_span(name, attributes=clean) as span:
            yield span

    @staticmethod
    def trace_id() -> str | None:
        """Hex id of the current trace (the one the calling code runs in), or None."""
        ctx = trace.get_current_span().get_span_context()
        return format(ctx.trace_id, "032x") if ctx.is_valid else None

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Flush and stop the exporters, waiting at most `timeout`: a collector that is
        unreachable costs that long and a warning, never a hung exit or a traceback."""
        def stop() -> None:
            try:
                self._tracer_provider.shutdown()
                if self._meter_provider is not None:
                    self._meter_provider.shutdown(timeout_millis=timeout * 1000)
            except Exception as exc:  # an exporter's failure is not the agent's
                log.warning("OpenTelemetry shutdown: %s: %s", type(exc).__name__, exc)

        worker = threading.Thread(target=stop, name="otel-shutdown", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            log.warning("OpenTelemetry: the exporters did not finish within %gs (is the "
                        "collector reachable?); what was not sent is dropped", timeout)
