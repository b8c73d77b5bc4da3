"""Dependency graph: start generations, removal order, descendants and cycle reports."""

from __future__ import annotations

import random

import pytest

from reconciler.core.graph import DependencyGraph, format_cycle
from reconciler.core.spec import AppSpec


def apps(edges: dict[str, list[str]]) -> dict[str, AppSpec]:
    return {
        name: AppSpec(name=name, version="1", depends_on=deps) for name, deps in edges.items()
    }


STACK = {
    "broker": [],
    "database": [],
    "api": ["database", "broker"],
    "worker": ["api", "broker"],
    "gateway": ["api"],
    "metrics": [],
}


def test_generations_start_dependencies_first_sorted_inside() -> None:
    graph = DependencyGraph.from_apps(apps(STACK))
    assert graph.generations() == [
        ["broker", "database", "metrics"],
        ["api"],
        ["gateway", "worker"],
    ]
    assert graph.generation_of() == {
        "broker": 0, "database": 0, "metrics": 0, "api": 1, "gateway": 2, "worker": 2,
    }


def test_removal_order_is_dependents_first_even_through_apps_that_stay() -> None:
    graph = DependencyGraph.from_apps(apps(STACK))
    assert graph.removal_order(list(STACK)) == [
        ["gateway", "worker"],
        ["api"],
        ["broker", "database", "metrics"],
    ]
    # api stays, but gateway still has to stop before database (gateway -> api -> database)
    assert graph.removal_order(["database", "gateway"]) == [["gateway"], ["database"]]
    assert graph.removal_order(["ghost", "metrics"]) == [["ghost"], ["metrics"]]
    assert graph.removal_order([]) == []


def test_neighbours_and_descendants() -> None:
    graph = DependencyGraph.from_apps(apps(STACK))
    assert graph.dependencies("worker") == {"api", "broker"}
    assert graph.dependents("api") == {"worker", "gateway"}
    assert graph.descendants("database") == {"api", "worker", "gateway"}
    assert graph.descendants("metrics") == set()
    assert "api" in graph
    assert len(graph) == 6


def test_missing_dependencies_are_left_out_of_the_graph() -> None:
    graph = DependencyGraph.from_edges({"a": ["gone"], "b": ["a"]})
    assert graph.generations() == [["a"], ["b"]]


@pytest.mark.parametrize(
    ("edges", "cycles"),
    [
        (STACK, []),
        ({"a": ["a"]}, [["a"]]),
        ({"a": ["b"], "b": ["a"]}, [["a", "b"]]),
        ({"c": ["a"], "a": ["b"], "b": ["c"], "x": ["a"]}, [["a", "b", "c"]]),
        (
            {"a": ["b"], "b": ["a"], "p": ["q"], "q": ["r"], "r": ["p"], "z": []},
            [["a", "b"], ["p", "q", "r"]],
        ),
    ],
)
def test_find_cycles_one_per_component_in_depends_on_direction(
    edges: dict[str, list[str]], cycles: list[list[str]]
) -> None:
    graph = DependencyGraph.from_edges(edges)
    assert graph.find_cycles() == cycles


def test_format_cycle_and_generations_of_a_cyclic_graph_still_give_an_order() -> None:
    assert format_cycle(["a", "b", "c"]) == "a -> b -> c -> a"
    graph = DependencyGraph.from_edges({"a": ["b"], "b": ["a"], "c": ["a"], "d": []})
    assert graph.generations() == [["a", "b", "d"], ["c"]]


def test_cycles_on_a_large_graph() -> None:
    """10,000 apps, ~30,000 edges: one cycle is found among them (bench/ has the timing)."""
    n = 10_000
    edges = {f"app{i}": [f"app{j}" for j in (i - 1, i - 7, i - 100) if j >= 0] for i in range(n)}
    assert DependencyGraph.from_edges(edges).find_cycles() == []
    edges["app0"] = ["app9999"]
    (cycle,) = DependencyGraph.from_edges(edges).find_cycles()
    assert cycle[0] == "app0"
    # each depends on the next, the last on the first
    assert all(b in edges[a] for a, b in zip(cycle, [*cycle[1:], cycle[0]], strict=True))
    # and it is the shortest: app0, app9999, then 9899 down to app100 in 98 steps of 100,
    # 14 of 7 and 1 of 1 (113 more names), and app100 depends on app0
    assert len(cycle) == 2 + 113


def _reach(edges: dict[str, list[str]]) -> dict[str, set[str]]:
    """name -> every app it depends on, directly or not (a plain search per app)."""
    reach: dict[str, set[str]] = {}
    for start in edges:
        seen: set[str] = set()
        todo = list(edges[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(edges[node])
        reach[start] = seen
    return reach


@pytest.mark.parametrize("seed", range(40))
def test_properties_on_random_graphs(seed: int) -> None:
    """Generations, cycles and descendants against their definitions on small random graphs,
    with and without cycles."""
    rng = random.Random(seed)
    names = [f"a{i}" for i in range(rng.randint(1, 12))]
    edges = {n: rng.sample(names, rng.randint(0, min(3, len(names)))) for n in names}
    if seed % 2:  # half of them acyclic: depend only on earlier names
        edges = {n: [d for d in deps if names.index(d) < names.index(n)]
                 for n, deps in edges.items()}
    graph = DependencyGraph.from_edges(edges)
    reach = _reach(edges)
    on_cycle = {n for n in names if n in reach[n]}

    generation = graph.generation_of()
    assert sorted(generation) == sorted(names)
    for name, deps in edges.items():
        for dep in deps:
            same_cycle = name in reach[dep]
            assert (generation[dep] == generation[name]) if same_cycle else (
                generation[dep] < generation[name])
    assert graph.removal_order(names) == [sorted(g) for g in reversed(graph.generations())]

    cycles = graph.find_cycles()
    assert {n for cycle in cycles for n in cycle} <= on_cycle
    components = {frozenset(m for m in on_cycle if m in reach[n] and n in reach[m])
                  for n in on_cycle}
    assert len(cycles) == len(components)  # one per component, each inside its own
    assert all(sum(set(cycle) <= comp for comp in components) == 1 for cycle in cycles)
    for cycle in cycles:
        assert cycle[0] == min(cycle) and len(set(cycle)) == len(cycle)
        assert all(b in edges[a] for a, b in zip(cycle, [*cycle[1:], cycle[0]], strict=True))

    for name in names:
        assert graph.descendants(name) == {n for n in names if name in reach[n]} - {name}
        assert graph.dependents(name) == {n for n in names if name in edges[n]}
