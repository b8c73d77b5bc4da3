"""OpenTelemetry export by the standard OTEL_* variables, against a real OTLP/HTTP receiver:
a small http.server that records the POSTs and decodes them with opentelemetry-proto."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import SpecRepo, eventually, make_spec_repo
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from reconciler.node.telemetry import ExportPlan, export_plan, resource_attributes

PY = sys.executable


@dataclass
class Receiver:
    """Records OTLP/HTTP requests by path; answers 200 with an empty protobuf response."""

    url: str = ""
    posts: list[tuple[str, str, bytes]] = field(default_factory=list)  # path, type, body

    def traces(self) -> list[ExportTraceServiceRequest]:
        return [ExportTraceServiceRequest.FromString(body)
                for path, _, body in self.posts if path == "/v1/traces"]

    def metrics(self) -> list[ExportMetricsServiceRequest]:
        return [ExportMetricsServiceRequest.FromString(body)
                for path, _, body in self.posts if path == "/v1/metrics"]

    def span_names(self) -> set[str]:
        return {span.name for req in self.traces() for rs in req.resource_spans
                for ss in rs.scope_spans for span in ss.spans}

    def metric_names(self) -> set[str]:
        return {m.name for req in self.metrics() for rm in req.resource_metrics
                for sm in rm.scope_metrics for m in sm.metrics}

    def resources(self) -> list[dict[str, Any]]:
        found = [rs.resource for req in self.traces() for rs in req.resource_spans]
        found += [rm.resource for req in self.metrics() for rm in req.resource_metrics]
        return [{a.key: a.value.string_value for a in r.attributes} for r in found]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    received = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.posts.append((self.path, self.headers.get("Content-Type", ""), body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    received.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield received
    server.shutdown()
    server.server_close()


@pytest.fixture
def repo(tmp_path: Path) -> SpecRepo:
    app = (f"name: web\nversion: \"1\"\nrun:\n  command: [{json.dumps(PY)}, \"-c\", "
           f"{json.dumps('import signal; signal.pause()')}]\n")
    return make_spec_repo(tmp_path / "specs", {"apps/web.yaml": app})


def node_env(**otel: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "GITOPS_MESH_"))}
    return {**env, **otel}


def node(repo: SpecRepo, state: Path, *extra: str) -> list[str]:
    return [PY, "-m", "reconciler", "node", "--repo", repo.url, "--node-id", "otel1",
            "--state-dir", str(state), "--stop-apps-on-exit", *extra]


def once(repo: SpecRepo, state: Path, **otel: str) -> subprocess.CompletedProcess[str]:
    """`node --once` with these OTEL_* variables (and no others from this environment)."""
    return subprocess.run(node(repo, state, "--once"), capture_output=True, text=True,
                          timeout=60, env=node_env(**otel))


def test_spans_metrics_and_resource_reach_an_otlp_http_receiver(
    receiver: Receiver, repo: SpecRepo, tmp_path: Path
) -> None:
    done = once(repo, tmp_path / "state", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
                OTEL_SERVICE_NAME="edge-agent",
                OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test,site=b%20c",
                OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert {"reconcile", "action"} <= receiver.span_names()
    assert {"gitops.reconcile.duration", "gitops.actions", "gitops.git.fetch.duration",
            "gitops.apps"} <= receiver.metric_names()
    assert {t for _, t, _ in receiver.posts} == {"application/x-protobuf"}
    for resource in receiver.resources():
        assert resource["service.name"] == "edge-agent"
        assert resource["service.instance.id"] == "otel1"
        assert resource["deployment.environment"] == "test"
        assert resource["site"] == "b c"


def test_a_running_agent_stops_without_a_traceback(
    receiver: Receiver, repo: SpecRepo, tmp_path: Path
) -> None:
    """The phase gauge was read from the exporter's thread (the store is the loop's):
    every collection, and the last one at shutdown, logged a traceback."""
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            node(repo, tmp_path / "state", "--interval", "300ms"), stdout=out, stderr=out,
            env=node_env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
                         OTEL_METRIC_EXPORT_INTERVAL="200"))
    try:
        eventually(lambda: "app.deployed web" in log.read_text(), timeout=30)
        eventually(lambda: len(receiver.metrics()) >= 2, timeout=30,
                   what="periodic metric exports while running")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    text = log.read_text()
    assert "Traceback" not in text and "Callback failed" not in text, text[-3000:]
    phases = {dp.as_int for req in receiver.metrics() for rm in req.resource_metrics
              for sm in rm.scope_metrics for m in sm.metrics if m.name == "gitops.apps"
              for dp in m.gauge.data_points}
    assert 1 in phases  # one app, running


def test_exporters_are_chosen_by_the_otel_variables(
    receiver: Receiver, repo: SpecRepo, tmp_path: Path
) -> None:
    done = once(repo, tmp_path / "s1", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
                OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="otlp")
    assert done.returncode == 0, done.stderr
    assert receiver.traces() == [] and receiver.metrics()
    receiver.posts.clear()
    done = once(repo, tmp_path / "s2", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
                OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    assert done.returncode == 0, done.stderr
    assert "OTEL_EXPORTER_OTLP_PROTOCOL" in done.stderr and "http/protobuf" in done.stderr
    assert receiver.posts == []  # nothing sent in a protocol the receiver did not ask for


@pytest.mark.parametrize(("env", "plan"), [
    ({}, ExportPlan()),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"},
     ExportPlan("http://c:4318/v1/traces", "http://c:4318/v1/metrics")),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, ExportPlan("http://localhost:4318/v1/traces", None)),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_METRICS_EXPORTER": "none",
      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9/custom"},
     ExportPlan("http://t:9/custom", None)),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_METRIC_EXPORT_INTERVAL": "250"},
     ExportPlan("http://c:4318/v1/traces", "http://c:4318/v1/metrics", 250.0)),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"},
     ExportPlan()),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "zipkin"},
     ExportPlan(None, "http://c:4318/v1/metrics")),
])
def test_export_plan_follows_the_standard_variables(env: dict[str, str],
                                                    plan: ExportPlan) -> None:
    assert export_plan(env) == plan


def test_unsupported_protocols_turn_export_off_saying_why() -> None:
    for key in ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"):
        plan = export_plan({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", key: "grpc"})
        assert (plan.traces_url, plan.metrics_url) == (None, None)
        assert plan.problem is not None and "only http/protobuf" in plan.problem


def test_resource_attributes_let_the_operator_win() -> None:
    assert resource_attributes("n1", "0.1.0", {}) == {
        "service.name": "gitops-mesh-node", "service.instance.id": "n1",
        "service.version": "0.1.0"}
    assert resource_attributes("n1", "0.1.0", {
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=x,host.name=h%2C1,bad",
        "OTEL_SERVICE_NAME": "edge"}) == {
        "service.name": "edge", "service.instance.id": "n1", "service.version": "0.1.0",
        "host.name": "h,1"}
