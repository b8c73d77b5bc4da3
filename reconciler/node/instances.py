"""Instances: one version of an app as a process: launch spec, install, healthy start, stop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from reconciler.core.envfile import parse_env
from reconciler.core.errors import ArtifactError, ReconcileError, SourceError
from reconciler.core.spec import AppSpec
from reconciler.node.bounded import RefusedFile, read_regular
from reconciler.node.runtimes.base import NEXT_SUFFIX, LaunchSpec, RestartPolicy, Runtime

log = logging.getLogger(__name__)

ReadRepoFile = Callable[[str], bytes]
# An env file holds a few settings; anything bigger is not one.
MAX_ENV_FILE_BYTES = 256 * 1024


class Artifacts(Protocol):
    """What the executor needs from reconciler.node.artifacts.ArtifactStore."""

    def install(self, spec: AppSpec, read_repo_file: ReadRepoFile | None = None) -> Path: ...

    def gc(self, name: str, keep: set[Path]) -> list[Path]: ...

    def remove_app(self, name: str) -> None: ...


class HealthHooks(Protocol):
    """The agent's health watching and probing, as starting an instance needs it."""

    def watch(self, spec: AppSpec, launch: LaunchSpec | None) -> None:
        """Start periodic health probing of a running app."""

    async def unwatch(self, name: str) -> None: ...

    async def wait_healthy(
        self, spec: AppSpec, launch: LaunchSpec | None, is_alive: Callable[[], bool],
        timeout: float | None = None,
    ) -> tuple[bool, str]:
        """Probe until healthy, dead, definitely broken or `timeout` (default: the spec's
        start_timeout): (ok, message)."""


class ActionFailed(Exception):
    """An app step failed; `permanent` is False for errors worth retrying (source hiccups)."""

    def __init__(self, message: str, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


def read_env_file(path: Path) -> dict[str, str]:
    """An app's env file (core.envfile.parse_env): a regular UTF-8 file of at most
    MAX_ENV_FILE_BYTES without NUL bytes. Errors name the file and line, never a value."""
    try:
        data = read_regular(path, MAX_ENV_FILE_BYTES)
        text = data.decode("utf-8")
    except RefusedFile as exc:
        raise ActionFailed(f"env file {path}: {exc}") from None
    except UnicodeDecodeError:
        raise ActionFailed(f"env file {path}: not UTF-8 text") from None
    except OSError as exc:
        raise ActionFailed(f"env file {path}: {exc.strerror or exc}") from exc
    try:
        return parse_env(text, f"env file {path}")
    except ValueError as exc:
        raise ActionFailed(str(exc)) from None


def next_name(app: str) -> str:
    """The runtime name of a start-first upgrade's new instance while the old one runs."""
    return f"{app}{NEXT_SUFFIX}"


class Instances:
    """Starts and stops single versions of apps for the executor: artifacts install in a
    thread, processes go through the Runtime, health through the agent's HealthHooks.
    Failures raise ActionFailed; recording what they mean is the caller's."""

    def __init__(
        self, *, node_id: str, runtime: Runtime, artifacts: Artifacts, hooks: HealthHooks,
        log_dir: Path, port_offset: int, base_env: Mapping[str, str] | None,
    ) -> None:
        self.node_id = node_id
        self.runtime = runtime
        self.artifacts = artifacts
        self.hooks = hooks
        self.log_dir = log_dir
        self.port_offset = port_offset
        self.base_env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")}
        if base_env is not None:
            self.base_env = dict(base_env)

    def launch_for(self, spec: AppSpec, install_dir: Path) -> LaunchSpec | None:
        """The LaunchSpec of `spec` installed in `install_dir` (None: the app runs nothing)."""
        run = spec.run
        if run is None:
            return None
        env = dict(self.base_env)
        for name in run.env_files:
            path = Path(name) if os.path.isabs(name) else install_dir / name
            env.update(read_env_file(path))
        env.update(run.env)
        env.update({
            "GITOPS_NODE_ID": self.node_id,
            "GITOPS_APP_DIR": str(install_dir),
            "GITOPS_PORT_OFFSET": str(self.port_offset),
        })
        argv = ("/bin/sh", "-c", run.command[0]) if run.shell else tuple(run.command)
        workdir = install_dir
        if run.workdir:
            workdir = Path(run.workdir) if os.path.isabs(run.workdir) else install_dir / run.workdir
        policy = spec.restart
        return LaunchSpec(
            name=spec.name, version=spec.version, argv=argv, env=env, workdir=workdir,
            log_dir=self.log_dir, stop_signal=run.stop_signal, stop_timeout=run.stop_timeout,
            restart=RestartPolicy(
                policy=policy.policy, backoff_initial=policy.backoff.initial,
                backoff_max=policy.backoff.max, max_restarts=policy.max_restarts,
                window=policy.window,
            ),
        )

    def is_alive(self, name: str) -> bool:
        return self.runtime.state(name) == "running"

    async def install(self, spec: AppSpec, read_repo_file: ReadRepoFile | None) -> Path:
        try:
            return await asyncio.to_thread(self.artifacts.install, spec, read_repo_file)
        except ArtifactError as exc:
            raise ActionFailed(f"artifact refused: {exc}") from exc
        except SourceError as exc:
            raise ActionFailed(f"artifact fetch failed: {exc}", permanent=False) from exc
        except ReconcileError as exc:
            raise ActionFailed(str(exc)) from exc

    async def start(
        self, spec: AppSpec, install_dir: Path, timeout: float | None = None, *,
        runtime_name: str | None = None,
    ) -> LaunchSpec | None:
        """Start `spec` from `install_dir` and wait until it is healthy (at most `timeout`,
        default its start_timeout); raises ActionFailed (after stopping what it started) when
        it is not. Under `runtime_name` (a start-first switch: `<app>@next`) the instance is
        not health-watched yet: the switch does that once it carries the app's name."""
        launch = self.launch_for(spec, install_dir)
        if launch is not None:
            if runtime_name is not None:
                launch = dataclasses.replace(launch, name=runtime_name, log_name=spec.name)
            try:
                await self.runtime.start(launch)
            except ReconcileError as exc:
                raise ActionFailed(f"start failed: {exc}") from exc
        await self.healthy_or_stop(spec, launch, timeout)
        if runtime_name is None:
            self.hooks.watch(spec, launch)
        return launch

    async def healthy_or_stop(
        self, spec: AppSpec, launch: LaunchSpec | None, timeout: float | None,
    ) -> None:
        """Wait until the started (or adopted) `launch` is healthy; stop it and raise
        ActionFailed when it is not."""
        runtime_name = launch.name if launch is not None else spec.name
        ok, message = await self.hooks.wait_healthy(
            spec, launch, (lambda: self.is_alive(runtime_name)) if launch else (lambda: True),
            timeout,
        )
        if not ok:
            if launch is not None:
                await self.runtime.stop(runtime_name)
            raise ActionFailed(f"not healthy: {message}" if message else "not healthy")

    async def stop(self, name: str) -> None:
        await self.hooks.unwatch(name)
        await self.runtime.stop(name)

    def gc(self, name: str, keep: set[str | None]) -> None:
        """Remove the installed versions of `name` other than `keep`."""
        try:
            self.artifacts.gc(name, {Path(p) for p in keep if p})
        except OSError as exc:  # leftovers cost disk, not correctness
            log.warning("%s: could not remove old versions: %s", name, exc)
