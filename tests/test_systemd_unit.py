"""The shipped systemd unit passes `systemd-analyze verify` and the example config is usable."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.cli.main import parse_args

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "gitops-mesh-node.service"
NODE_YAML = ROOT / "deploy" / "node.yaml"


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_systemd_analyze_verify_passes_without_warnings(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (.ci/run installs the systemd package)")
    # verify checks that ExecStart's binary exists: point it at this venv's console script.
    binary = Path(sys.executable).parent / "gitops-mesh"
    assert binary.exists(), f"{binary}: install the project (pip install -e .)"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/gitops-mesh " in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("ExecStart=/usr/local/bin/gitops-mesh ", f"ExecStart={binary} "))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_unit_runs_the_agent_the_way_the_agent_expects() -> None:
    d = _directives(UNIT.read_text())
    expected = {
        "Type": ["notify"],  # READY=1 after the first reconcile (reconciler/sdnotify.py)
        "NotifyAccess": ["main"],
        "KillMode": ["process"],  # apps survive agent restarts and are adopted
        "Restart": ["on-failure"],
        "StateDirectory": ["gitops-mesh"],  # /var/lib/gitops-mesh = the CLI's default
        "EnvironmentFile": ["-/etc/gitops-mesh/node.env"],
        "ExecStart": ["/usr/local/bin/gitops-mesh --config /etc/gitops-mesh/node.yaml node"],
        "NoNewPrivileges": ["yes"],
    }
    assert {key: d.get(key) for key in expected} == expected
    assert "WatchdogSec" in d
    # A private /tmp would be deleted under apps that outlive the agent.
    assert "PrivateTmp" not in d


def test_example_node_yaml_gives_every_option_the_node_command_needs() -> None:
    args = parse_args(["--config", str(NODE_YAML), "node"])
    assert (args.command, args.node_id, args.label, args.state_dir, args.stop_apps_on_exit) == (
        "node", "edge-01", ["role=edge", "site=fra1"], "/var/lib/gitops-mesh", False,
    )
    assert args.repo.endswith(".git")
    # the command line still wins over the file
    override = parse_args(["--config", str(NODE_YAML), "node", "--node-id", "edge-02"])
    assert override.node_id == "edge-02"
