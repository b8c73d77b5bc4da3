"""validate / schema / plan as a user runs them, and the specs-example stack they ship."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.cli.main import parse_args, resolve_handler
from reconciler.core.loader import SpecFile, load_files
from reconciler.node.spec_dir import load_directory, read_directory
from tests.conftest import eventually, free_port, make_spec_repo

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "specs-example"
STACK_ORDER = [["broker", "database", "metrics-agent"], ["api"], ["gateway", "worker"]]


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str) -> Ran:
    """The command in this process: real argument parsing (config/env defaults included)
    and the real handler, without paying a Python start per call."""
    out, err = io.StringIO(), io.StringIO()
    parsed = parse_args(list(args))
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = resolve_handler(parsed.command)(parsed)
    return Ran(code, out.getvalue(), err.getvalue())


def test_validate_specs_example_is_clean() -> None:
    """Once as a user types it: `python -m reconciler validate specs-example`."""
    result = subprocess.run([sys.executable, "-m", "reconciler", "validate", "specs-example"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "")
    assert result.stderr.strip() == "6 valid apps in 5 files, rollout.yaml: 2 waves"


@pytest.fixture
def broken_tree(tmp_path: Path) -> Path:
    apps = tmp_path / "tree" / "apps"
    apps.mkdir(parents=True)
    (apps / "good.yaml").write_text('name: good\nversion: "1"\n')
    (apps / "bad.yaml").write_text('name: bad\nversion: 1.10\ndepends_on: [good, nope]\n')
    return tmp_path / "tree"


def test_validate_a_broken_tree_prints_file_line_col_and_exits_1(broken_tree: Path) -> None:
    result = cli("validate", str(broken_tree))
    assert result.returncode == 1
    bad = broken_tree / "apps" / "bad.yaml"
    assert result.stdout.splitlines() == [
        f'{bad}:2:10: version: 1.10 was read as a number; quote it (version: "1.10") so YAML '
        "keeps it as written",
    ]
    assert result.stderr.strip() == "1 valid app in 2 files, 1 problem (1 app invalid)"
    # the apps folder and the single file work too, with the same locations
    assert cli("validate", str(broken_tree / "apps")).stdout == result.stdout
    assert cli("validate", str(bad)).stdout == result.stdout
    assert cli("validate", str(broken_tree / "apps" / "good.yaml")).returncode == 0


def test_validate_json(broken_tree: Path) -> None:
    (broken_tree / "apps" / "bad.yaml").write_text('name: bad\nversion: "1"\ndepends_on: [x]\n')
    result = cli("validate", "--json", str(broken_tree))
    assert result.returncode == 1
    path = str(broken_tree / "apps" / "bad.yaml")
    assert json.loads(result.stdout) == [
        {
            "path": path, "line": 3, "col": 14, "field": "depends_on[0]",
            "message": "depends on 'x', which no app defines",
            "text": f"{path}:3:14: depends_on[0]: depends on 'x', which no app defines",
        }
    ]


def test_validate_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    result = cli("validate", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "no such file or directory" in result.stderr


def test_schema_is_the_app_json_schema() -> None:
    result = cli("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "gitops-mesh app"
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["required"]) == {"name", "version"}
    assert {"depends_on", "nodes", "source", "run", "health", "suspend"} <= set(
        schema["properties"]
    )


@pytest.fixture
def example_repo(tmp_path: Path):  # type: ignore[no-untyped-def]
    files = {f"apps/{p.name}": p.read_text() for p in sorted((EXAMPLE / "apps").glob("*.yaml"))}
    return make_spec_repo(tmp_path / "specs", files)


def test_plan_lists_the_whole_stack_in_dependency_order(example_repo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("plan", "--repo", example_repo.url, "--node-id", "n1", "--label",
                 "role=gateway", "--state-dir", str(tmp_path / "no-state"))
    assert result.returncode == 0, result.stderr
    head = example_repo.head()[:12]
    assert result.stdout.splitlines() == [
        f"Plan for node n1 (role=gateway) at revision {head}",
        "",
        "Generation 1:",
        "  + broker 1.0.0                         deploy: new app",
        "  + database 1.0.0                       deploy: new app",
        "  + metrics-agent 1.0.0                  deploy: new app",
        "",
        "Generation 2 (after broker, database):",
        "  + api 1.0.0                            deploy: new app",
        "",
        "Generation 3 (after api, broker):",
        "  + gateway 1.0.0                        deploy: new app",
        "  + worker 1.0.0                         deploy: new app",
        "",
        "Plan: 6 to deploy, 0 to upgrade, 0 to reconfigure, 0 to restart, 0 to remove, "
        "0 held, 0 unchanged.",
    ]


def test_plan_json_on_an_edge_node(example_repo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("plan", "--repo", example_repo.url, "--node-id", "e1", "--label", "role=edge",
                 "--json", "--state-dir", str(tmp_path / "no-state"))
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["revision"] == example_repo.head()
    assert (plan["node"], plan["labels"], plan["problems"]) == ("e1", {"role": "edge"}, [])
    groups: dict[int, list[str]] = {}
    for action in plan["actions"]:
        assert action["kind"] == "deploy"
        groups.setdefault(action["generation"], []).append(action["app"])
    assert [sorted(g) for _, g in sorted(groups.items())] == [
        ["broker", "database", "metrics-agent"], ["api"], ["worker"]]


def test_plan_with_a_state_dir_and_spec_errors(example_repo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Current state comes from the agent's store; a broken file holds every removal."""
    from reconciler.node.store import AppRecord, Store

    result = load_directory(example_repo.work)
    broker = result.apps["broker"]
    store = Store(tmp_path / "state")
    for name, spec_json, spec_hash, version in [
        ("broker", broker.model_dump_json(by_alias=True), broker.spec_hash(), "1.0.0"),
        ("legacy", json.dumps({"name": "legacy", "version": "0.9"}), "x", "0.9"),
    ]:
        store.put_app(AppRecord(name=name, version=version, spec_json=spec_json,
                                spec_hash=spec_hash, phase="running",
                                install_dir=str(tmp_path / "apps" / name / version)))
    store.close()
    args = ["plan", "--repo", example_repo.url, "--node-id", "e1", "--label", "role=edge",
            "--state-dir", str(tmp_path / "state")]
    ok = cli(*args)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert "Removals (dependents first):" in lines
    assert "  - legacy 0.9                           remove: no longer desired on this node" \
        in lines
    # no process recorded for broker: it is installed but not running
    assert "  ↻ broker 1.0.0                         restart: not running (drift)" in lines
    assert lines[-1].startswith("Plan: 4 to deploy, 0 to upgrade, 0 to reconfigure, 1 to "
                                "restart, 1 to remove")

    example_repo.write("apps/typo.yaml", "name: [\n")
    example_repo.commit_and_push("broken file")
    held = cli(*args)
    assert held.returncode == 1
    assert "Spec problems at this revision (1):" in held.stdout
    assert "  ! legacy                               spec errors at this revision; removals held" \
        in held.stdout.splitlines()


def test_plan_reports_bad_labels_and_unreachable_repos(tmp_path: Path) -> None:
    bad = cli("plan", "--repo", str(tmp_path), "--node-id", "n1", "--label", "role")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "plan: --label: label 'role': expected KEY=VALUE, e.g. " \
                                 "role=gateway"
    node = cli("plan", "--repo", str(tmp_path), "--node-id", "../n1")
    assert node.returncode == 2
    assert node.stderr.startswith("plan: --node-id '../n1': use lowercase letters")
    gone = cli("plan", "--repo", str(tmp_path / "missing"), "--node-id", "n1",
               "--state-dir", str(tmp_path / "s"))
    assert gone.returncode == 2
    assert gone.stderr.startswith("plan: ")


# ---- specs-example itself ---------------------------------------------------------------


def test_example_archives_are_reproducible_and_pinned() -> None:
    """The committed archives are exactly what build-artifacts.py makes from src/."""
    result = subprocess.run([sys.executable, str(EXAMPLE / "build-artifacts.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")


def test_example_upgrades_are_valid_replacements_for_api() -> None:
    base = {f.path: f for f in read_directory(EXAMPLE, "apps")}
    for upgrade, version in [("api-1.1.0.yaml", "1.1.0"), ("api-1.2.0-broken.yaml", "1.2.0")]:
        data = (EXAMPLE / "upgrades" / upgrade).read_bytes()
        files = {**base, "apps/api.yaml": SpecFile("apps/api.yaml", data)}
        result = load_files(files.values())
        assert result.ok, result.problems
        assert result.apps["api"].version == version
        assert result.apps["api"].source.url == f"artifacts/api-{version}.tar.gz"  # type: ignore[union-attr]


@pytest.fixture
def stack_dir(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    with socket_offset() as offset:
        env = {**os.environ, "GITOPS_PORT_OFFSET": str(offset), "GITOPS_NODE_ID": "t1"}
        yield tmp_path, env


class socket_offset:
    """A port offset whose six example ports are free right now."""

    def __enter__(self) -> int:
        import socket

        for _ in range(50):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                offset = probe.getsockname()[1] - 17101
            if offset < 0 or offset + 17106 > 65000:
                continue
            try:
                for port in range(17101 + offset, 17107 + offset):
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return offset
        raise RuntimeError("no free port range")

    def __exit__(self, *exc: object) -> None:
        return None


def _start(app: str, version: str, root: Path, env: dict[str, str],
           **extra: str) -> subprocess.Popen[bytes]:
    target = root / app
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(EXAMPLE / "artifacts" / f"{app}-{version}.tar.gz") as tar:
        members = tar.getmembers()
        for member in members:
            member.name = member.name.partition("/")[2]
        tar.extractall(target, members=[m for m in members if m.name], filter="data")
    spec_env = load_directory(EXAMPLE).apps[app].run.env  # type: ignore[union-attr]
    python = shutil.which("python3") or sys.executable
    return subprocess.Popen([python, "server.py"], cwd=target, env={**env, **spec_env, **extra},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _get(url: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _try_get(url: str) -> dict | None:  # type: ignore[type-arg]
    try:
        return _get(url)
    except OSError:  # not listening yet
        return None


def test_example_stack_runs_in_dependency_order(stack_dir: tuple[Path, dict[str, str]]) -> None:
    """The shipped archives are real apps: api needs database and broker, the gateway
    forwards to it, and every app answers its health check at base port + offset."""
    root, env = stack_dir
    offset = int(env["GITOPS_PORT_OFFSET"])
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # Without its dependencies the api gives up: the order the planner gives matters.
        nowhere = str(free_port())
        lonely = _start("api", "1.0.0", root / "lonely", {**env, "GITOPS_PORT_OFFSET": "0"},
                        DATABASE_PORT=nowhere, BROKER_PORT=nowhere, API_PORT=nowhere,
                        DEPENDENCY_WAIT="0.5")
        procs.append(lonely)
        for app in ("broker", "database", "api", "gateway"):
            procs.append(_start(app, "1.0.0", root, env))
        api_url = f"http://127.0.0.1:{17103 + offset}/health"
        api = eventually(lambda: _try_get(api_url), timeout=20, what="api up")
        assert api == {"status": "ok", "version": "1.0.0"}
        base = f"http://127.0.0.1:{17106 + offset}"
        health = eventually(lambda: _try_get(f"{base}/health"), timeout=20, what="gateway up")
        assert health == {"status": "ok", "version": "1.0.0"}
        started = _get(f"http://127.0.0.1:{17102 + offset}/kv/api/started")
        assert started["version"] == "1.0.0"
        assert _get(f"{base}/api/items") == {"items": {}, "served_by": "1.0.0"}
        assert lonely.wait(timeout=20) == 3
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_validate_checks_repo_relative_archives(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLE / "apps", tmp_path / "apps")
    shutil.copytree(EXAMPLE / "artifacts", tmp_path / "artifacts")
    assert cli("validate", str(tmp_path)).returncode == 0
    (tmp_path / "artifacts" / "worker-1.0.0.tar.gz").unlink()
    gateway = tmp_path / "artifacts" / "gateway-1.0.0.tar.gz"
    gateway.write_bytes(gateway.read_bytes() + b"tampered")
    result = cli("validate", str(tmp_path))
    assert result.returncode == 1
    digest = hashlib.sha256(gateway.read_bytes()).hexdigest()
    assert result.stdout.splitlines() == [
        f"{tmp_path}/apps/gateway.yaml:15:11: source.sha256: does not match "
        f"artifacts/gateway-1.0.0.tar.gz (its sha256 is {digest})",
        f"{tmp_path}/apps/worker.yaml:10:8: source.url: artifacts/worker-1.0.0.tar.gz: no such "
        "file in the repository",
    ]


def test_schema_into_a_closed_pipe_exits_quietly() -> None:
    """`gitops-mesh schema | head`: the reader leaves early; no traceback on stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "schema"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the interpreter has started: its write meets a closed pipe
    err = proc.stderr.read().decode()
    proc.wait(timeout=30)
    assert "Traceback" not in err
    assert proc.returncode == 141


def test_validate_checks_rollout_yaml_at_the_repo_root(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "apps").mkdir(parents=True)
    (root / "apps" / "a.yaml").write_text('name: a\nversion: "1"\n')
    (root / "rollout.yaml").write_text("waves:\n  - name: canary\n    max_unavailable: lots\n")
    res = cli("validate", str(root))
    assert res.returncode == 1
    assert res.stdout == (f"{root}/rollout.yaml:3:22: waves[0].max_unavailable: 'lots': expected "
                          "a count like 2 or a percentage like \"25%\"\n")
    assert res.stderr.strip() == (
        "1 valid app in 1 file, rollout.yaml: invalid, 1 problem (0 apps invalid)")
    alone = cli("validate", str(root / "rollout.yaml"))
    assert (alone.returncode, alone.stdout) == (1, res.stdout)
    (root / "rollout.yaml").write_text("waves:\n  - name: canary\n    max_unavailable: 25%\n")
    ok = cli("validate", str(root))
    assert (ok.returncode, ok.stdout, ok.stderr.strip()) == (
        0, "", "1 valid app in 1 file, rollout.yaml: 1 wave")


def test_schema_of_rollout_yaml_and_of_events() -> None:
    rollout = json.loads(cli("schema", "--rollout").stdout)
    assert rollout["title"] == "gitops-mesh rollout.yaml"
    assert sorted(rollout["properties"]) == [
        "bake", "max_failed", "progress_deadline", "revert", "waves"]
    assert rollout["additionalProperties"] is False
    events = json.loads(cli("schema", "--events").stdout)  # (ops' part; still there)
    assert events["title"].startswith("gitops-mesh event") and "type" in events["properties"]


def test_plan_names_the_nodes_wave(tmp_path: Path) -> None:
    repo = make_spec_repo(tmp_path / "specs", {
        "apps/a.yaml": 'name: a\nversion: "1"\n',
        "rollout.yaml": "waves:\n  - name: canary\n    nodes: {match: {ring: canary}}\n"
                        "  - name: fleet\n",
    })
    res = cli("plan", "--repo", repo.url, "--node-id", "n1", "--label", "ring=canary",
              "--state-dir", str(tmp_path / "none"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == (
        "Rollout: n1 is in wave 'canary' of 2; whether it is open is not known here (give "
        "--nats to read the rollout state from gitops_rollouts)")
    as_json = json.loads(cli("plan", "--repo", repo.url, "--node-id", "n2", "--json",
                             "--state-dir", str(tmp_path / "none")).stdout)
    assert {k: as_json["rollout"][k] for k in ("governed", "wave", "open")} == {
        "governed": True, "wave": "fleet", "open": None}


def test_plan_says_how_an_action_is_done_when_it_is_not_the_usual_way() -> None:
    from reconciler.cli.plan_cmds import format_plan
    from reconciler.core.plan import Action, ActionKind, Mode, Plan

    plan = Plan("abc123", actions=(
        Action(ActionKind.UPGRADE, "api", 0, "version 1 -> 2", "1", "2", mode=Mode.REINSTALL),
        Action(ActionKind.DEPLOY, "web", 0, "new app", None, "1", mode=Mode.INSTALL),
    ))
    lines = format_plan(plan, "n1", {}, []).splitlines()
    assert any(line.endswith("upgrade (reinstall): version 1 -> 2") for line in lines)
    assert any(line.endswith(" deploy: new app") for line in lines)


# What each command loads: `validate` and `plan` run in CI and editors, without NATS; only
# `plan` reads a spec repository (GitSource, on GitPython), `validate` reads a directory.
_LOADED = ("import runpy, sys\n"
           "sys.argv = ['gitops-mesh', *sys.argv[1:]]\n"
           "try:\n"
           "    runpy.run_module('reconciler', run_name='__main__')\n"
           "except SystemExit:\n"
           "    pass\n"
           "heavy = ('nats', 'opentelemetry', 'uvicorn', 'starlette', 'console', 'git')\n"
           "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))),\n"
           "      file=sys.stderr)\n")


@pytest.mark.parametrize(("command", "loaded"), [("validate", ""), ("plan", "git")])
def test_validate_and_plan_never_load_nats_telemetry_or_the_console(
    command: str, loaded: str, example_repo, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    args = (["validate", str(EXAMPLE)] if command == "validate" else
            ["plan", "--repo", example_repo.url, "--node-id", "n1", "--label", "role=gateway",
             "--state-dir", str(tmp_path / "no-state")])
    result = subprocess.run([sys.executable, "-c", _LOADED, *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1] == loaded  # the heavy packages it imported
