"""Dependency graph of apps (networkx): generations, removal order, descendants, cycles. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from reconciler.core.spec import AppSpec

if TYPE_CHECKING:
    import networkx as nx


def format_cycle(cycle: list[str]) -> str:
    """['a', 'b', 'c'] -> 'a -> b -> c -> a' (read: a depends on b, ...)."""
    return " -> ".join([*cycle, cycle[0]]) if cycle else ""


class DependencyGraph:
    """Apps as nodes, an edge dependency -> dependent, so topological order is start order.

    Dependencies that name no app in the graph are left out (the loader reports them).
    Generations are computed on plain dicts (Kahn's algorithm): building a networkx graph
    costs more than the whole sort, so `graph` (the networkx DiGraph used for cycles,
    descendants and anything else) is only built when first asked for."""

    def __init__(self, depends_on: Mapping[str, Iterable[str]]) -> None:
        self._deps: dict[str, tuple[str, ...]] = {
            # dict.fromkeys: a dependency listed twice is one edge
            name: tuple(dict.fromkeys(d for d in deps if d in depends_on))
            for name, deps in depends_on.items()
        }
        self._graph: nx.DiGraph | None = None
        self._generations: list[list[str]] | None = None
        self._acyclic = False  # known once generations() ran

    @classmethod
    def from_apps(cls, apps: Mapping[str, AppSpec]) -> DependencyGraph:
        return cls({name: app.depends_on for name, app in apps.items()})

    @classmethod
    def from_edges(cls, depends_on: Mapping[str, Iterable[str]]) -> DependencyGraph:
        """From name -> names it depends on (e.g. the installed apps' recorded dependencies)."""
        return cls(depends_on)

    @property
    def graph(self) -> nx.DiGraph:
        # Imported here: networkx costs ~15 MB of agent RSS, and the common path (an
        # acyclic tree: generations + the cycle check) never needs it.
        import networkx as nx

        if self._graph is None:
            graph: nx.DiGraph = nx.DiGraph()
            graph.add_nodes_from(self._deps)
            graph.add_edges_from(
                (dep, name) for name, deps in self._deps.items() for dep in deps
            )
            self._graph = graph
        return self._graph

    def __contains__(self, name: object) -> bool:
        return name in self._deps

    def __len__(self) -> int:
        return len(self._deps)

    def generations(self) -> list[list[str]]:
        """Start order: every app comes after all its dependencies; names sorted inside a
        generation. Apps on a cycle (which a valid spec tree never has) share a generation
        instead of raising, so callers always get an order."""
        if self._generations is None:
            order = self._kahn()
            self._acyclic = order is not None
            self._generations = order if order is not None else self._condensed_generations()
        return [list(gen) for gen in self._generations]

    def _kahn(self) -> list[list[str]] | None:
        waiting = {name: len(deps) for name, deps in self._deps.items()}
        dependents: dict[str, list[str]] = {name: [] for name in self._deps}
        for name, deps in self._deps.items():
            for dep in deps:
                dependents[dep].append(name)
        generation = sorted(name for name, count in waiting.items() if count == 0)
        order: list[list[str]] = []
        placed = 0
        while generation:
            order.append(generation)
            placed += len(generation)
            ready: list[str] = []
            for name in generation:
                for dependent in dependents[name]:
                    waiting[dependent] -= 1
                    if waiting[dependent] == 0:
                        ready.append(dependent)
            generation = sorted(ready)
        return order if placed == len(self._deps) else None

    def _condensed_generations(self) -> list[list[str]]:
        import networkx as nx

        condensed = nx.condensation(self.graph)
        members = condensed.graph["mapping"]
        groups: list[list[str]] = []
        for gen in nx.topological_generations(condensed):
            ids = set(gen)
            groups.append(sorted(n for n, scc in members.items() if scc in ids))
        return groups

    def generation_of(self) -> dict[str, int]:
        return {name: i for i, gen in enumerate(self.generations()) for name in gen}

    def removal_order(self, names: Iterable[str]) -> list[list[str]]:
        """Stop order for `names`: dependents before what they depend on (also through apps
        that are not being removed), empty generations dropped. Unknown names go first."""
        wanted = set(names)
        unknown = sorted(n for n in wanted if n not in self._deps)
        order = [unknown] if unknown else []
        for gen in reversed(self.generations()):
            chosen = [n for n in gen if n in wanted]
            if chosen:
                order.append(chosen)
        return order

    def dependencies(self, name: str) -> set[str]:
        """What `name` depends on directly."""
        return set(self._deps[name])

    def dependents(self, name: str) -> set[str]:
        """Apps that depend on `name` directly."""
        return set(self.graph.successors(name))

    def descendants(self, name: str) -> set[str]:
        """Every app that depends on `name`, directly or through others."""
        import networkx as nx

        return set(nx.descendants(self.graph, name))

    def find_cycles(self) -> list[list[str]]:
        """One cycle per strongly connected component that has one, in depends-on direction
        (['a', 'b'] means a depends on b depends on a), each starting at the component's
        smallest name and as short as possible through it, sorted. Linear time: SCCs first
        (Tarjan), then a breadth-first search inside each. An acyclic graph (the common case)
        is recognised by the generations sort alone."""
        self.generations()
        if self._acyclic:
            return []
        import networkx as nx

        cycles: list[list[str]] = []
        for scc in nx.strongly_connected_components(self.graph):
            if len(scc) == 1:
                (only,) = scc
                if self.graph.has_edge(only, only):
                    cycles.append([only])
                continue
            cycles.append(self._shortest_cycle_through(min(scc), scc))
        return sorted(cycles)

    def _shortest_cycle_through(self, start: str, scc: set[str]) -> list[str]:
        deps = self._deps
        parent: dict[str, str] = {start: start}
        frontier = [start]
        while frontier:
            nxt: list[str] = []
            for node in frontier:
                for dep in deps[node]:
                    if dep == start:
                        path = [node]
                        while path[-1] != start:
                            path.append(parent[path[-1]])
                        return path[::-1]
                    if dep in scc and dep not in parent:
                        parent[dep] = node
                        nxt.append(dep)
            frontier = nxt
        raise AssertionError(f"{start} is on no cycle of its component")  # pragma: no cover
