"""The OpenTelemetry SDK behind Telemetry, when something reads its signals (OTLP export, or
a test's exporter or reader): tracer and meter providers private to one agent. I/O shell."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

from reconciler.node.telemetry import INSTRUMENTATION, ExportPlan, resource_attributes

log = logging.getLogger(__name__)


class OtelSignals:
    """Spans through an SDK tracer and the agent's metrics through an SDK meter (a no-op
    meter when only spans are read). `phases` gives the current {phase: apps} for the
    `gitops.apps` gauge, read on the exporter's thread."""

    def __init__(
        self, node_id: str, agent_version: str, env: Mapping[str, str], plan: ExportPlan, *,
        span_exporter: SpanExporter | None, metric_reader: MetricReader | None,
        phases: Callable[[], Mapping[str, int]],
    ) -> None:
        resource = Resource.create(resource_attributes(node_id, agent_version, env))
        self._phases = phases
        # we shut down ourselves, bounded (shutdown()); the SDK's atexit hook would not be
        self._tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        batch = span_exporter is None and plan.traces_url is not None
        if batch:
            span_exporter = OTLPSpanExporter(endpoint=plan.traces_url)
        if span_exporter is not None:
            processor = (BatchSpanProcessor(span_exporter) if batch
                         else SimpleSpanProcessor(span_exporter))
            self._tracer_provider.add_span_processor(processor)
        self.tracer = self._tracer_provider.get_tracer(INSTRUMENTATION, agent_version)

        readers: list[MetricReader] = []
        if metric_reader is not None:
            readers.append(metric_reader)
        elif plan.metrics_url is not None:
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
        meter.create_observable_gauge(
            "gitops.apps", callbacks=[self._observe_phases],
            description="apps on this node by phase",
        )

    def _observe_phases(self, _options: Any) -> Iterator[metrics.Observation]:
        for phase, count in sorted(self._phases().items()):
            yield metrics.Observation(count, {"phase": phase})

    @contextmanager
    def span(self, name: str, attributes: dict[str, Any]) -> Iterator[trace.Span]:
        with self.tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def trace_id(self) -> str | None:
        ctx = trace.get_current_span().get_span_context()
        return format(ctx.trace_id, "032x") if ctx.is_valid else None

    def shutdown(self, timeout: float) -> None:
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
