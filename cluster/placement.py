"""Reserve a run's CPUs and GPUs with one Ray placement group before any actor starts.

A request the cluster can never fit fails at once, naming what is missing; one it
could fit but whose resources other jobs hold fails after `run.placement_timeout_s`.
Never an actor waiting forever for a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from scratchpad.common.config import ConfigError, ExperimentConfig


class PlacementError(ConfigError):
    """The cluster cannot hold what the config asks for: one line, exit code 2."""


@dataclass(frozen=True)
class Role:
    name: str  # "rollout engine", "reward actor", "learner"
    count: int
    cpus: float
    gpus: float

    def bundle(self) -> dict[str, float]:
        return {k: v for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v > 0}


def model_role(component) -> str:
    """The role name of a reward component's model actor (a judge engine, a reward model, a likelihood LM)."""
    return f"{component.kind} model '{component.name}'"


def roles(cfg: ExperimentConfig) -> list[Role]:
    """What the run reserves. Reward actors with 0 CPUs (the default) share the others' cores and reserve nothing."""
    from scratchpad.common.config import MODEL_KINDS

    found = [
        Role("rollout engine", cfg.rollout.num_engines, cfg.rollout.cpus_per_engine, cfg.rollout.gpus_per_engine),
        Role("reward actor", cfg.reward.num_actors, cfg.reward.cpus_per_actor, 0.0),
        Role("learner", cfg.learner.ranks, cfg.learner.num_cpus, cfg.learner.num_gpus),
        *(Role(model_role(c), 1, c.num_cpus, getattr(c, "num_gpus", 0.0))
          for c in cfg.reward.resolved_components() if c.kind in MODEL_KINDS),
    ]
    return [r for r in found if r.bundle()]


def _n(x: float) -> str:
    return f"{x:g}"


def check_fits(need: list[Role], total: dict[str, float], largest_node: dict[str, float], one_node: bool = False) -> None:
    """PlacementError if the cluster's totals, or its largest node (all of it with `one_node`), can never hold the request."""
    for resource, word in (("CPU", "CPUs"), ("GPU", "GPUs")):
        key = resource.lower() + "s"
        parts = [r for r in need if getattr(r, key) > 0]
        wanted = sum(r.count * getattr(r, key) for r in parts)
        have = total.get(resource, 0.0)
        if wanted > have:
            detail = " + ".join(f"{r.count} {r.name}{'s' if r.count > 1 else ''} x {_n(getattr(r, key))}" for r in parts)
            raise PlacementError(f"placement: needs {_n(wanted)} {word} for {detail}; the cluster has {_n(have)}")
        if one_node and wanted > largest_node.get(resource, 0.0):
            raise PlacementError(f"placement: STRICT_PACK needs {_n(wanted)} {word} on one node; "
                                 f"the largest node has {_n(largest_node.get(resource, 0.0))}")
        for r in parts:
            if getattr(r, key) > largest_node.get(resource, 0.0):
                raise PlacementError(f"placement: one {r.name} needs {_n(getattr(r, key))} {word}; "
                                     f"the largest node has {_n(largest_node.get(resource, 0.0))}")


def check_cores(cfg: ExperimentConfig, available: set[int]) -> None:
    """run.cores must name cores this machine lets the run use, and keep rollout and learner apart (overlap only pays
    when they do not share a core)."""
    cores = cfg.run.cores or {}
    for role, listed in cores.items():
        if not listed:
            raise PlacementError(f"placement: run.cores.{role} is empty")
        missing = sorted(set(listed) - available)
        if missing:
            raise PlacementError(f"placement: run.cores.{role} names cores {missing}; this machine offers {sorted(available)}")
    shared = sorted(set(cores.get("rollout", [])) & set(cores.get("learner", [])))
    if shared:
        raise PlacementError(f"placement: run.cores gives cores {shared} to both rollout and learner; they must be disjoint")
    engines = cfg.rollout.num_engines * cfg.rollout.cpus_per_engine
    if "rollout" in cores and engines > len(cores["rollout"]):
        raise PlacementError(f"placement: {cfg.rollout.num_engines} rollout engines x {cfg.rollout.cpus_per_engine:g} CPUs need "
                             f"{engines:g} cores; run.cores.rollout gives {len(cores['rollout'])}")
    ranks = cfg.learner.ranks * cfg.learner.num_cpus
    if "learner" in cores and ranks > len(cores["learner"]):
        raise PlacementError(f"placement: {cfg.learner.ranks} learner ranks x {cfg.learner.num_cpus:g} CPUs need {ranks:g} "
                             f"cores; run.cores.learner gives {len(cores['learner'])}")


def reserve(cfg: ExperimentConfig) -> tuple[object, dict[str, list[int]]]:
    """A ready placement group and, per role name, the bundle index of each of its actors."""
    import os

    check_cores(cfg, set(os.sched_getaffinity(0)))
    need = roles(cfg)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    largest = max(nodes, key=lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0))) if nodes else {}
    check_fits(need, ray.cluster_resources(), largest, one_node=cfg.run.placement_strategy == "STRICT_PACK")
    bundles, index = [], {}
    for role in need:
        index[role.name] = list(range(len(bundles), len(bundles) + role.count))
        bundles += [role.bundle()] * role.count
    group = placement_group(bundles, strategy=cfg.run.placement_strategy)
    try:
        ray.get(group.ready(), timeout=cfg.run.placement_timeout_s)
    except GetTimeoutError:
        remove_placement_group(group)
        free = ray.available_resources()
        raise PlacementError(
            f"placement: waited {_n(cfg.run.placement_timeout_s)}s for {len(bundles)} bundles "
            f"({cfg.run.placement_strategy}); free now: {_n(free.get('CPU', 0.0))} CPUs, {_n(free.get('GPU', 0.0))} GPUs "
            f"(other jobs hold the rest; raise run.placement_timeout_s to wait longer)") from None
    return group, index


def strategy(group, index: dict[str, list[int]], role: str, i: int) -> dict:
    """Ray options that put the i-th actor of `role` in its bundle; {} for a role that reserves nothing."""
    if group is None or role not in index:
        return {}
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index[role][i])}


def release(group) -> None:
    if group is not None:
        remove_placement_group(group)
