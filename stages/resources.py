"""The resource plan of a stage: what it asks Ray for, computed from its typed config alone.

    plan = stage_resources(config, "ppo")
    print(plan.describe())
    check_fits(plan, ray.cluster_resources())      # fail at once, naming what is missing
    pg = ready_placement_group(plan.bundles(STAGE_ACTORS), plan.stage)   # bounded wait

One plan serves the runner's fail-fast check (``pipeline.runner``), the PPO stage's placement
group, ``rayalign plan`` and the KubeRay sizing of ``rayalign k8s``, so they cannot disagree.

The groups and their rules:

* training workers: ``scaling.num_workers`` x ``cpus_per_worker`` CPUs, and with ``use_gpu``
  ``gpus_per_worker`` GPUs (0 means 1, as the launcher does). Ray Train reserves their placement group.
* rollout engines (``kind: ppo``): ``rollout.num_engines`` x ``cpus_per_engine`` CPUs and
  ``gpus_per_engine`` GPUs per engine. Left at 0 with ``use_gpu`` training, an engine takes one GPU per
  tensor-parallel rank (``tensor_parallel_size``); with CPU training it takes none, as before. An engine
  has one bundle per TP rank: rank 0's holds the engine actor's CPUs and every bundle holds
  ``GPUs / tensor_parallel_size`` (vLLM's rank workers take those, so they should be packed on one
  node for NVLink).
* colocated engines (``rollout.colocate``): no bundles and no CPUs of their own; they take a share
  of a GPU beside the training workers, ``gpus_per_engine`` or, with GPU training, 0.5
  (``COLOCATED_GPU_SHARE``). Ray counts fractions of a GPU, so a GPU holds a trainer and an engine only
  when their shares add up to at most 1 (``scaling.gpus_per_worker: 0.5`` next to 0.5-GPU engines);
  the plan says so in its notes, and its total is what Ray is asked for (trainer GPUs + shares).
* the reward-model actor (``kind: ppo`` with ``reward:`` and ``reward_placement: actor``): one bundle of
  ``cpus_per_engine`` CPUs and one engine rank's GPUs (``gpus_per_engine / tensor_parallel_size``, or 1
  with GPU training), in the PPO stage's placement group after the engines' bundles.
* eval actors (``kind: eval``): ``generation.concurrency`` x ``cpus_per_actor`` / ``gpus_per_actor``
  in a Ray Data actor pool per model, times the models evaluated at once (``max_concurrent_models``).

Memory is per member in bytes; 0 means the stage does not ask Ray to reserve any (none does today:
model sizes are not known from the config), and :func:`check_fits` compares it only when set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from stages.config import ConfigModel, TrainingStageConfig

TRAINING = "training worker"
ROLLOUT = "rollout engine"
REWARD = "reward-model actor"
EVAL = "eval actor"
# The groups the PPO driver places in its own placement group (Ray Train places the workers).
STAGE_ACTORS = (ROLLOUT, REWARD)

COLOCATED_GPU_SHARE = 0.5  # of one GPU per colocated engine, when gpus_per_engine is left 0
PLACEMENT_TIMEOUT_S = 120.0  # reserving bundles: longer means the cluster is busy or too small
READY_TIMEOUT_S = 900.0  # an actor loading its model (an 8B+ checkpoint into vLLM takes minutes)
RESOURCES = ("CPU", "GPU", "memory")  # the Ray resource names a plan uses


class InsufficientResources(RuntimeError):
    """The Ray cluster lacks what a stage needs; the message names each missing resource."""


class PlacementTimeout(TimeoutError):
    """Bundles or actors were not ready in time; the message names what was asked for."""


@dataclass(frozen=True)
class ResourceGroup:
    """``count`` identical members (workers or actors) and what each one asks Ray for."""

    role: str  # TRAINING, ROLLOUT, REWARD or EVAL
    count: int
    cpus: float  # per member
    gpus: float  # per member (all of its ranks)
    memory: int = 0  # bytes per member; 0: not reserved
    colocated: bool = False  # shares the training workers' GPUs: no bundles of its own
    ranks: int = 1  # bundles per member: an engine's tensor-parallel ranks

    @property
    def total(self) -> dict[str, float]:
        return {"CPU": self.count * self.cpus, "GPU": self.count * self.gpus, "memory": self.count * self.memory}

    @property
    def actor_gpus(self) -> float:
        """GPUs of the member's own process: with tensor parallelism its rank workers hold them instead."""
        return self.gpus if self.ranks == 1 else 0.0

    def member_bundles(self) -> list[dict[str, float]]:
        """One member's bundles: rank 0 holds its CPUs and memory, every rank its share of the GPUs."""
        bundles = []
        for rank in range(self.ranks):
            bundle = {"CPU": self.cpus, "memory": self.memory} if rank == 0 else {}
            bundle["GPU"] = self.gpus / self.ranks
            bundles.append({key: value for key, value in bundle.items() if value})
        return bundles if any(bundles) else []  # nothing to reserve (Ray rejects empty bundles)

    def bundles(self) -> list[dict[str, float]]:
        """Every member's bundles in member order (member ``i`` starts at ``i * ranks``); none when colocated."""
        return [] if self.colocated else [dict(b) for _ in range(self.count) for b in self.member_bundles()]

    def describe(self) -> str:
        """``2 training workers x 1 CPU, 1 GPU``."""
        extra = [f"TP {self.ranks}"] if self.ranks > 1 else []
        extra += ["colocated with the training workers"] if self.colocated else []
        each = format_amounts({"CPU": self.cpus, "GPU": self.gpus, "memory": self.memory})
        return f"{_members(self.count, self.role)} x {each}" + (f" ({', '.join(extra)})" if extra else "")


@dataclass(frozen=True)
class StageResources:
    """What one stage asks Ray for while it runs: its groups, all alive at once."""

    stage: str
    groups: tuple[ResourceGroup, ...] = ()
    notes: tuple[str, ...] = field(default=())  # placements the plan cannot make work (see colocate)

    @property
    def uses_ray(self) -> bool:
        return bool(self.groups)

    def group(self, role: str) -> ResourceGroup | None:
        return next((g for g in self.groups if g.role == role), None)

    @property
    def total(self) -> dict[str, float]:
        """CPU, GPU and memory summed over every group: what Ray must hold at the same time."""
        return {key: sum(g.total[key] for g in self.groups) for key in RESOURCES}

    def bundles(self, roles: Iterable[str] | None = None) -> list[dict[str, float]]:
        """The bundles of the groups with a placement of their own, in group order (all roles by default)."""
        wanted = set(roles) if roles is not None else {g.role for g in self.groups}
        return [b for g in self.groups if g.role in wanted for b in g.bundles()]

    def describe(self) -> str:
        """A few human-readable lines: the total, then one line per group, then the notes."""
        if not self.groups:
            return f"{self.stage}: runs in the driver (no Ray resources)"
        lines = [f"{self.stage}: {format_amounts(self.total)} in all"]
        lines += [f"  {g.describe()}" for g in self.groups]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- the plan


def stage_resources(config: ConfigModel, stage: str | None = None) -> StageResources:
    """The resource plan of a stage from its config (pure: no Ray, no files)."""
    from stages.evaluate.config import EvalConfig
    from stages.ppo.config import PPOConfig

    name = stage or getattr(config, "kind", "base")
    if isinstance(config, PPOConfig):
        groups = (training_workers(config), *ppo_actors(config))
        return StageResources(name, groups, tuple(colocation_notes(config, groups)))
    if isinstance(config, TrainingStageConfig):
        return StageResources(name, (training_workers(config),))
    if isinstance(config, EvalConfig):
        generation = config.generation
        models = len(set(config.models) | ({config.reference} if config.reference else set()))
        actors = generation.concurrency * min(generation.max_concurrent_models, models)
        return StageResources(name, (ResourceGroup(EVAL, actors, generation.cpus_per_actor,
                                                   generation.gpus_per_actor),))
    return StageResources(name)  # the base: built in the driver


def training_workers(config: TrainingStageConfig) -> ResourceGroup:
    scaling = config.scaling
    gpus = (scaling.gpus_per_worker or 1) if scaling.use_gpu else 0.0  # as stages.launcher asks Ray Train
    return ResourceGroup(TRAINING, scaling.num_workers, scaling.cpus_per_worker, gpus)


def ppo_actors(config) -> list[ResourceGroup]:
    """The rollout engines and, with a reward model in an actor, that actor (``config``: a PPOConfig)."""
    rollout, use_gpu = config.rollout, config.scaling.use_gpu
    tp = rollout.tensor_parallel_size
    if rollout.colocate or rollout.engine == "trainer":  # trainer: its held-out engine, colocated
        share = rollout.gpus_per_engine or (COLOCATED_GPU_SHARE if use_gpu else 0.0)
        groups = [ResourceGroup(ROLLOUT, rollout.num_engines, 0.0, share, colocated=True)]
    else:
        gpus = rollout.gpus_per_engine or (float(tp) if use_gpu else 0.0)
        groups = [ResourceGroup(ROLLOUT, rollout.num_engines, rollout.cpus_per_engine, gpus, ranks=tp)]
    if config.reward is not None and config.reward_placement == "actor":
        rank_gpus = rollout.gpus_per_engine / tp if rollout.gpus_per_engine else (1.0 if use_gpu else 0.0)
        groups.append(ResourceGroup(REWARD, 1, rollout.cpus_per_engine, rank_gpus))
    return groups


def colocation_notes(config, groups: Iterable[ResourceGroup]) -> list[str]:
    """Why colocated engines may not fit beside the trainers on the same GPUs."""
    by_role = {g.role: g for g in groups}
    engines, trainers = by_role.get(ROLLOUT), by_role.get(TRAINING)
    if engines is None or not engines.colocated or not engines.gpus or not trainers.gpus:
        return []
    if trainers.gpus + engines.gpus <= 1:
        return []
    return [f"colocated engines take {_amount(engines.gpus, 'GPU')} each beside training workers of "
            f"{_amount(trainers.gpus, 'GPU')}: one GPU cannot hold both; set scaling.gpus_per_worker "
            f"<= {1 - engines.gpus:g} to share them"]


def peak(plans: Iterable[StageResources]) -> dict[str, float]:
    """The most any one stage asks for, per resource: stages run one at a time."""
    return peak_of_groups([plan] for plan in plans)


def peak_of_groups(groups: Iterable[Iterable[StageResources]]) -> dict[str, float]:
    """The most any one group of stages that run together asks for, per resource."""
    totals = [{key: sum(p.total[key] for p in group) for key in RESOURCES} for group in map(list, groups)]
    return {key: max((t[key] for t in totals), default=0.0) for key in RESOURCES}


# --------------------------------------------------------------------------- checks


def missing_resources(resources: StageResources, available: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """Resource -> (needed, available), for each resource the cluster has less of than the stage needs."""
    missing = {}
    for key, needed in resources.total.items():
        has = float(available.get(key, 0.0))
        if needed > 0 and needed > has + 1e-9:
            missing[key] = (needed, has)
    return missing


def check_fits(resources: StageResources, available: Mapping[str, float]) -> None:
    """Raise :class:`InsufficientResources` naming each resource the cluster (``ray.cluster_resources()``)
    has too little of for the stage."""
    missing = missing_resources(resources, available)
    if not missing:
        return
    parts = []
    for key, (needed, has) in missing.items():
        members = ", ".join(_group_share(g, key) for g in resources.groups if g.total[key])
        parts.append(f"{_amount(needed, key)} ({members}) but the Ray cluster has {_amount(has, key)}")
    raise InsufficientResources(
        f"stage {resources.stage!r} needs " + "; and ".join(parts)
        + ". Lower the counts in its config, or give Ray more (a bigger cluster; ray.num_cpus / ray.num_gpus "
        "for a local instance)."
    )


def ready_placement_group(bundles: list[dict[str, float]], what: str, timeout_s: float = PLACEMENT_TIMEOUT_S,
                          strategy: str = "PACK"):
    """A placement group of ``bundles``, ready within ``timeout_s`` or removed and an error naming the
    bundles (``what``: whose they are) and what Ray has free."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(bundles, strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        asked = {key: sum(b.get(key, 0.0) for b in bundles) for key in RESOURCES}
        free = ray.available_resources()
        raise PlacementTimeout(
            f"{what}: could not reserve {len(bundles)} bundle(s), {format_amounts(asked)} in all, within {timeout_s:.0f}s; "
            f"Ray has {format_amounts({k: free.get(k, 0.0) for k in RESOURCES})} free (another job may hold the rest)"
        ) from None
    return pg


def wait_ready(refs: list, timeout_s: float, what: str) -> list:
    """``ray.get(refs)`` within ``timeout_s``, else an error naming ``what`` was waited for."""
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise PlacementTimeout(f"{what} not ready after {timeout_s:.0f}s: still loading, or Ray cannot place it "
                               f"(free: {format_amounts({k: ray.available_resources().get(k, 0.0) for k in RESOURCES})})"
                               ) from None


# --------------------------------------------------------------------------- words


def _amount(value: float, key: str) -> str:
    """``4 GPU``, ``0.5 CPU``, ``12.0 GiB memory``."""
    if key == "memory":
        return f"{value / 2**30:.1f} GiB memory"
    return f"{int(value) if float(value).is_integer() else f'{value:g}'} {key}"


def format_amounts(total: Mapping[str, float]) -> str:
    """``4 CPU, 2 GPU`` (the resources that are not 0)."""
    shown = [_amount(total[key], key) for key in RESOURCES if total.get(key)]
    return ", ".join(shown) or "nothing"


def _members(count: int, role: str) -> str:
    return f"{count} {role}{'' if count == 1 else 's'}"


def _group_share(group: ResourceGroup, key: str) -> str:
    """``2 training workers x 1 GPU`` (one resource of a group, for the fail-fast message)."""
    each = {"CPU": group.cpus, "GPU": group.gpus, "memory": group.memory}[key]
    tp = f" (TP {group.ranks})" if group.ranks > 1 and key == "GPU" else ""
    return f"{_members(group.count, group.role)} x {_amount(each, key)}{tp}"


def ceil_gpus(value: float) -> int:
    """Whole GPUs for a fractional total (pods and nodes hold whole ones)."""
    return math.ceil(value - 1e-9)
