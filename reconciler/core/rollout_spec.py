"""The `rollout.yaml` model (pydantic v2) and its located parse (path:line:col). Pure.

`rollout.yaml` sits at the spec repository's root, outside the apps path. It tells how a new
revision rolls across the fleet: waves in order (a node belongs to the first wave whose
selector matches it; a node matching none is in the last wave), how many nodes of a wave
apply at once, how long a synced wave bakes before the next opens, and when to abort.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from reconciler.core.errors import SpecProblem
from reconciler.core.spec import Duration, Selector, StrictModel

ROLLOUT_FILE = "rollout.yaml"
MAX_ROLLOUT_BYTES = 64 * 1024
WAVE_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def _count_or_percent(value: Any) -> int | str:
    """3 or "25%" (kept as written, normalized to "25%"); anything else is refused."""
    if isinstance(value, bool):
        raise ValueError("expected a count like 2 or a percentage like \"25%\"")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a count cannot be negative")
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        match = _PERCENT.match(text)
        if match:
            pct = float(match.group(1))
            if pct > 100:
                raise ValueError(f"{value!r}: a percentage is at most 100%")
            return f"{match.group(1)}%"
    raise ValueError(f"{value!r}: expected a count like 2 or a percentage like \"25%\"")


CountOrPercent = Annotated[
    int | str,
    BeforeValidator(_count_or_percent),
    WithJsonSchema({
        "anyOf": [{"type": "integer", "minimum": 0},
                  {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*%\s*$"}],
        "description": "a count, or a percentage like \"25%\"",
    }),
]


def resolve_count(value: int | str, total: int, *, at_least_one: bool) -> int:
    """A count as is; "N%" of `total`, rounded down (at least 1 when `at_least_one`)."""
    if isinstance(value, int):
        count = value
    else:
        count = math.floor(float(value.rstrip("%")) * total / 100 + 1e-9)
    return max(1, count) if at_least_one else count


class Wave(StrictModel):
    """One wave: which nodes, and how many of them may be applying at once."""

    model_config = ConfigDict(defer_build=True)  # built on first use (see RolloutSpec)

    name: str = Field(pattern=WAVE_NAME_PATTERN, description="[a-z0-9-], unique")
    nodes: Selector = Field(default_factory=Selector,
                            description="app selector language; {} = every remaining node")
    max_unavailable: CountOrPercent = Field(
        default="100%", description="nodes of the wave applying at once (count or \"N%\")")


class RolloutSpec(StrictModel):
    """How a revision rolls across the fleet (rollout.yaml at the repository root)."""

    # Built on first use: a repository without rollout.yaml (and `node --once`) never pays it.
    model_config = ConfigDict(defer_build=True)

    waves: list[Wave] = Field(min_length=1, max_length=64)
    bake: Duration = Field(default=0.0, description="a wave synced and healthy this long "
                                                    "before the next opens")
    progress_deadline: Duration = Field(default=600.0, description="a node applying longer "
                                                                   "than this counts failed")
    max_failed: CountOrPercent = Field(default=0, description="failed nodes tolerated (count "
                                                              "or \"N%\" of targeted nodes)")
    revert: bool = Field(default=True, description="on abort, nodes that applied the "
                                                   "revision go back to the last completed one")

    @model_validator(mode="after")
    def _unique_names(self) -> RolloutSpec:
        seen: set[str] = set()
        for wave in self.waves:
            if wave.name in seen:
                raise ValueError(f"wave name {wave.name!r} is used twice")
            seen.add(wave.name)
        return self

    def wave_of(self, labels: dict[str, str]) -> int:
        """Index of the first wave whose selector matches `labels`; no match: the last."""
        for index, wave in enumerate(self.waves):
            if wave.nodes.matches(labels):
                return index
        return len(self.waves) - 1


def rollout_json_schema() -> dict[str, Any]:
    schema = RolloutSpec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "gitops-mesh rollout.yaml"
    return schema


def _wave_wording(problem: SpecProblem) -> SpecProblem:
    """The loader words a bad `name` for apps; here it names a wave."""
    if problem.message.startswith("invalid app name"):
        message = problem.message.replace("invalid app name", "invalid wave name", 1)
        message = message.split(" (names become", 1)[0]
        return SpecProblem(problem.path, problem.line, problem.col, message, problem.field)
    return problem


def parse_rollout(path: str, data: bytes, max_bytes: int = MAX_ROLLOUT_BYTES
                  ) -> tuple[RolloutSpec | None, list[SpecProblem]]:
    """rollout.yaml bytes -> (spec, []) or (None, located problems). Never raises.

    Reads the YAML with the app loader's event composer (the same depth, alias and size
    limits) and maps pydantic errors back to `path:line:col`."""
    # The YAML reader only here: the mesh and the console use the models without it (~25 ms).
    import yaml

    from reconciler.core import loader

    if len(data) > max_bytes:
        return None, [SpecProblem(path, 1, 1, f"file is larger than {max_bytes} bytes; refused")]
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        parsed = loader.parse_file(loader.SpecFile(path, data))  # its located UTF-8 message
        return None, list(parsed.problems) or [SpecProblem(path, 1, 1, "not valid UTF-8")]
    composer: loader._Composer | None = None
    problems: list[SpecProblem] = []
    try:
        composer = loader._Composer(path, text)
        documents = list(composer.documents())
        problems.extend(composer.problems)
        if len(documents) != 1:
            problems.append(SpecProblem(path, 1, 1, "rollout.yaml holds exactly one document"))
            return None, problems
        value, line, col = documents[0]
        if not isinstance(value, dict):
            problems.append(SpecProblem(path, line, col, "rollout.yaml must be a mapping "
                                                         "(waves: [...], bake: ...)"))
            return None, problems
        if problems:
            return None, problems
        try:
            return RolloutSpec.model_validate(value), []
        except ValidationError as exc:
            return None, sorted(_wave_wording(p) for p in
                                loader._pydantic_problems(path, composer.locs, exc))
    except loader._Refused as exc:
        return None, [*problems, SpecProblem(path, exc.line, exc.col, exc.message)]
    except yaml.YAMLError as exc:
        return None, [*problems, loader._yaml_error(path, text, exc)]
    finally:
        if composer is not None:
            composer.close()
