"""Fleet rollouts end to end: real nats-server, real agents (in process, with the mesh's
coordinator injected as `gitops-mesh node` does), real child processes and real git pushes;
the CLI as subprocesses (`python -m reconciler rollout ...`, `wait`)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import NatsServer, SpecRepo, eventually_async, make_spec_repo

from reconciler.core.rollout import Member, RolloutEntry, report
from reconciler.mesh.link import Mesh, NatsOptions, connect
from reconciler.mesh.rollouts import cas_update, operate_rollout, read_entry, rollouts_bucket
from reconciler.node.agent import Agent, AgentConfig

PY = sys.executable

ROLLOUT = """\
waves:
  - name: canary
    nodes: {{match: {{ring: canary}}}}
    max_unavailable: 1
  - name: fleet
    nodes: {{}}
    max_unavailable: {fleet_max}
bake: {bake}
progress_deadline: 30s
max_failed: 0
revert: true
"""


def api_yaml(version: str, broken: bool = False, ready_after: float = 0.0) -> str:
    """An app whose process waits forever; its exec probe passes (or, broken, never does).
    `ready_after`: the process marks itself ready this late (a slow start)."""
    probe = json.dumps(["false"] if broken else ["test", "-f", "ready"])
    start = (f"import signal, time; time.sleep({ready_after}); open('ready', 'w').close(); "
             "signal.pause()")
    return (
        f'name: api\nversion: "{version}"\n'
        f"run:\n  command: [{json.dumps(PY)}, -c, {json.dumps(start)}]\n"
        f"  stop_timeout: 1s\n"
        f"health:\n  exec: {{command: {probe}}}\n  interval: 0.1s\n  timeout: 1s\n"
        f"  start_timeout: 1s\n  failure_threshold: 1\n"
    )


def rollout_yaml(bake: str = "1s", fleet_max: str = "100%") -> str:
    return ROLLOUT.format(bake=bake, fleet_max=json.dumps(fleet_max))


@dataclass
class Node:
    agent: Agent
    mesh: Mesh | None

    @property
    def id(self) -> str:
        return self.agent.node_id

    def status(self) -> Any:
        return self.agent.status()

    def pid(self) -> int | None:
        apps = {a.name: a for a in self.status().apps}
        return apps["api"].pid if "api" in apps else None


@dataclass
class Fleet:
    url: str
    repo: SpecRepo
    tmp: Path
    nodes: dict[str, Node] = field(default_factory=dict)

    async def start(self, node: str, labels: dict[str, str], *, nats: bool = True,
                    heartbeat: float = 0.5) -> Node:
        agent = Agent(AgentConfig(node_id=node, repo_url=self.repo.url, labels=labels,
                                  state_dir=self.tmp / f"state-{node}", interval=3600.0,
                                  heartbeat=heartbeat))
        mesh = None
        if nats:
            mesh = Mesh(agent, agent.store, NatsOptions(servers=[self.url]),
                        heartbeat=heartbeat)
            agent.coordinator = mesh.coordinator  # as the composition root (cli node) does
            await mesh.start()
        await agent.start()
        self.nodes[node] = Node(agent, mesh)
        return self.nodes[node]

    async def stop(self, node: str) -> None:
        item = self.nodes.pop(node)
        if item.mesh is not None:
            await item.mesh.close()
        await item.agent.close(stop_apps=True)

    def push(self, files: dict[str, str], message: str, tell: list[str] | None = None) -> str:
        """Commit and push; tell the nodes (`tell`: only these, the others hear later)."""
        for path, text in files.items():
            self.repo.write(path, text)
        sha = self.repo.commit_and_push(message)
        for name in tell if tell is not None else list(self.nodes):
            self.tell(name)
        return sha

    def tell(self, node: str) -> None:
        self.nodes[node].agent.trigger("source.changed")  # what `gitops-mesh notify` does

    async def synced(self, revision: str, nodes: list[str] | None = None,
                     timeout: float = 30.0) -> None:
        names = nodes or sorted(self.nodes)

        async def check() -> bool:
            for name in names:
                st = self.nodes[name].status()
                assert (st.status, st.revision) == ("synced", revision), (name, st.status,
                                                                          st.message)
            return True

        await eventually_async(check, timeout=timeout, what=f"{names} synced at {revision[:8]}")


@asynccontextmanager
async def fleet_of(tmp: Path, server: NatsServer, nodes: dict[str, dict[str, str]],
                   **start: Any) -> AsyncIterator[Fleet]:
    # a file unique to this test: repos made in the same second must not share commit SHAs
    # (the nodes of the module's earlier tests are still in gitops_nodes, at their SHAs)
    repo = make_spec_repo(tmp / "specs", {"apps/api.yaml": api_yaml("1"), "test.txt": str(tmp)})
    fleet = Fleet(server.url, repo, tmp)
    try:
        for node, labels in nodes.items():
            await fleet.start(node, labels, **start)
        await fleet.synced(repo.head())
        yield fleet
    finally:
        for node in list(fleet.nodes):
            await fleet.stop(node)


async def entry_of(url: str, revision: str) -> RolloutEntry | None:
    nc = await connect(NatsOptions(servers=[url]))
    try:
        kv = await rollouts_bucket(nc.jetstream(), create=False)
        return None if kv is None else (await read_entry(kv, revision))[0]
    finally:
        await nc.close()


async def rollout_events(url: str, revision: str) -> list[dict[str, Any]]:
    """Every rollout.* event of `revision` in the GITOPS_EVENTS stream."""
    import nats.js.errors

    from reconciler.mesh.subjects import EVENTS_STREAM

    nc = await connect(NatsOptions(servers=[url]))
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(EVENTS_STREAM, subjects_filter="gitops.events.>")
        except nats.js.errors.NotFoundError:
            return []
        count = info.state.messages
        sub = await js.subscribe("gitops.events.>", ordered_consumer=True)
        out = []
        for _ in range(count):
            try:
                msg = await sub.next_msg(timeout=2)
            except Exception:
                break
            event = json.loads(msg.data)
            if event["type"].startswith("rollout.") and event.get("revision") == revision:
                out.append(event)
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def cli(url: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "reconciler", *args, "--nats", url, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())


THREE = {"canary-1": {"ring": "canary"}, "node-1": {}, "node-2": {}}


async def test_a_good_revision_bakes_on_the_canary_then_reaches_everyone(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async with fleet_of(tmp_path, nats_server, THREE) as fleet:
        before = {n: fleet.nodes[n].pid() for n in ("node-1", "node-2")}
        sha = fleet.push({"rollout.yaml": rollout_yaml("1s"), "apps/api.yaml": api_yaml("2")},
                         "api 2 with a canary wave")
        waiter = asyncio.ensure_future(cli(nats_server.url, "wait", "--revision", sha,
                                           "--timeout", "60s"))
        await fleet.synced(sha, ["canary-1"])
        # while the canary bakes, the others keep their process and say what they wait for
        said: set[str] = set()
        while True:
            entry = await entry_of(nats_server.url, sha)
            assert entry is not None and entry.state in ("progressing", "complete")
            if entry.waves[1].opened_at is not None:
                break
            for name in ("node-1", "node-2"):
                st = fleet.nodes[name].status()
                assert st.revision != sha and fleet.nodes[name].pid() == before[name], st
                assert (st.status, st.desired_revision) == ("progressing", sha), st
                if st.message.startswith(f"waiting for wave fleet of rollout {sha[:12]}"):
                    said.add(name)
            await asyncio.sleep(0.05)
        assert said == {"node-1", "node-2"}
        done = await waiter
        assert done.returncode == 0, done.stderr
        assert f"rollout {sha[:12]}" in done.stderr  # per-wave progress while waiting
        entry = await entry_of(nats_server.url, sha)
        assert entry is not None
        assert (entry.state, entry.waves[0].synced, entry.waves[1].synced) == (
            "complete", ["canary-1"], ["node-1", "node-2"])
        canary, fleet_wave = entry.waves
        assert canary.synced_at and canary.baked_at and fleet_wave.opened_at
        # the fleet wave opened only after the canary synced and baked its second
        from reconciler.core.events import parse_time

        synced_at, baked_at = parse_time(canary.synced_at), parse_time(canary.baked_at)
        assert synced_at and baked_at and (baked_at - synced_at).total_seconds() >= 1.0
        for name in ("node-1", "node-2"):
            started = parse_time(fleet.nodes[name].status().apps[0].started_at)
            assert started is not None and started >= baked_at.replace(microsecond=0)

        async def announced() -> list[dict[str, Any]]:
            events = await rollout_events(nats_server.url, sha)
            assert len(events) >= 2, events
            return events

        events = await eventually_async(announced, what="rollout events in the stream")
        # once each, fleet-wide, by whichever node's write caused it
        assert sorted(e["type"] for e in events) == ["rollout.completed", "rollout.wave-opened"]
        assert {e["revision"] for e in events} == {sha}


async def test_a_broken_revision_aborts_on_the_canary_and_the_revert_sticks(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async with fleet_of(tmp_path, nats_server, THREE) as fleet:
        good = fleet.repo.head()
        pids = {n: fleet.nodes[n].pid() for n in fleet.nodes}
        sha = fleet.push({"rollout.yaml": rollout_yaml("1s"),
                          "apps/api.yaml": api_yaml("2", broken=True)}, "api 2 is broken")
        done = await cli(nats_server.url, "wait", "--revision", sha, "--timeout", "60s")
        assert done.returncode == 1, done.stderr
        assert f"{sha[:12]}: rollout aborted: 1 node(s) failed, more than max_failed 0: " \
               "canary-1: api:" in done.stderr
        entry = await entry_of(nats_server.url, sha)
        assert entry is not None and (entry.state, entry.base) == ("aborted", good)
        canary = fleet.nodes["canary-1"]

        async def reverted() -> bool:
            st = canary.status()
            assert (st.revision, st.desired_revision) == (good, sha), st
            assert st.status == "degraded" and "reverted to" in st.message, st
            return True

        await eventually_async(reverted, what="the canary back on the good revision")
        canary_pid = canary.pid()
        assert canary_pid is not None
        for _ in range(3):  # the revert sticks: polls do not try the aborted revision again
            for node in fleet.nodes.values():
                await node.agent.reconcile_now("poll")
            await reverted()
        assert canary.pid() == canary_pid
        assert {a.version for a in canary.status().apps} == {"1"}
        for name in ("node-1", "node-2"):  # the others never touched it
            st = fleet.nodes[name].status()
            assert fleet.nodes[name].pid() == pids[name]
            assert (st.revision, st.status) == (good, "degraded"), st
            assert "aborted" in st.message and "not applied" in st.message, st.message
        # a new commit starts a new rollout (its base is still the good revision)
        fixed = fleet.push({"apps/api.yaml": api_yaml("3")}, "api 3 fixes it")
        await fleet.synced(fixed, timeout=40)
        entry = await entry_of(nats_server.url, fixed)
        assert entry is not None and (entry.state, entry.base) == ("complete", good)


async def test_operators_pause_resume_promote_and_abort_from_the_cli(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async with fleet_of(tmp_path, nats_server, THREE) as fleet:
        sha = fleet.push({"rollout.yaml": rollout_yaml("1h"), "apps/api.yaml": api_yaml("2")},
                         "api 2, a long bake")
        await fleet.synced(sha, ["canary-1"])
        url = nats_server.url
        res = await cli(url, "rollout", "pause", "--revision", sha[:10])
        assert res.returncode == 0, res.stderr
        assert "rollout.paused: paused by an operator" in res.stderr
        assert f"rollout {sha[:12]}  PAUSED" in res.stdout
        again = await cli(url, "rollout", "pause", "--revision", sha)
        assert (again.returncode, again.stderr) == (
            1, "gitops-mesh: cannot pause a rollout that is paused\n")

        async def says(node: str, text: str) -> bool:
            assert text in fleet.nodes[node].status().message
            return True

        await eventually_async(lambda: says("node-1", "paused"), what="node-1 sees the pause")
        res = await cli(url, "rollout", "resume", "--revision", sha)
        assert res.returncode == 0 and "rollout.resumed" in res.stderr, res.stderr
        await eventually_async(lambda: says("node-1", "waiting for wave fleet"))
        res = await cli(url, "rollout", "promote", "--revision", sha)
        assert res.returncode == 0, res.stderr
        assert "rollout.wave-opened: wave fleet opened (promoted by an operator)" in res.stderr
        await fleet.synced(sha)
        status = await cli(url, "rollout", "status", "--revision", sha, "--json")
        data = json.loads(status.stdout)
        assert (data["state"], [w["synced"] for w in data["waves"]]) == (
            "complete", [["canary-1"], ["node-1", "node-2"]])

        # abort by hand, after the canary applied a revision: the canary goes back
        second = fleet.push({"apps/api.yaml": api_yaml("3")}, "api 3")
        await fleet.synced(second, ["canary-1"])
        res = await cli(url, "rollout", "abort", "--revision", second, "--reason", "bad build")
        assert res.returncode == 0, res.stderr
        done = await cli(url, "wait", "--revision", second, "--timeout", "30s")
        assert done.returncode == 1
        assert f"{second[:12]}: rollout aborted: bad build" in done.stderr
        await eventually_async(lambda: _at(fleet, "canary-1", sha), what="canary reverted")
        assert {a.version for a in fleet.nodes["canary-1"].status().apps} == {"2"}
        for name in ("node-1", "node-2"):
            assert fleet.nodes[name].status().revision == sha


async def _at(fleet: Fleet, node: str, revision: str) -> bool:
    st = fleet.nodes[node].status()
    assert st.revision == revision and not fleet.nodes[node].agent.reconciling, st
    return True


async def test_two_operators_racing_lose_no_update(nats_server: NatsServer) -> None:
    """Compare-and-set: concurrent writers are retried, never overwritten."""
    from datetime import UTC, datetime

    from reconciler.core.rollout_spec import RolloutSpec

    nc1 = await connect(NatsOptions(servers=[nats_server.url]))
    nc2 = await connect(NatsOptions(servers=[nats_server.url]))
    try:
        js1, js2 = nc1.jetstream(), nc2.jetstream()
        kv1 = await rollouts_bucket(js1)
        kv2 = await rollouts_bucket(js2)
        assert kv1 is not None and kv2 is not None
        spec = RolloutSpec.model_validate({"waves": [
            {"name": "one", "nodes": {"match": {"w": "1"}}}, {"name": "two"},
            {"name": "three"}]})
        revision = "e" * 40
        options = NatsOptions(servers=[nats_server.url])
        now = datetime.now(UTC)
        members = {f"n{i}": Member({"w": "1"} if i < 2 else {}) for i in range(4)}
        created = await cas_update(js1, kv1, options, revision,
                                   lambda cur: None if cur else _created(revision, spec, now,
                                                                         members))
        assert created.wrote
        # two operators at once: one pauses, the other promotes; both changes land
        paused, promoted = await asyncio.gather(
            operate_rollout(js1, kv1, options, revision, "pause", actor="console"),
            operate_rollout(js2, kv2, options, revision, "promote", actor="console"))
        entry, _ = await read_entry(kv1, revision)
        assert entry is not None
        assert (entry.state, entry.wave) == ("paused", "two")
        assert paused.wrote and promoted.wrote
        # twenty nodes reporting at once: every report is in
        many = {f"m{i}": Member({}) for i in range(20)}

        async def reporter(node: str, js: Any, kv: Any) -> int:
            result = await cas_update(js, kv, options, revision, lambda cur: report(
                cur, node, "synced", "", many, datetime.now(UTC)))
            return result.attempts

        attempts = await asyncio.gather(*(
            reporter(n, js1 if i % 2 else js2, kv1 if i % 2 else kv2)
            for i, n in enumerate(many)))
        assert sum(attempts) > len(many)  # they did collide, and were computed again
        entry, _ = await read_entry(kv2, revision)
        assert entry is not None
        assert sorted(n for w in entry.waves for n in w.synced) == sorted(many)
        await kv1.purge(revision)  # the module's other tests share the bucket
    finally:
        await nc1.close()
        await nc2.close()


def _created(revision: str, spec: Any, now: Any, members: dict[str, Member]) -> Any:
    from reconciler.core.rollout import Step, advance, new_entry

    return Step(advance(new_entry(revision, spec, None, now), members, now).entry)


async def test_an_offline_node_does_not_hold_its_wave_and_joins_later(
        tmp_path: Path, nats_server: NatsServer) -> None:
    nodes = {"canary-1": {"ring": "canary"}, "node-1": {}, "node-2": {}}
    async with fleet_of(tmp_path, nats_server, nodes, heartbeat=0.3) as fleet:
        await fleet.stop("node-2")  # its status ages: unreachable after 3 heartbeats
        await asyncio.sleep(1.2)
        sha = fleet.push({"rollout.yaml": rollout_yaml("0.5s"), "apps/api.yaml": api_yaml("2")},
                         "api 2 while node-2 is down")
        await fleet.synced(sha, ["canary-1", "node-1"])

        async def complete() -> RolloutEntry:
            entry = await entry_of(nats_server.url, sha)
            assert entry is not None and entry.state == "complete", entry
            return entry

        entry = await eventually_async(complete, what="complete without node-2")
        assert (entry.waves[1].synced, entry.waves[1].offline) == (["node-1"], ["node-2"])
        await fleet.start("node-2", {}, heartbeat=0.3)  # back: it joins and applies
        await fleet.synced(sha, ["node-2"])

        async def joined() -> bool:
            entry = await entry_of(nats_server.url, sha)
            assert entry is not None and entry.waves[1].synced == ["node-1", "node-2"], entry
            assert entry.waves[1].offline == []
            return True

        await eventually_async(joined, what="node-2 counted synced")


async def test_a_canary_still_at_a_superseded_revision_holds_the_next_rollout(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """A push while the canary bakes the previous one: the canary runs a revision that is
    neither the new one nor the last completed one (the new rollout's base). It is still
    of this repository's history, so it belongs to the new rollout's canary wave: the
    fleet wave must not open before it synced and baked (it once opened at once when a
    fleet node, still at the base, created the entry), and the superseded rollout ends."""
    async with fleet_of(tmp_path, nats_server, THREE) as fleet:
        before = {n: fleet.nodes[n].pid() for n in ("node-1", "node-2")}
        first = fleet.push({"rollout.yaml": rollout_yaml("60s"), "apps/api.yaml": api_yaml("2")},
                           "api 2, baking a minute")
        await fleet.synced(first, ["canary-1"])
        # the next commit reaches a fleet node first: it creates the entry and places the
        # waves while the canary still reports the superseded revision
        second = fleet.push({"rollout.yaml": rollout_yaml("1s"), "apps/api.yaml": api_yaml("3")},
                            "api 3", tell=["node-1"])

        async def placed() -> RolloutEntry:
            entry = await entry_of(nats_server.url, second)
            assert entry is not None and entry.placed, entry
            return entry

        entry = await eventually_async(placed, what="the new rollout placed")
        assert entry.waves[0].nodes == ["canary-1"], entry.waves
        assert entry.wave == "canary" and entry.waves[1].opened_at is None, entry
        fleet.tell("canary-1")
        fleet.tell("node-2")
        await fleet.synced(second, ["canary-1"])
        for name in ("node-1", "node-2"):
            st = fleet.nodes[name].status()
            assert st.revision != second and fleet.nodes[name].pid() == before[name], st
        await fleet.synced(second)
        entry = await entry_of(nats_server.url, second)
        assert entry is not None and entry.state == "complete", entry
        canary = entry.waves[0]
        from reconciler.core.events import parse_time

        synced_at, baked_at = parse_time(canary.synced_at), parse_time(canary.baked_at)
        assert synced_at and baked_at and (baked_at - synced_at).total_seconds() >= 1.0

        async def superseded() -> RolloutEntry:
            old = await entry_of(nats_server.url, first)
            assert old is not None and (old.state, old.superseded_by) == ("aborted", second)
            return old

        await eventually_async(superseded, what="the first rollout superseded")


async def test_max_unavailable_percent_is_never_exceeded(
        tmp_path: Path, nats_server: NatsServer) -> None:
    nodes = {f"w-{i}": {} for i in range(10)}
    async with fleet_of(tmp_path, nats_server, nodes, heartbeat=1.0) as fleet:
        rules = ("waves:\n  - name: all\n    nodes: {}\n    max_unavailable: 50%\n"
                 "bake: 0s\nprogress_deadline: 60s\n")
        nc = await connect(NatsOptions(servers=[nats_server.url]))
        seen: list[int] = []
        try:
            kv = await rollouts_bucket(nc.jetstream())
            assert kv is not None
            watcher = await kv.watch("*")  # the entries, not the report keys

            async def record() -> None:
                while True:
                    update = await watcher.updates(timeout=60)
                    if update is not None and update.value:
                        seen.append(len(RolloutEntry.from_json(update.value).applying))

            recorder = asyncio.ensure_future(record())
            sha = fleet.push({"rollout.yaml": rules,
                              "apps/api.yaml": api_yaml("2", ready_after=0.3)}, "api 2")
            await fleet.synced(sha, timeout=60)
            recorder.cancel()
            await watcher.stop()
        finally:
            await nc.close()
        entry = await entry_of(nats_server.url, sha)
        assert entry is not None and entry.state == "complete"
        assert max(seen) <= 5, seen
        assert max(seen) >= 2, seen  # it did run nodes side by side


async def test_without_nats_a_governed_revision_is_not_enforceable_and_not_applied(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async with fleet_of(tmp_path, nats_server, {"lone-1": {}}, nats=False) as fleet:
        node = fleet.nodes["lone-1"]
        pid = node.pid()
        sha = fleet.push({"rollout.yaml": rollout_yaml(), "apps/api.yaml": api_yaml("2")},
                         "api 2, governed")

        async def held() -> bool:
            st = node.status()
            assert st.desired_revision == sha and not node.agent.reconciling, st
            assert (st.status, st.revision != sha) == ("degraded", True), st
            assert "not enforceable" in st.message, st.message
            return True

        await eventually_async(held, what="the governed revision held")
        assert node.pid() == pid and {a.version for a in node.status().apps} == {"1"}


@pytest.mark.parametrize("text", ["waves: [{name: Bad}]\n"])
async def test_an_invalid_rollout_yaml_holds_the_revision(
        tmp_path: Path, nats_server: NatsServer, text: str) -> None:
    async with fleet_of(tmp_path, nats_server, {"solo-1": {}}) as fleet:
        node = fleet.nodes["solo-1"]
        sha = fleet.push({"rollout.yaml": text, "apps/api.yaml": api_yaml("2")}, "bad rules")

        async def held() -> bool:
            st = node.status()
            assert st.desired_revision == sha and st.status == "degraded", st
            assert "rollout.yaml at" in st.message and "invalid wave name" in st.message
            return True

        await eventually_async(held)
        assert {a.version for a in node.status().apps} == {"1"}


TOKEN = "rollout-test-token"


async def test_the_console_shows_waves_live_and_its_buttons_drive_the_rollout(
        tmp_path: Path, nats_server: NatsServer) -> None:
    import httpx
    import sim
    from conftest import free_port

    from console.app import ConsoleConfig

    nodes = {"ui-canary": {"ring": "canary"}, "ui-node": {}}
    async with fleet_of(tmp_path, nats_server, nodes) as fleet:
        console = sim.ConsoleThread(ConsoleConfig(token=TOKEN),
                                    sim.connector_for(nats_server.url), free_port()).start()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        try:
            async with httpx.AsyncClient(base_url=console.url, timeout=15) as http:
                sha = fleet.push({"rollout.yaml": rollout_yaml("1h"),
                                  "apps/api.yaml": api_yaml("2")}, "api 2, long bake")
                await fleet.synced(sha, ["ui-canary"])

                async def baking() -> dict[str, Any]:
                    view = (await http.get(f"/api/rollouts/{sha[:10]}")).json()
                    c = view.get("coordination")
                    assert c and c["waves"][0]["synced"] == 1, view
                    assert c["waves"][0]["bake_left_s"] is not None, c
                    return c

                c = await eventually_async(baking, what="the console shows the canary baking")
                assert (c["state"], c["wave"], c["actions"]) == (
                    "progressing", "canary", ["pause", "abort", "promote"])
                assert [(w["name"], w["phase"], w["nodes"]) for w in c["waves"]] == [
                    ("canary", "open", 1), ("fleet", "waiting", 1)]
                overview = (await http.get("/api/fleet")).json()
                assert sha in [r["revision"] for r in overview["active_rollouts"]]
                page = await http.get(f"/rollouts/{sha}")
                assert 'data-rollout-action="promote"' in page.text
                http.cookies.clear()  # an API client, not a browser (no CSRF cookie)

                # token-guarded: no token, no action
                res = await http.post(f"/api/rollouts/{sha}/pause")
                assert res.status_code == 401, res.text
                res = await http.post(f"/api/rollouts/{sha}/pause", headers=auth)
                assert res.status_code == 200, res.text
                assert res.json()["state"] == "paused"
                res = await http.post(f"/api/rollouts/{sha}/pause", headers=auth)
                assert (res.status_code, res.json()["error"]) == (
                    409, "cannot pause a rollout that is paused")
                res = await http.post(f"/api/rollouts/{sha}/resume", headers=auth)
                assert res.status_code == 200 and res.json()["state"] == "progressing"
                res = await http.post(f"/api/rollouts/{sha}/promote", headers=auth)
                assert res.status_code == 200, res.text
                assert res.json()["wave"] == "fleet"
                await fleet.synced(sha)

                async def complete() -> bool:
                    c = (await http.get(f"/api/rollouts/{sha}")).json()["coordination"]
                    assert c["state"] == "complete" and c["actions"] == [], c
                    return True

                await eventually_async(complete, what="the console sees it complete")
                active = (await http.get("/api/fleet")).json()["active_rollouts"]
                assert sha not in [r["revision"] for r in active]

                # abort from the console: the canary goes back, the other never starts it
                second = fleet.push({"apps/api.yaml": api_yaml("3")}, "api 3")
                await fleet.synced(second, ["ui-canary"])
                await eventually_async(lambda: _known(http, second))
                res = await http.post(f"/api/rollouts/{second}/abort", headers=auth,
                                      json={"reason": "saw errors in the canary"})
                assert res.status_code == 200 and res.json()["state"] == "aborted", res.text
                await eventually_async(lambda: _at(fleet, "ui-canary", sha), what="reverted")
                assert fleet.nodes["ui-node"].status().revision == sha
                c = (await http.get(f"/api/rollouts/{second}")).json()["coordination"]
                assert (c["state"], c["reason"]) == ("aborted", "saw errors in the canary")
                events = await rollout_events(nats_server.url, second)
                assert [(e["type"], e["node"]) for e in events] == [
                    ("rollout.aborted", "console")]
        finally:
            console.stop()


async def _known(http: Any, revision: str) -> bool:
    view = (await http.get(f"/api/rollouts/{revision}")).json()
    assert view.get("coordination"), view
    return True


# ---- per-node report keys, folded into the entry --------------------------------------------

async def _placed_entry(js: Any, kv: Any, options: NatsOptions, revision: str,
                        nodes: list[str], offline: tuple[str, ...] = ()) -> None:
    from datetime import UTC, datetime

    from reconciler.core.rollout_spec import RolloutSpec

    spec = RolloutSpec.model_validate(
        {"waves": [{"name": "all", "nodes": {}, "max_unavailable": "100%"}], "bake": "0s"})
    members = {n: Member({}, n not in offline) for n in nodes}
    created = await cas_update(js, kv, options, revision, lambda cur: None if cur else _created(
        revision, spec, datetime.now(UTC), members))
    assert created.wrote


async def test_many_nodes_reporting_at_once_give_exact_counts_and_one_completion(
        nats_server: NatsServer) -> None:
    """Each node's report is a plain put to its own key; the entry is folded from them, not
    written once per report, and completes once with every node counted."""
    from reconciler.mesh.rollouts import MeshCoordinator, read_reports

    options = NatsOptions(servers=[nats_server.url])
    conns = [await connect(options) for _ in range(2)]
    try:
        js = conns[0].jetstream()
        kv = await rollouts_bucket(js)
        assert kv is not None
        revision = "c" * 40
        nodes = [f"r-{i}" for i in range(24)]
        await _placed_entry(js, kv, options, revision, nodes)
        coordinators = [MeshCoordinator(lambda nc=conns[i % 2]: nc, options)
                        for i in range(len(nodes))]
        later: list[str] = []
        results = await asyncio.gather(*(
            c.report(revision, n, {}, "synced", "", later=lambda ev: later.extend(
                e.type for e in ev)) for c, n in zip(coordinators, nodes, strict=True)))

        async def completed() -> bool:
            entry, _ = await read_entry(kv, revision)
            return entry is not None and entry.state == "complete"

        await eventually_async(completed, what="the rollout complete")
        entry, _ = await read_entry(kv, revision)
        assert entry is not None and entry.waves[0].synced == sorted(nodes)
        announced = [e.type for _, events in results for e in events] + later
        assert announced == ["rollout.completed"]  # once, by whoever folded it
        assert sorted(await read_reports(js, revision)) == sorted(nodes)
        # far fewer entry writes than reports (the old way: one contended CAS each)
        assert sum(c.cas_attempts for c in coordinators) < len(nodes)
        await kv.purge(revision)
    finally:
        for nc in conns:
            await nc.close()


async def test_reports_whose_fold_was_lost_complete_the_wave_and_two_folders_race(
        nats_server: NatsServer) -> None:
    """Nodes that wrote their report but never folded it (they died right after, say) are
    taken in by whoever folds next; two nodes folding at once announce the completion once;
    an offline node does not hold the wave, and its late report shows it synced."""
    from reconciler.core.rollout import NodeReport
    from reconciler.mesh.rollouts import MeshCoordinator, report_key

    options = NatsOptions(servers=[nats_server.url])
    nc1, nc2 = await connect(options), await connect(options)
    try:
        js = nc1.jetstream()
        kv = await rollouts_bucket(js)
        assert kv is not None
        revision = "d" * 40
        nodes = ["l-0", "l-1", "l-2", "l-3", "l-4"]
        await _placed_entry(js, kv, options, revision, nodes, offline=("l-4",))
        for node in ("l-0", "l-1"):  # reported, never folded
            await kv.put(report_key(revision, node), NodeReport(
                node=node, outcome="synced", at="2026-01-01T00:00:00Z").to_json_bytes())
        entry, _ = await read_entry(kv, revision)
        assert entry is not None and entry.waves[0].synced == []
        one, two = MeshCoordinator(lambda: nc1, options), MeshCoordinator(lambda: nc2, options)
        results = await asyncio.gather(one.report(revision, "l-2", {}, "synced", ""),
                                       two.report(revision, "l-3", {}, "synced", ""))

        async def completed() -> bool:
            entry, _ = await read_entry(kv, revision)
            return entry is not None and entry.state == "complete"

        await eventually_async(completed, what="the wave complete with the lost reports")
        entry, _ = await read_entry(kv, revision)
        assert entry is not None
        assert (entry.waves[0].synced, entry.waves[0].offline) == (nodes[:4], ["l-4"])
        assert [e.type for _, events in results for e in events] == ["rollout.completed"]
        late, _ = await one.report(revision, "l-4", {}, "synced", "")  # back from offline
        assert late is not None and late.state == "complete"
        assert (late.waves[0].synced, late.waves[0].offline) == (nodes, [])
        await kv.purge(revision)
    finally:
        await nc1.close()
        await nc2.close()


async def test_report_keys_expire_and_the_entries_stay(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """A node's report key carries its expiry (Nats-TTL, the bucket allows it); the entry,
    which keeps an aborted revision from ever applying again, has none. A bucket made
    before TTLs (an older nats-init) still takes reports, without expiry, and nats-init
    says what to update."""
    from reconciler.mesh import provision
    from reconciler.mesh.rollouts import MeshCoordinator, report_key
    from reconciler.mesh.subjects import ROLLOUT_REPORT_TTL, ROLLOUTS_STREAM

    async def headers_of(js: Any, key: str) -> dict[str, str]:
        msg = await js.get_last_msg(ROLLOUTS_STREAM, f"$KV.gitops_rollouts.{key}")
        return dict(msg.headers or {})

    options = NatsOptions(servers=[nats_server.url])
    nc = await connect(options)
    try:
        js = nc.jetstream()
        kv = await rollouts_bucket(js)
        assert kv is not None and (await js.stream_info(ROLLOUTS_STREAM)).config.allow_msg_ttl
        revision = "5" * 40
        await _placed_entry(js, kv, options, revision, ["t-0", "t-1"])
        await MeshCoordinator(lambda: nc, options).report(revision, "t-0", {}, "synced", "")
        assert (await headers_of(js, report_key(revision, "t-0")))["Nats-TTL"] == \
            ROLLOUT_REPORT_TTL
        assert "Nats-TTL" not in await headers_of(js, revision)
        await kv.purge(revision)
    finally:
        await nc.close()

    from conftest import start_nats

    older = start_nats(tmp_path / "older")
    try:
        nc = await connect(NatsOptions(servers=[older.url]))
        js = nc.jetstream()
        await js.add_stream(provision.rollouts_bucket().config.evolve(allow_msg_ttl=None))
        kv = await rollouts_bucket(js)  # verified: usable as it is
        assert kv is not None
        await _placed_entry(js, kv, NatsOptions(servers=[older.url]), revision, ["t-0"])
        entry, _ = await MeshCoordinator(lambda: nc, NatsOptions(servers=[older.url])).report(
            revision, "t-0", {}, "synced", "")
        assert entry is not None and entry.state == "complete"
        assert "Nats-TTL" not in await headers_of(js, report_key(revision, "t-0"))
        await nc.close()
        said = await cli(older.url, "nats-init")
        assert said.returncode == 1 and \
            "bucket gitops_rollouts differs: allow_msg_ttl is False (documented: True)" \
            in said.stdout, said.stdout + said.stderr
        updated = await cli(older.url, "nats-init", "--update")
        assert updated.returncode == 0, updated.stdout + updated.stderr
        assert "bucket gitops_rollouts matching" in (await cli(older.url, "nats-init")).stdout
    finally:
        older.stop()


async def test_an_entry_deleted_by_an_operator_is_made_again(nats_server: NatsServer) -> None:
    """`nats kv del gitops_rollouts <sha>` (an operator resetting a rollout) leaves a delete
    marker; the next compare-and-set must expect the marker's sequence, not "no key" (it
    failed 200 times, and the revision could never be governed again)."""
    options = NatsOptions(servers=[nats_server.url])
    nc = await connect(options)
    try:
        js = nc.jetstream()
        kv = await rollouts_bucket(js)
        assert kv is not None
        revision = "7" * 40
        await _placed_entry(js, kv, options, revision, ["x-0"])
        for how in ("delete", "purge"):
            await getattr(kv, how)(revision)
            assert (await read_entry(kv, revision))[0] is None
            await _placed_entry(js, kv, options, revision, ["x-0"])  # asserts it wrote
            entry, _ = await read_entry(kv, revision)
            assert entry is not None and entry.waves[0].nodes == ["x-0"], how
    finally:
        await nc.close()
