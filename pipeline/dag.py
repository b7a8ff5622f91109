"""The DAG of a pipeline, derived from the stages' upstream references (``from:``, ``reward:``, ...).

``base`` is an implicit root node: the pretrained checkpoint every chain starts from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.spec import PipelineSpec
from stages.resources import RESOURCES, StageResources, peak_of_groups

BASE = "base"


class DAGError(ValueError):
    """A missing reference or a cycle; the message names the stages involved."""


@dataclass(frozen=True)
class DAG:
    order: tuple[str, ...]  # every node, dependencies first; "base" first
    parents: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> role -> parent node

    def upstream_closure(self, nodes: set[str]) -> set[str]:
        """The nodes plus everything they depend on."""
        seen, todo = set(), list(nodes)
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo += self.parents.get(node, {}).values()
        return seen

    def independent_groups(self, nodes: list[str], at_most: int, limit: int = 100_000) -> list[tuple[str, ...]] | None:
        """Every set of 1 to ``at_most`` of ``nodes`` none of which is upstream of another: what
        ``max_concurrent_stages: at_most`` may run at once. None when there are more than ``limit``."""
        upstream = {node: self.upstream_closure({node}) - {node} for node in nodes}
        groups: list[tuple[str, ...]] = []

        def extend(group: tuple[str, ...], start: int) -> bool:
            for index in range(start, len(nodes)):
                node = nodes[index]
                if any(node in upstream[g] or g in upstream[node] for g in group):
                    continue
                groups.append(group + (node,))
                if len(groups) > limit:
                    return False
                if len(group) + 1 < at_most and not extend(group + (node,), index + 1):
                    return False
            return True

        return groups if extend((), 0) else None



def build_dag(spec: PipelineSpec) -> DAG:
    parents: dict[str, dict[str, str]] = {BASE: {}}
    known = {BASE, *spec.stages}
    for name, stage in spec.stages.items():
        refs = stage.upstream()
        for role, target in refs.items():
            if target not in known:
                raise DAGError(
                    f"stage {name!r}: {role}: {target!r} is not a stage of this pipeline "
                    f"(stages: {', '.join(sorted(known))})"
                )
            if target == name:
                raise DAGError(f"stage {name!r}: {role}: a stage cannot depend on itself")
        parents[name] = refs
    return DAG(order=tuple(_topological_order(list(parents), parents)), parents=parents)


def _topological_order(nodes: list[str], parents: dict[str, dict[str, str]]) -> list[str]:
    """Kahn's algorithm, keeping the file's order among independent stages."""
    order: list[str] = []
    placed: set[str] = set()
    remaining = list(nodes)
    while remaining:
        ready = [n for n in remaining if set(parents[n].values()) <= placed]
        if not ready:
            raise DAGError(f"the stages form a cycle: {' -> '.join(_find_cycle(remaining, parents))}")
        for node in ready:
            order.append(node)
            placed.add(node)
        remaining = [n for n in remaining if n not in placed]
    return order


def _find_cycle(nodes: list[str], parents: dict[str, dict[str, str]]) -> list[str]:
    """One cycle among the nodes that could not be ordered, for the error message."""
    path: list[str] = []
    node = nodes[0]
    while node not in path:
        path.append(node)
        node = next(p for p in parents[node].values() if p in nodes)
    cycle = path[path.index(node):] + [node]
    return list(reversed(cycle))


def concurrent_peak(dag: DAG, resources: dict[str, StageResources], at_once: int) -> dict[str, float]:
    """What the stages that may run at the same time ask Ray for together, per resource: the largest
    stage's when ``at_once`` is 1; else the largest sum over up to ``at_once`` stages none of which is
    upstream of another (where those are too many to list, the ``at_once`` largest per resource, a bound)."""
    groups = dag.independent_groups(list(resources), at_once)
    if groups is not None:
        return peak_of_groups([resources[node] for node in group] for group in groups)
    return {key: sum(sorted((r.total[key] for r in resources.values()), reverse=True)[:at_once])
            for key in RESOURCES}
