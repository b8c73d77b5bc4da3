"""App spec models (pydantic v2): the validated shape of one app document. Pure."""

from __future__ import annotations

import hashlib
import json
import re
import signal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
NAME_RE = re.compile(NAME_PATTERN)
LABEL_KEY_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9._-]{0,63}$"

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """'500ms', '5s', '2m', '1h' or a bare number of seconds -> seconds as float."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '5s', '2m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(f"invalid duration {value!r}: use e.g. '500ms', '5s', '2m', '1h'")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError("a duration is a number of seconds or a string like '5s', '2m'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"},
                {"type": "number", "minimum": 0},
            ],
            "description": "seconds, or a string like '500ms', '5s', '2m', '1h'",
        }
    ),
]
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="DNS-label style name")]


def _check_signal(value: str) -> str:
    name = value.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name not in signal.Signals.__members__:
        raise ValueError(f"unknown signal {value!r}")
    return name


SignalName = Annotated[str, AfterValidator(_check_signal)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Selector(StrictModel):
    """Label selector: every clause must hold (like Kubernetes matchLabels/matchExpressions)."""

    match: dict[str, str] = Field(default_factory=dict, description="labels that must equal")
    in_: dict[str, list[str]] = Field(
        default_factory=dict, alias="in", description="label must be one of the values"
    )
    notin: dict[str, list[str]] = Field(
        default_factory=dict, description="label absent or not one of the values"
    )
    exists: list[str] = Field(default_factory=list, description="labels that must be present")
    absent: list[str] = Field(default_factory=list, description="labels that must be missing")

    def matches(self, labels: dict[str, str]) -> bool:
        if any(labels.get(key) != value for key, value in self.match.items()):
            return False
        if any(labels.get(key) not in values for key, values in self.in_.items()):
            return False
        if any(labels.get(key) in values for key, values in self.notin.items()):
            return False
        if any(key not in labels for key in self.exists):
            return False
        return not any(key in labels for key in self.absent)

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.match.items())]
        parts += [f"{k} in ({','.join(v)})" for k, v in sorted(self.in_.items())]
        parts += [f"{k} notin ({','.join(v)})" for k, v in sorted(self.notin.items())]
        parts += list(self.exists) + [f"!{k}" for k in self.absent]
        return ", ".join(parts) or "every node"


class NoSource(StrictModel):
    type: Literal["none"] = "none"


class ArchiveSource(StrictModel):
    """A tar.gz / tgz / zip archive, verified by sha256 before it is unpacked."""

    type: Literal["archive"]
    url: str = Field(description="http(s):// or file:// URL; relative paths are repo-relative")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex digest of the archive")
    strip_components: int = Field(default=0, ge=0, le=8)


class GitSource(StrictModel):
    """Files from a git repository at a ref (branch, tag or commit)."""

    type: Literal["git"]
    url: str
    ref: str = Field(default="HEAD", min_length=1)
    subdir: str | None = None


Source = Annotated[NoSource | ArchiveSource | GitSource, Field(discriminator="type")]


class RunSpec(StrictModel):
    """How to start the app's process. `command` is an argv list, never a shell string."""

    command: list[str] = Field(min_length=1, description="argv; the first item is the program")
    shell: bool = Field(
        default=False,
        description="run command[0] with /bin/sh -c; must be asked for explicitly",
    )
    env: dict[str, str] = Field(default_factory=dict)
    env_files: list[str] = Field(
        default_factory=list, description="KEY=VALUE files read on the node at start"
    )
    workdir: str | None = Field(
        default=None, description="relative to the app's install dir, or absolute"
    )
    stop_signal: SignalName = "SIGTERM"
    stop_timeout: Duration = 10.0

    @model_validator(mode="after")
    def _shell_needs_one_string(self) -> RunSpec:
        if self.shell and len(self.command) != 1:
            raise ValueError("with shell: true, command must be a single string in a list")
        for key in self.env:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"invalid environment variable name {key!r}")
        return self


class HttpProbe(StrictModel):
    url: str = Field(pattern=r"^https?://")
    expect_status: list[int] = Field(default_factory=lambda: [200])


class TcpProbe(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)


class ExecProbe(StrictModel):
    command: list[str] = Field(min_length=1)


class HealthSpec(StrictModel):
    """One probe (http, tcp or exec). No probe: healthy while the process runs."""

    http: HttpProbe | None = None
    tcp: TcpProbe | None = None
    exec: ExecProbe | None = None
    interval: Duration = 5.0
    timeout: Duration = 2.0
    failure_threshold: int = Field(default=3, ge=1, le=100)
    start_timeout: Duration = 60.0

    @model_validator(mode="after")
    def _one_probe(self) -> HealthSpec:
        probes = [p for p in (self.http, self.tcp, self.exec) if p is not None]
        if len(probes) > 1:
            raise ValueError("give at most one of http, tcp, exec")
        return self

    @property
    def probe_kind(self) -> str | None:
        for kind in ("http", "tcp", "exec"):
            if getattr(self, kind) is not None:
                return kind
        return None


class Backoff(StrictModel):
    initial: Duration = 1.0
    max: Duration = 60.0


class RestartSpec(StrictModel):
    policy: Literal["always", "on-failure", "never"] = "always"
    backoff: Backoff = Field(default_factory=Backoff)
    max_restarts: int = Field(
        default=5, ge=1, description="restarts within `window` after which the app is failed"
    )
    window: Duration = 300.0


class UpgradeSpec(StrictModel):
    rollback: bool = Field(default=True, description="roll back when the new version fails")


# Fields that describe or place an app but do not shape its process: a change in them
# alone is stored (status, removal order, dependency gating) without restarting it.
METADATA_FIELDS: tuple[str, ...] = ("description", "labels", "layer", "nodes", "depends_on")


def _digest(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def metadata_hash_of(spec_json: dict[str, Any]) -> str:
    """metadata_hash of an app from its JSON form (a stored spec_json, parsed)."""
    return _digest({key: spec_json.get(key) for key in METADATA_FIELDS})


class AppSpec(StrictModel):
    """One app: what to run, where, after what, and how to know it is healthy."""

    name: Name
    version: str = Field(min_length=1, max_length=128)
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    layer: str | None = None
    nodes: Selector | None = Field(default=None, description="absent: every node")
    depends_on: list[Name] = Field(default_factory=list)
    source: Source = Field(default_factory=NoSource)
    run: RunSpec | None = None
    health: HealthSpec = Field(default_factory=HealthSpec)
    restart: RestartSpec = Field(default_factory=RestartSpec)
    upgrade: UpgradeSpec = Field(default_factory=UpgradeSpec)
    suspend: bool = False

    @model_validator(mode="before")
    @classmethod
    def _version_must_be_text(cls, data: Any) -> Any:
        version = data.get("version") if isinstance(data, dict) else None
        if isinstance(version, int | float) and not isinstance(version, bool):
            raise ValueError(
                f"version {data['version']!r} was read as a number; quote it "
                f"(version: \"{data['version']}\") so 1.10 does not become 1.1"
            )
        return data

    @model_validator(mode="after")
    def _no_self_dependency(self) -> AppSpec:
        if self.name in self.depends_on:
            raise ValueError(f"app {self.name!r} depends on itself")
        return self

    def spec_hash(self) -> str:
        """Hash of what shapes the running process: version, source, run, health, restart,
        upgrade. Metadata (METADATA_FIELDS) and suspend are left out, so relabeling an app
        does not restart it (see metadata_hash)."""
        payload = self.model_dump(
            mode="json", by_alias=True, exclude={"suspend", *METADATA_FIELDS}
        )
        return _digest(payload)

    def metadata_hash(self) -> str:
        """Hash of the fields that do not touch the process (METADATA_FIELDS): a change here
        is persisted without a restart."""
        return metadata_hash_of(self.model_dump(mode="json", by_alias=True))

    def targets(self, labels: dict[str, str]) -> bool:
        return self.nodes is None or self.nodes.matches(labels)


def app_json_schema() -> dict[str, Any]:
    """JSON Schema of one app document, for editors (yaml-language-server)."""
    schema = AppSpec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "gitops-mesh app"
    return schema
