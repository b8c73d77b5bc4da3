"""A 3-server JetStream cluster on loopback, run from deploy/nats/cluster/nats.conf with the
auth `gitops-mesh nats-config` writes (tests and bench)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
from conftest import ConfiguredServer, free_port, sample_config

ROUTES = """  routes: [
    nats-route://nats-1:6222
    nats-route://nats-2:6222
    nats-route://nats-3:6222
  ]"""


@dataclass
class ClusterServer(ConfiguredServer):
    name: str = ""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    root: Path
    auth: Path  # nats-config's output: <identity>.nk / .env
    servers: list[ClusterServer] = field(default_factory=list)

    @property
    def urls(self) -> str:
        return ",".join(s.url for s in self.servers)

    def server(self, name: str) -> ClusterServer:
        return next(s for s in self.servers if s.name == name)

    def env(self, identity: str) -> dict[str, str]:
        """The environment a process of `identity` runs with (GITOPS_MESH_NATS_NKEY=...)."""
        clean = {k: v for k, v in os.environ.items() if not k.startswith("GITOPS_MESH_")}
        text = (self.auth / f"{identity}.env").read_text()
        return {**clean, **dict(line.split("=", 1) for line in text.splitlines())}

    def nkey(self, identity: str) -> str:
        return str(self.auth / f"{identity}.nk")

    async def connect(self, identity: str, **kw: Any) -> nats.NATS:
        return await nats.connect(self.urls.split(","), nkeys_seed=self.nkey(identity),
                                  inbox_prefix=f"_INBOX.{identity}".encode()
                                  if identity not in ("admin", "console", "observer") else
                                  b"_INBOX", **kw)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def gitops(self, identity: str, *args: str, timeout: float = 60
               ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "reconciler", *args, "--nats", self.urls],
                              capture_output=True, text=True, timeout=timeout,
                              env=self.env(identity))


def start_cluster(root: Path, nodes: list[str]) -> Cluster:
    """nats-config for `nodes`, three servers from the sample, JetStream ready to take R3."""
    auth = root / "auth"
    subprocess.run([sys.executable, "-m", "reconciler", "nats-config", "--out", str(auth),
                    *(a for n in nodes for a in ("--node", n))],
                   check=True, capture_output=True)
    cluster = Cluster(root, auth)
    ports = [(free_port(), free_port()) for _ in range(3)]
    routes = "\n".join(["  routes: ["] + [f"    nats-route://127.0.0.1:{r}" for _, r in ports]
                       + ["  ]"])
    for i, (port, route) in enumerate(ports, start=1):
        home = root / f"nats-{i}"
        home.mkdir()
        shutil.copy(auth / "auth.conf", home / "auth.conf")
        (home / "nats.conf").write_text(sample_config("cluster/nats.conf", {
            "listen: 0.0.0.0:4222": f"listen: 127.0.0.1:{port}",
            "listen: 0.0.0.0:6222": f"listen: 127.0.0.1:{route}",
            "http: 127.0.0.1:8222": "# http: off in tests",
            "store_dir: /var/lib/nats": f"store_dir: {json.dumps(str(home / 'js'))}",
            ROUTES: routes,
        }))
        env = {**os.environ, "NATS_SERVER_NAME": f"nats-{i}"}
        cluster.servers.append(ClusterServer(home / "nats.conf", port, env, name=f"nats-{i}"))
    for server in cluster.servers:
        server.start()
    try:
        asyncio.run(_jetstream_ready(cluster))
    except BaseException:
        cluster.stop()
        raise
    return cluster


async def _jetstream_ready(cluster: Cluster, timeout: float = 30.0) -> None:
    """Every server routed to the others and a JetStream meta leader elected."""
    deadline = time.monotonic() + timeout
    nc = await cluster.connect("admin")
    try:
        while True:
            try:
                info = await nc.jetstream().account_info()
                if info is not None and len(_connect_urls(cluster.servers[0])) >= 3:
                    return
            except (nats.errors.Error, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster's JetStream did not become ready")
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


def _connect_urls(server: ClusterServer) -> list[str]:
    """The cluster members a server announces now, from a fresh INFO line."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        line = sock.makefile("rb").readline()
    info = json.loads(line.removeprefix(b"INFO ")) if line.startswith(b"INFO ") else {}
    return list(info.get("connect_urls") or [])


async def stream_leader(nc: nats.NATS, stream: str) -> str:
    info = await nc.jetstream().stream_info(stream)
    assert info.cluster is not None and info.cluster.leader
    return str(info.cluster.leader)
