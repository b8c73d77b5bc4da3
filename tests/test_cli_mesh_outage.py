"""`gitops-mesh wait` when the NATS server goes away mid-wait: a clear verdict, no traceback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import nats
import psutil

from reconciler.core.status import NodeStatus
from reconciler.mesh.subjects import KV_BUCKET
from tests.conftest import eventually, start_nats


async def _report_old_revision(url: str) -> None:
    nc = await nats.connect(url)
    kv = await nc.jetstream().create_key_value(bucket=KV_BUCKET)
    status = NodeStatus(node="n1", revision="a" * 40, status="synced",
                        updated_at=datetime.now(UTC).isoformat())
    await kv.put("n1", status.to_json_bytes())
    await nc.close()


def _connected(pid: int, port: int) -> bool:
    return any(
        conn.raddr and conn.raddr.port == port and conn.status == psutil.CONN_ESTABLISHED
        for conn in psutil.Process(pid).net_connections()
    )


def test_wait_survives_the_server_going_away(tmp_path: Path) -> None:
    server = start_nats(tmp_path)
    try:
        asyncio.run(_report_old_revision(server.url))
        wait = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "wait", "--nats", server.url,
             "--revision", "b" * 40, "--timeout", "4s"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        # n1 still reports the old revision, so wait keeps waiting; then the server dies
        eventually(lambda: _connected(wait.pid, server.port), timeout=10,
                   what="wait connected to NATS")
        time.sleep(0.5)  # let it start watching the bucket
        server.stop()
        out, err = wait.communicate(timeout=30)
    finally:
        server.stop()
    assert wait.returncode == 2, (out, err)  # timeout / unreachable mesh, not a failed node
    assert "Traceback" not in err
    assert "n1" in err  # names the node that did not get there
