"""Targeting: node labels, selector implication, and the desired state of one node. Pure."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from reconciler.errors import SpecProblem
from reconciler.spec import LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, AppSpec, Selector
from reconciler.state import DesiredState

if TYPE_CHECKING:
    from reconciler.loader import LoadResult

_KEY_RE = re.compile(LABEL_KEY_PATTERN)
_VALUE_RE = re.compile(LABEL_VALUE_PATTERN)


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """["role=gateway", "zone=eu-1"] -> {"role": "gateway", "zone": "eu-1"}.

    Raises ValueError naming the bad item: no '=', an invalid key or value, or one key
    given twice with different values."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise ValueError(f"label {item!r}: expected KEY=VALUE, e.g. role=gateway")
        if not _KEY_RE.match(key):
            raise ValueError(
                f"label {item!r}: invalid key {key!r} (letters, digits, '.', '_', '/', '-'; "
                "at most 63 characters, starting and ending with a letter or digit)"
            )
        if not _VALUE_RE.match(value):
            raise ValueError(
                f"label {item!r}: invalid value {value!r} "
                "(letters, digits, '.', '_', '-'; at most 63 characters)"
            )
        if key in labels and labels[key] != value:
            raise ValueError(f"label {key!r} given twice: {labels[key]!r} and {value!r}")
        labels[key] = value
    return labels


def _values(sel: Selector, key: str) -> set[str] | None:
    """The values `key` can take on every node `sel` matches; None when not pinned down."""
    if key in sel.match:
        return {sel.match[key]}
    if key in sel.in_:
        return set(sel.in_[key])
    return None


def selector_implies(narrow: Selector | None, wide: Selector | None) -> bool:
    """True when every node `narrow` matches is matched by `wide` (None = every node).

    Conservative: False means "could not prove it", which the loader reports so a user
    targets a dependency at least wherever its dependent runs."""
    if wide is None:
        return True
    if narrow is None:
        return wide.describe() == "every node"
    for key, value in wide.match.items():
        if _values(narrow, key) != {value}:
            return False
    for key, allowed in wide.in_.items():
        values = _values(narrow, key)
        if values is None or not values <= set(allowed):
            return False
    for key, banned in wide.notin.items():
        values = _values(narrow, key)
        excluded = key in narrow.absent or set(banned) <= set(narrow.notin.get(key, ()))
        if not excluded and (values is None or values & set(banned)):
            return False
    for key in wide.exists:
        if _values(narrow, key) is None and key not in narrow.exists:
            return False
    return all(key in narrow.absent for key in wide.absent)


def _describe(selector: Selector | None) -> str:
    return "every node" if selector is None else f"nodes with {selector.describe()}"


def untargeted_dependency_message(app: AppSpec, dep: AppSpec) -> str:
    return (
        f"{app.name!r} runs on {_describe(app.nodes)} but its dependency {dep.name!r} only on "
        f"{_describe(dep.nodes)}; target {dep.name!r} at least wherever {app.name!r} runs"
    )


def desired_for_node(
    result: LoadResult, node_id: str, labels: dict[str, str], revision: str
) -> DesiredState:
    """What the spec tree asks of the node with these labels.

    Valid apps whose selector matches go in `apps`. An app whose dependency is not targeted
    at this node (a combination the loader's static check could not rule out) is invalid
    here, with a located problem. `invalid` keeps the tree's invalid apps except those whose
    valid spec shows they do not target this node; the planner holds them."""
    targeted = {
        name: app
        for name, app in result.apps.items()
        if name not in result.invalid and app.targets(labels)
    }
    problems = list(result.problems)
    node_invalid: set[str] = set()
    for name, app in targeted.items():
        for index, dep in enumerate(app.depends_on):
            if dep in targeted or dep in result.invalid:
                continue
            node_invalid.add(name)
            path, line = result.sources.get(name, ("?", 0))
            where = result.locations.get((name, index), (line, 1))
            dep_spec = result.apps.get(dep)
            detail = (
                f"its dependency {dep!r} is not targeted at node {node_id!r} "
                f"({dep_spec.nodes.describe() if dep_spec and dep_spec.nodes else 'missing'})"
            )
            problems.append(
                SpecProblem(path, where[0], where[1], detail, field=f"depends_on[{index}]")
            )
    invalid = {
        name
        for name in result.invalid
        if name not in result.apps or result.apps[name].targets(labels)
    } | node_invalid
    return DesiredState(
        revision=revision,
        apps={n: a for n, a in sorted(targeted.items()) if n not in node_invalid},
        invalid=frozenset(invalid),
        problems=tuple(sorted(problems)),
    )
