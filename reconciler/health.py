"""Health probes (http, tcp, exec), per-app periodic monitoring, and waiting until healthy.

The node-level port offset (`--port-offset`, exported to apps as GITOPS_PORT_OFFSET) is added
to a tcp probe's port and to the port of an http probe's URL, so the same spec can run several
times on one host (the demo runs three nodes side by side).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from reconciler.spec import ExecProbe, HealthSpec, HttpProbe, TcpProbe, format_duration
from reconciler.state import Health

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 300  # characters of an exec probe's output kept in its message
REDACT_MIN_LEN = 6  # env values at least this long are masked in probe output
# wait_healthy re-probes every FAST_POLL (EXEC_POLL for exec probes, which spawn a process)
# during the first FAST_PHASE seconds, where most apps come up, then backs off x1.5 to POLL_CAP
FAST_POLL = 0.025
EXEC_POLL = 0.1
FAST_PHASE = 1.0
POLL_CAP = 1.0
ALIVE_CHECK = 0.05  # wait_healthy checks that the process still runs this often


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    message: str
    duration_ms: float


# --- pure helpers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpTarget:
    """Where an http probe connects, after the port offset; `display` has no credentials."""

    tls: bool
    host: str
    port: int
    request_target: str
    host_header: str
    authorization: str | None
    display: str


def http_target(url: str, port_offset: int = 0) -> HttpTarget:
    """Parse a probe URL and apply the port offset (default ports 80/443 count as given)."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = (parts.port or (443 if tls else 80)) + port_offset
    if not 0 < port < 65536:
        raise ValueError(f"port {port} (with offset {port_offset}) is out of range")
    host = parts.hostname
    netloc_host = f"[{host}]" if ":" in host else host
    host_header = f"{netloc_host}:{port}"
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode()
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return HttpTarget(
        tls=tls,
        host=host,
        port=port,
        request_target=target,
        host_header=host_header,
        authorization=authorization,
        display=f"{parts.scheme}://{host_header}{target}",
    )


def next_health(current: Health, failures: int, ok: bool, threshold: int) -> tuple[Health, int]:
    """(health, consecutive failures) after one probe: one success is healthy, `threshold`
    consecutive failures are unhealthy; fewer keep the current health."""
    if ok:
        return "healthy", 0
    failures += 1
    return ("unhealthy" if failures >= threshold else current), failures


def redact(text: str, env: Mapping[str, str]) -> str:
    """Mask env values (secrets among them) that a probe's output may echo."""
    for value in sorted(env.values(), key=len, reverse=True):
        if len(value) >= REDACT_MIN_LEN:
            text = text.replace(value, "***")
    return text


def _os_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return "connection refused"
    return exc.strerror or str(exc) or type(exc).__name__


# --- probes -------------------------------------------------------------------------------------


async def probe(
    health: HealthSpec, *, cwd: Path, env: Mapping[str, str], port_offset: int = 0
) -> ProbeResult:
    """Run the spec's probe once, bounded by its timeout. No probe configured: ok."""
    started = time.perf_counter()
    kind = health.probe_kind
    try:
        async with asyncio.timeout(health.timeout):
            if health.http is not None:
                ok, message = await _http(health.http, port_offset)
            elif health.tcp is not None:
                ok, message = await _tcp(health.tcp, port_offset)
            elif health.exec is not None:
                ok, message = await _exec(health.exec, cwd, env)
            else:
                ok, message = True, "no probe configured"
    except TimeoutError:
        ok, message = False, f"{kind} probe timed out after {format_duration(health.timeout)}"
    except (OSError, ValueError, UnicodeError, ssl.SSLError) as exc:  # a failed probe is data
        ok, message = False, f"{kind} probe failed: {exc}"
    return ProbeResult(ok, message, (time.perf_counter() - started) * 1000)


async def _http(spec: HttpProbe, port_offset: int) -> tuple[bool, str]:
    try:
        target = http_target(spec.url, port_offset)
    except ValueError as exc:
        return False, f"http probe: {exc}"
    context: ssl.SSLContext | None = None
    if target.tls:
        # Like Kubernetes' httpGet probes: a local health endpoint's certificate is not checked.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    request = (
        f"GET {target.request_target} HTTP/1.1\r\nHost: {target.host_header}\r\n"
        "User-Agent: gitops-mesh-probe\r\nAccept: */*\r\nConnection: close\r\n"
    )
    if target.authorization:
        request += f"Authorization: {target.authorization}\r\n"
    try:
        reader, writer = await asyncio.open_connection(target.host, target.port, ssl=context)
    except OSError as exc:
        return False, f"GET {target.display}: {_os_error(exc)}"
    try:
        writer.write((request + "\r\n").encode("latin-1"))
        await writer.drain()
        status_line = (await reader.readline()).decode("latin-1").strip()
    except OSError as exc:
        return False, f"GET {target.display}: {_os_error(exc)}"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    fields = status_line.split(maxsplit=2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        return False, f"GET {target.display}: not an HTTP response: {status_line[:80]!r}"
    status = int(fields[1])
    if status in spec.expect_status:
        return True, f"GET {target.display}: HTTP {status}"
    expected = ", ".join(str(code) for code in spec.expect_status)
    return False, f"GET {target.display}: HTTP {status} (expected {expected})"


async def _tcp(spec: TcpProbe, port_offset: int) -> tuple[bool, str]:
    port = spec.port + port_offset
    where = f"tcp {spec.host}:{port}"
    if not 0 < port < 65536:
        return False, f"{where}: port out of range (offset {port_offset})"
    try:
        _, writer = await asyncio.open_connection(spec.host, port)
    except OSError as exc:
        return False, f"{where}: {_os_error(exc)}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, f"{where}: connected"


async def _exec(spec: ExecProbe, cwd: Path, env: Mapping[str, str]) -> tuple[bool, str]:
    program = spec.command[0]
    try:
        proc = await asyncio.create_subprocess_exec(
            *spec.command,
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # a timeout kills the probe's whole group
        )
    except OSError as exc:
        return False, f"exec {program!r}: cannot run: {exc.strerror or exc}"
    try:
        output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:  # cancelled by the timeout
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
    text = " ".join(redact(output.decode(errors="replace"), env).split())
    if len(text) > OUTPUT_LIMIT:
        text = "..." + text[-OUTPUT_LIMIT:]
    code = await proc.wait()  # already exited: this only reads the code
    summary = f"exec {program!r}: exit {code}" if code >= 0 else (
        f"exec {program!r}: killed by signal {-code}"
    )
    return code == 0, f"{summary}: {text}" if text else summary


# --- waiting for a new process --------------------------------------------------------------


async def wait_healthy(
    health: HealthSpec,
    *,
    cwd: Path,
    env: Mapping[str, str],
    port_offset: int = 0,
    is_alive: Callable[[], bool],
    timeout: float | None = None,
) -> ProbeResult:
    """Probe until one passes, the process dies (fail fast) or `timeout` (default: the spec's
    start_timeout) passes. Re-probes every 25 ms (exec: 100 ms) for the first second, then
    backs off to min(interval, 1 s): the first passing probe decides push-to-healthy
    latency. `duration_ms` is the whole wait."""
    limit = health.start_timeout if timeout is None else timeout
    started = time.monotonic()
    deadline = started + limit
    delay = EXEC_POLL if health.exec is not None else FAST_POLL
    cap = max(delay, min(health.interval, POLL_CAP))

    def result(ok: bool, message: str) -> ProbeResult:
        return ProbeResult(ok, message, (time.monotonic() - started) * 1000)

    last: ProbeResult | None = None
    while True:
        if not is_alive():
            why = f": last probe: {last.message}" if last else ""
            return result(False, f"the process exited before it became healthy{why}")
        remaining = deadline - time.monotonic()
        spec = health
        if remaining < health.timeout:  # the last probe must not run past the deadline
            spec = health.model_copy(update={"timeout": max(remaining, 0.01)})
        last = await probe(spec, cwd=cwd, env=env, port_offset=port_offset)
        if last.ok:
            return result(True, last.message)
        if time.monotonic() >= deadline:
            return result(
                False, f"not healthy within {format_duration(limit)}: {last.message}"
            )
        wake = min(time.monotonic() + delay, deadline)
        while time.monotonic() < wake:
            if not is_alive():
                break
            await asyncio.sleep(min(ALIVE_CHECK, max(0.0, wake - time.monotonic())))
        if time.monotonic() - started >= FAST_PHASE:
            delay = min(delay * 1.5, cap)


# --- periodic monitoring ----------------------------------------------------------------------

HealthChange = Callable[[str, Health, Health, ProbeResult], None]


@dataclass
class _Watch:
    health: HealthSpec
    cwd: Path
    env: Mapping[str, str]
    port_offset: int
    state: Health
    failures: int = 0
    last: ProbeResult | None = None
    task: asyncio.Task[None] | None = None


class HealthMonitor:
    """Probes each started app every `interval`; calls `on_change(app, old, new, result)` on
    every transition (`failure_threshold` consecutive failures -> unhealthy, one success ->
    healthy). Runs on the event loop; `on_change` is called there too."""

    def __init__(self, on_change: HealthChange) -> None:
        self._on_change = on_change
        self._watches: dict[str, _Watch] = {}

    def start(
        self,
        app: str,
        health: HealthSpec,
        *,
        cwd: Path,
        env: Mapping[str, str],
        port_offset: int = 0,
        initial: Health = "unknown",
    ) -> None:
        """Start (or restart, replacing the old spec) probing `app`. With initial="healthy"
        (e.g. right after wait_healthy passed) the first probe waits one interval."""
        old = self._watches.pop(app, None)
        if old is not None and old.task is not None:
            old.task.cancel()
        watch = _Watch(health, cwd, env, port_offset, initial)
        watch.task = asyncio.get_running_loop().create_task(
            self._run(app, watch), name=f"health-{app}"
        )
        self._watches[app] = watch

    async def stop(self, app: str) -> None:
        watch = self._watches.pop(app, None)
        if watch is not None and watch.task is not None:
            watch.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch.task

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(app) for app in list(self._watches)))

    def apps(self) -> set[str]:
        return set(self._watches)

    def health(self, app: str) -> Health:
        watch = self._watches.get(app)
        return watch.state if watch else "unknown"

    def last_result(self, app: str) -> ProbeResult | None:
        watch = self._watches.get(app)
        return watch.last if watch else None

    async def probe_now(self, app: str) -> ProbeResult:
        """Probe at once (outside the schedule) and apply the result; KeyError if `app` is
        not monitored."""
        watch = self._watches.get(app)
        if watch is None:
            raise KeyError(f"{app}: not monitored")
        return await self._probe(app, watch)

    async def _run(self, app: str, watch: _Watch) -> None:
        interval = max(watch.health.interval, 0.05)
        if watch.state == "healthy":
            await asyncio.sleep(interval)
        while True:
            await self._probe(app, watch)
            await asyncio.sleep(interval)

    async def _probe(self, app: str, watch: _Watch) -> ProbeResult:
        result = await probe(
            watch.health, cwd=watch.cwd, env=watch.env, port_offset=watch.port_offset
        )
        if self._watches.get(app) is not watch:
            return result  # stopped or replaced meanwhile: not ours to report
        old = watch.state
        watch.state, watch.failures = next_health(
            old, watch.failures, result.ok, watch.health.failure_threshold
        )
        watch.last = result
        if watch.state != old:
            try:
                self._on_change(app, old, watch.state, result)
            except Exception:  # a listener bug must not stop the probing
                log.exception("health on_change for %s failed", app)
        return result
