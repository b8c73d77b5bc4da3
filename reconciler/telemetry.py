"""OpenTelemetry for the agent: spans, a few metrics, OTLP exporters only when asked."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace.export import SpanExporter

OTLP_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
INSTRUMENTATION = "gitops-mesh.agent"


class Telemetry:
    """Tracer + meter for one agent.

    Spans are always recorded by an SDK tracer (without an exporter they cost little) so
    every event and status can carry a real trace id. Exporters (OTLP over http/protobuf)
    are set up only when OTEL_EXPORTER_OTLP_ENDPOINT is set; tests pass their own in-memory
    exporter/reader. Providers are private to the agent (not the global ones), so several
    agents in one process (benchmarks, tests) do not fight over them."""

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
        resource = Resource.create({
            "service.name": "gitops-mesh-node", "service.instance.id": node_id,
            "service.version": agent_version,
        })
        self._tracer_provider = TracerProvider(resource=resource)
        otlp = bool(env.get(OTLP_ENV))
        if span_exporter is None and otlp:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            span_exporter = OTLPSpanExporter()
        if span_exporter is not None:
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

            processor = (BatchSpanProcessor(span_exporter) if otlp
                         else SimpleSpanProcessor(span_exporter))
            self._tracer_provider.add_span_processor(processor)
        self.tracer = self._tracer_provider.get_tracer(INSTRUMENTATION, agent_version)

        readers: list[MetricReader] = []
        if metric_reader is not None:
            readers.append(metric_reader)
        elif otlp:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        self._meter_provider: Any = None
        if readers:
            from opentelemetry.sdk.metrics import MeterProvider

            self._meter_provider = MeterProvider(resource=resource, metric_readers=readers)
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
        self._phase_counts: Callable[[], Mapping[str, int]] = dict
        meter.create_observable_gauge(
            "gitops.apps", callbacks=[self._observe_phases],
            description="apps on this node by phase",
        )

    def set_phase_source(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """`counts()` -> {phase: number of apps}; read whenever metrics are collected."""
        self._phase_counts = counts

    def _observe_phases(self, _options: Any) -> Iterator[metrics.Observation]:
        for phase, count in sorted(self._phase_counts().items()):
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

    def shutdown(self) -> None:
        self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()
