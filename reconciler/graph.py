"""Dependency graph of apps (networkx): generations, removal order, descendants, cycles. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import networkx as nx

from reconciler.spec import AppSpec


def format_cycle(cycle: list[str]) -> str:
    """['a', 'b', 'c'] -> 'a -> b -> c -> a' (read: a depends on b, ...)."""
    return " -> ".join([*cycle, cycle[0]]) if cycle else ""


class DependencyGraph:
    """Apps as nodes, an edge dependency -> dependent, so topological order is start order.

    Dependencies that name no app in the graph are left out (the loader reports them)."""

    def __init__(self, graph: nx.DiGraph) -> None:
        self.graph = graph

    @classmethod
    def from_apps(cls, apps: Mapping[str, AppSpec]) -> DependencyGraph:
        return cls.from_edges({name: app.depends_on for name, app in apps.items()})

    @classmethod
    def from_edges(cls, depends_on: Mapping[str, Iterable[str]]) -> DependencyGraph:
        """From name -> names it depends on (e.g. the installed apps' recorded dependencies)."""
        graph: nx.DiGraph = nx.DiGraph()
        graph.add_nodes_from(depends_on)
        graph.add_edges_from(
            (dep, name) for name, deps in depends_on.items() for dep in deps if dep in depends_on
        )
        return cls(graph)

    def __contains__(self, name: object) -> bool:
        return name in self.graph

    def __len__(self) -> int:
        return int(self.graph.number_of_nodes())

    def generations(self) -> list[list[str]]:
        """Start order: every app comes after all its dependencies; names sorted inside a
        generation. Apps on a cycle (which a valid spec tree never has) share a generation
        instead of raising, so callers always get an order."""
        if nx.is_directed_acyclic_graph(self.graph):
            return [sorted(gen) for gen in nx.topological_generations(self.graph)]
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
        unknown = sorted(n for n in wanted if n not in self.graph)
        order = [unknown] if unknown else []
        for gen in reversed(self.generations()):
            chosen = [n for n in gen if n in wanted]
            if chosen:
                order.append(chosen)
        return order

    def dependencies(self, name: str) -> set[str]:
        """What `name` depends on directly."""
        return set(self.graph.predecessors(name))

    def dependents(self, name: str) -> set[str]:
        """Apps that depend on `name` directly."""
        return set(self.graph.successors(name))

    def descendants(self, name: str) -> set[str]:
        """Every app that depends on `name`, directly or through others."""
        return set(nx.descendants(self.graph, name))

    def find_cycles(self) -> list[list[str]]:
        """One cycle per strongly connected component that has one, in depends-on direction
        (['a', 'b'] means a depends on b depends on a), each rotated to start at its smallest
        name, sorted. Linear time: SCCs first (Tarjan), then one cycle inside each."""
        cycles: list[list[str]] = []
        for scc in nx.strongly_connected_components(self.graph):
            if len(scc) == 1:
                (only,) = scc
                if self.graph.has_edge(only, only):
                    cycles.append([only])
                continue
            start = min(scc)
            sub = self.graph.subgraph(scc)
            # Edges run dependency -> dependent; walk them backwards to read "depends on".
            edges = nx.find_cycle(sub.reverse(copy=False), source=start)
            cycle = [u for u, _v in edges]
            low = cycle.index(min(cycle))
            cycles.append(cycle[low:] + cycle[:low])
        return sorted(cycles)
