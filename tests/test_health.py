"""Health probes against real servers and processes; the monitor's transitions; wait_healthy."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from reconciler.core.redact import mask_values as redact
from reconciler.core.spec import HealthSpec
from reconciler.core.states import Health
from reconciler.node.health import (
    HealthMonitor,
    HttpTarget,
    ProbeResult,
    http_target,
    next_health,
    probe,
    wait_healthy,
)
from tests.conftest import eventually_async, free_port

SECRET = "hunter2-secret-value"
ENV = {"PATH": "/usr/bin:/bin", "SECRET_TOKEN": SECRET}


def spec(**fields: object) -> HealthSpec:
    return HealthSpec.model_validate(fields)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real `python -m http.server` on a free port; yields the port."""
    root = tmp_path_factory.mktemp("www")
    (root / "index.html").write_text("ok")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
         "--directory", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    health = spec(tcp={"port": port})
    result = asyncio.run(wait_healthy(
        health, cwd=root, env=ENV, is_alive=lambda: server.poll() is None, timeout=15
    ))
    assert result.ok, result.message
    yield port
    server.terminate()
    server.wait(5)


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A server that accepts connections and never answers."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


# --- pure helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "offset", "expected"),
    [
        ("http://127.0.0.1:8080/healthz", 0,
         HttpTarget(False, "127.0.0.1", 8080, "/healthz", "127.0.0.1:8080", None,
                    "http://127.0.0.1:8080/healthz")),
        ("http://localhost:8080/ready?full=1", 100,
         HttpTarget(False, "localhost", 8180, "/ready?full=1", "localhost:8180", None,
                    "http://localhost:8180/ready?full=1")),
        ("http://example.test", 2,
         HttpTarget(False, "example.test", 82, "/", "example.test:82", None,
                    "http://example.test:82/")),
        ("https://u%40x:p%3Ass@[::1]/h", 0,
         HttpTarget(True, "::1", 443, "/h", "[::1]:443", "Basic dUB4OnA6c3M=",
                    "https://[::1]:443/h")),
    ],
)
def test_http_target(url: str, offset: int, expected: HttpTarget) -> None:
    assert http_target(url, offset) == expected


def test_http_target_rejects_an_offset_past_the_last_port() -> None:
    with pytest.raises(ValueError, match="port 65536 \\(with offset 1\\) is out of range"):
        http_target("http://127.0.0.1:65535/", 1)


@pytest.mark.parametrize(
    ("current", "failures", "ok", "expected"),
    [
        ("unknown", 0, True, ("healthy", 0)),
        ("unhealthy", 5, True, ("healthy", 0)),
        ("healthy", 0, False, ("healthy", 1)),
        ("healthy", 2, False, ("unhealthy", 3)),
        ("unknown", 0, False, ("unknown", 1)),
        ("unhealthy", 3, False, ("unhealthy", 4)),
    ],
)
def test_next_health(
    current: Health, failures: int, ok: bool, expected: tuple[Health, int]
) -> None:
    assert next_health(current, failures, ok, threshold=3) == expected


def test_redact_masks_env_values_not_short_ones() -> None:
    assert redact(f"token={SECRET} n=1 path=/usr/bin:/bin", {**ENV, "N": "1"}) == (
        "token=*** n=1 path=***"
    )


# --- probes ---------------------------------------------------------------------------------


async def test_http_probe(web: int, tmp_path: Path) -> None:
    async def run(url: str, offset: int = 0, **extra: object) -> tuple[bool, str]:
        result = await probe(
            spec(http={"url": url, **extra}), cwd=tmp_path, env=ENV, port_offset=offset
        )
        return result.ok, result.message

    base = f"http://127.0.0.1:{web}"
    assert await run(f"{base}/") == (True, f"GET {base}/: HTTP 200")
    assert await run(f"{base}/missing") == (
        False, f"GET {base}/missing: HTTP 404 (expected 200)"
    )
    assert await run(f"{base}/missing", expect_status=[404]) == (
        True, f"GET {base}/missing: HTTP 404"
    )
    # the node's port offset moves the probe to where this node's app listens
    assert await run(f"http://127.0.0.1:{web - 7}/", offset=7) == (True, f"GET {base}/: HTTP 200")
    tls_ok, tls_message = await run(f"https://127.0.0.1:{web}/")  # TLS to a plain server
    assert not tls_ok and tls_message.startswith(f"GET https://127.0.0.1:{web}/: "), tls_message
    closed = free_port()
    assert await run(f"http://127.0.0.1:{closed}/") == (
        False, f"GET http://127.0.0.1:{closed}/: connection refused"
    )


async def test_http_and_tcp_probes_time_out(silent_port: int, tmp_path: Path) -> None:
    http = await probe(spec(http={"url": f"http://127.0.0.1:{silent_port}/"}, timeout="200ms"),
                       cwd=tmp_path, env=ENV)
    assert (http.ok, http.message) == (False, "http probe timed out after 200ms")
    # a listener whose accept queue is full: Linux drops further SYNs, connect() hangs
    with socket.socket() as listener, socket.socket() as queued:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        queued.connect(listener.getsockname())
        tcp = await probe(spec(tcp={"port": listener.getsockname()[1]}, timeout="200ms"),
                          cwd=tmp_path, env=ENV)
    assert (tcp.ok, tcp.message) == (False, "tcp probe timed out after 200ms")


async def test_tcp_probe(web: int, tmp_path: Path) -> None:
    ok = await probe(spec(tcp={"port": web - 3}), cwd=tmp_path, env=ENV, port_offset=3)
    assert (ok.ok, ok.message) == (True, f"tcp 127.0.0.1:{web}: connected")
    closed = free_port()
    refused = await probe(spec(tcp={"port": closed}), cwd=tmp_path, env=ENV)
    assert (refused.ok, refused.message) == (False, f"tcp 127.0.0.1:{closed}: connection refused")


async def test_exec_probe(tmp_path: Path) -> None:
    async def run(*argv: str, timeout: str = "2s") -> ProbeResult:
        return await probe(spec(exec={"command": list(argv)}, timeout=timeout),
                           cwd=tmp_path, env=ENV)

    (tmp_path / "marker").write_text("")
    ok = await run("/bin/sh", "-c", "test -f marker && echo 'all   good'")
    assert (ok.ok, ok.message) == (True, "exec '/bin/sh': exit 0: all good")
    bad = await run("/bin/sh", "-c", "echo token=$SECRET_TOKEN; echo >&2 broken; exit 3")
    assert (bad.ok, bad.message) == (False, "exec '/bin/sh': exit 3: token=*** broken")
    missing = await run("/no/such/probe")
    assert (missing.ok, missing.message) == (
        False, "exec '/no/such/probe': cannot run: No such file or directory"
    )
    pidfile = tmp_path / "probe.pid"
    slow = await run("/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 30", timeout="300ms")
    assert (slow.ok, slow.message) == (False, "exec probe timed out after 300ms")
    assert not psutil.pid_exists(int(pidfile.read_text())) or (
        psutil.Process(int(pidfile.read_text())).status() == psutil.STATUS_ZOMBIE
    )


async def test_no_probe_is_ok(tmp_path: Path) -> None:
    result = await probe(HealthSpec(), cwd=tmp_path, env=ENV)
    assert (result.ok, result.message) == (True, "no probe configured")


# --- monitor --------------------------------------------------------------------------------


async def test_monitor_threshold_transitions(tmp_path: Path) -> None:
    changes: list[tuple[str, Health, Health, bool]] = []
    monitor = HealthMonitor(lambda app, old, new, r: changes.append((app, old, new, r.ok)))
    flag = tmp_path / "up"
    flag.write_text("")
    health = spec(exec={"command": ["/bin/sh", "-c", "test -f up"]}, interval="1h",
                  failure_threshold=3)
    # initial healthy: the schedule's first probe is an hour away, probe_now drives it
    monitor.start("api", health, cwd=tmp_path, env=ENV, initial="healthy")
    flag.unlink()
    for _ in range(2):
        assert not (await monitor.probe_now("api")).ok
    assert monitor.health("api") == "healthy" and changes == []  # below the threshold
    await monitor.probe_now("api")
    assert monitor.health("api") == "unhealthy"
    flag.write_text("")
    assert (await monitor.probe_now("api")).ok
    assert changes == [
        ("api", "healthy", "unhealthy", False), ("api", "unhealthy", "healthy", True)
    ]
    await monitor.stop("api")
    assert monitor.apps() == set() and monitor.health("api") == "unknown"
    with pytest.raises(KeyError):
        await monitor.probe_now("api")


async def test_monitor_probes_on_its_interval(web: int, tmp_path: Path) -> None:
    changes: list[tuple[str, Health, Health]] = []
    monitor = HealthMonitor(lambda app, old, new, _: changes.append((app, old, new)))
    closed = free_port()
    monitor.start("web", spec(tcp={"port": web}, interval="50ms"), cwd=tmp_path, env=ENV)
    monitor.start("down", spec(tcp={"port": closed}, interval="50ms", failure_threshold=2),
                  cwd=tmp_path, env=ENV)

    async def both_known() -> bool:
        return len(changes) == 2

    await eventually_async(both_known, timeout=10, what="both apps probed")
    assert sorted(changes) == [("down", "unknown", "unhealthy"), ("web", "unknown", "healthy")]
    result = monitor.last_result("down")
    assert result is not None and result.message == f"tcp 127.0.0.1:{closed}: connection refused"
    await monitor.close()
    assert monitor.apps() == set()


# --- wait_healthy ---------------------------------------------------------------------------


async def test_wait_healthy_sees_a_new_server_come_up(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        result = await wait_healthy(
            spec(http={"url": f"http://127.0.0.1:{port - 1}/"}, start_timeout="15s"),
            cwd=tmp_path, env=ENV, port_offset=1, is_alive=lambda: server.poll() is None,
        )
        assert (result.ok, result.message) == (True, f"GET http://127.0.0.1:{port}/: HTTP 200")
    finally:
        server.terminate()
        server.wait(5)


async def test_wait_healthy_fails_fast_when_the_process_dies(tmp_path: Path) -> None:
    app = subprocess.Popen(["/bin/sh", "-c", "sleep 0.2; exit 1"])
    closed = free_port()
    # a minute of start_timeout: returning at all within the test timeout shows it failed fast
    result = await wait_healthy(
        spec(tcp={"port": closed}, start_timeout="60s"), cwd=tmp_path, env=ENV,
        is_alive=lambda: app.poll() is None,
    )
    assert (result.ok, result.message) == (
        False,
        "the process exited before it became healthy: last probe: "
        f"tcp 127.0.0.1:{closed}: connection refused",
    )


async def test_wait_healthy_times_out(tmp_path: Path) -> None:
    closed = free_port()
    result = await wait_healthy(
        spec(tcp={"port": closed}), cwd=tmp_path, env=ENV, is_alive=lambda: True, timeout=0.3
    )
    assert (result.ok, result.message) == (
        False, f"not healthy within 300ms: tcp 127.0.0.1:{closed}: connection refused"
    )


async def test_an_exec_probe_that_prints_without_end_costs_no_memory(tmp_path: Path) -> None:
    """Its output was collected whole until the timeout (hundreds of MB a second)."""
    import psutil

    from reconciler.core.spec import HealthSpec
    from reconciler.node.health import OUTPUT_LIMIT

    spec = HealthSpec.model_validate(
        {"exec": {"command": ["/bin/cat", "/dev/zero"]}, "timeout": "1s"})
    before = psutil.Process().memory_info().rss
    result = await probe(spec, cwd=tmp_path, env=ENV)
    grown = psutil.Process().memory_info().rss - before
    assert not result.ok and "timed out" in result.message
    assert grown < 64 * 1024 * 1024, f"the probe's output grew the agent by {grown} bytes"
    assert len(result.message) < OUTPUT_LIMIT + 200
