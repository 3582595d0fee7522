"""How much of the Ray cluster each training worker and each reference actor asks for, and the check that
they fit. Pure functions of a DPOConfig and the cluster's resources as dicts (what it has now,
`ray.cluster_resources()`, and what it can grow to, `cluster.capacity()`), so they are tested without Ray
(tests/test_cluster_sizing.py).

A request that can never be met does not fail in Ray: the run waits at "Requesting resources" forever.
So `size` refuses, before anything starts, any configuration whose actors and workers cannot fit in the
cluster's capacity. With an autoscaler that is the most its node types can add up to, so a run that
needs nodes not started yet is sized for them and waits for the autoscaler instead of being refused.
Ray places each worker and each actor whole on one node, so the totals are not enough: given the
cluster's nodes (`Nodes`), a request that no node (or node type) can hold is refused too, the workers
are counted node by node, and the CPU share raydpo sizes for a worker is one the nodes can hold.

GPUs are shared the way Ray shares them: a request below 1 GPU is a fraction of one GPU (Ray never
splits it over two), and Ray gives it the GPU whose free share is the smallest that still fits it
(best fit). So fractional requests pack: the reference actors are sized so that exactly the intended
number of them fill a GPU, and the training workers always ask for more than half a GPU, so that two
of them never land on the same one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

# Ray counts resources in steps of 1e-4: shares are rounded down to a step, so that n shares of 1/n fit
# in one GPU, and sums are compared with a step's tolerance.
_STEP = 1e-4


@dataclass(frozen=True)
class Sizing:
    worker: Dict[str, float]  # one training worker's Ray resources
    actor: Dict[str, float]  # one reference actor's (precompute_ref_log_probs / stream_ref_log_probs)


@dataclass(frozen=True)
class Nodes:
    """The cluster node by node: each alive node's resources (`now`), and each node type an autoscaler can
    still start (`types`, from the ClusterConfig it publishes)."""
    now: List[Dict[str, float]]
    types: List[Dict[str, float]] = field(default_factory=list)


def size(config, cluster: dict, capacity: Optional[dict] = None, nodes: Optional[Nodes] = None) -> Sizing:
    """The resources of one training worker and of one reference actor for `config` on a cluster with
    `cluster` resources now ({"CPU": 16.0, "GPU": 8.0, ...}) and `capacity` at most (an autoscaler's
    limit; default `cluster`). User-given resources_per_worker and precompute_ref_resources are kept as
    given. Raises ValueError, naming the fields, when they cannot all be placed within `capacity`.

    CPU runs: workers share all but one of the cluster's CPUs (Ray Data's tasks need that one), less what
    streamed actors hold beside them. GPU runs: a worker takes a GPU; precompute actors, which run
    before training, share all the GPUs; streamed actors take the GPUs the workers leave, or else a
    share of the workers' own GPUs (stream_ref_gpu_fraction), the workers then asking for the rest.
    CPU shares come from the CPUs there are now; GPUs are planned over the capacity, whose nodes will
    come with their GPUs. With `nodes`, a worker's CPU share is one that num_workers of them can hold
    node by node, and a request no node can hold is refused."""
    capacity = capacity or cluster
    node_cpus = [node.get("CPU", 0.0) for node in nodes.now] if nodes else None
    result = _gpu_sizing(config, capacity) if config.use_gpu else _cpu_sizing(config, cluster, node_cpus)
    _check_fits(config, capacity, result)
    if nodes:
        _check_nodes(config, nodes, result)
    return result


def _cpu_sizing(config, cluster: dict, node_cpus: Optional[List[float]] = None) -> Sizing:
    actor = _given(config.precompute_ref_resources)
    if actor is None:
        # beside the training workers, the pool takes half of what they may share, at most 1 CPU an actor
        actor = ({"CPU": _cpus(min(1.0, _cpus_for_runs(cluster) / 2 / config.precompute_ref_num_actors))}
                 if config.stream_ref_log_probs else {"CPU": 1})
    worker = _given(config.resources_per_worker)
    if worker is None:
        beside = actor.get("CPU", 0.0) * config.precompute_ref_num_actors if config.stream_ref_log_probs else 0.0
        worker = {"CPU": _cpus((_cpus_for_runs(cluster) - beside) / config.world_size)}
        if node_cpus:
            worker = {"CPU": _held_share(worker["CPU"], config.num_workers, node_cpus)}
    return Sizing(worker, actor)


def _held_share(share: float, count: int, node_cpus: List[float]) -> float:
    """The largest CPU share, at most `share`, of which `count` requests fit on nodes with these CPUs, each
    request whole on one node: (4 - 1) / 1 = 3 CPUs is more than either node of a 2 x 2-CPU cluster has,
    so one worker there asks for 2. `share` itself when no smaller share fits either (the check refuses it)."""
    def held(cpus: float) -> bool:
        return sum(math.floor(node / cpus + 1e-9) for node in node_cpus) >= count

    if held(share):
        return share
    smaller = sorted({math.floor(node / k * 100) / 100 for node in node_cpus for k in range(1, count + 1)}, reverse=True)
    return next((cpus for cpus in smaller if 0 < cpus < share and held(cpus)), share)


def _gpu_sizing(config, cluster: dict) -> Sizing:
    gpus = cluster.get("GPU", 0.0)
    actors = config.precompute_ref_num_actors
    worker = _given(config.resources_per_worker) or {"CPU": 1, "GPU": 1}
    actor = _given(config.precompute_ref_resources)
    if not config.stream_ref_log_probs:  # precompute: done before any worker starts, so every GPU is free
        return Sizing(worker, actor or {"GPU": gpu_share(actors, gpus)})
    spare = math.floor(gpus - config.num_workers * worker.get("GPU", 0.0) + _STEP)  # whole GPUs no worker needs
    if spare >= 1:
        return Sizing(worker, actor or {"GPU": gpu_share(actors, spare)})
    # No GPU to spare: the actors share the workers' GPUs, `per_gpu` of them on each.
    per_gpu = math.ceil(actors / config.world_size)
    actor = actor or {"GPU": _floor(config.stream_ref_gpu_fraction / per_gpu)}
    if config.resources_per_worker is None and 0 < actor.get("GPU", 0.0) < 1:
        taken = per_gpu * actor["GPU"]
        if taken >= 0.5:  # a worker asking for half a GPU or less could be packed with another worker
            raise ValueError(
                f"DPOConfig: stream_ref_log_probs with no GPU to spare ({gpus:g} GPUs, num_workers="
                f"{config.num_workers}) puts {per_gpu} reference actor(s) of {actor['GPU']:g} GPU on each worker's "
                f"GPU, {taken:g} of it, and a worker needs more than half a GPU: lower precompute_ref_resources' "
                f"GPU or precompute_ref_num_actors, or set resources_per_worker")
        worker = {**worker, "GPU": _floor(1 - taken)}
    return Sizing(worker, actor)


def gpu_share(actors: int, gpus: float) -> float:
    """GPUs of one of `actors` actors sharing `gpus` GPUs: a whole GPU each when there are enough, else
    1/k of one, k = ceil(actors / gpus), so that k of them fill each GPU (Ray packs fractions best fit)."""
    if gpus < 1 or actors <= gpus:
        return 1.0  # with no GPU at all the check below refuses it, naming the numbers
    return _floor(1 / math.ceil(actors / math.floor(gpus)))


def _check_fits(config, cluster: dict, sizing: Sizing) -> None:
    """Refuse requests Ray would wait on forever: the precompute actors on their own (they run before
    training), then the training workers with any streamed actors beside them."""
    for name, request in (("resources_per_worker", sizing.worker), ("precompute_ref_resources", sizing.actor)):
        gpu = request.get("GPU", 0.0)
        if gpu > 1 and gpu != int(gpu):
            raise ValueError(f"DPOConfig.{name} asks for {gpu:g} GPUs: Ray takes a fraction of one GPU or a whole "
                             "number of GPUs, never a fraction above 1")
    workers, pool = _groups(config, sizing)
    if config.precompute_ref_log_probs:
        _check_group(cluster, [pool], "precompute_ref_log_probs, before training")
    if not config.stream_ref_log_probs:
        _check_group(cluster, [workers], "training")
    elif config.use_gpu:  # the pool starts once the workers hold their GPUs (streamed.ReferencePool)
        _check_group(cluster, [workers, pool], "training with stream_ref_log_probs")
    else:
        _check_group(cluster, [pool, workers], "training with stream_ref_log_probs")


def _check_nodes(config, nodes: Nodes, sizing: Sizing) -> None:
    """Refuse a worker or actor that no node (nor node type) can hold whole, and, on a cluster without an
    autoscaler, more workers than its nodes can hold one by one (the totals can fit while no node has room)."""
    workers, pool = _groups(config, sizing)
    groups = [workers, pool] if config.precompute_ref_log_probs or config.stream_ref_log_probs else [workers]
    shapes = nodes.now + nodes.types
    for group in groups:
        if not any(_held(node, group.one) for node in shapes):
            largest = {name: max((node.get(name, 0.0) for node in shapes), default=0.0) for name in group.one}
            raise ValueError(
                f"DPOConfig: {group}: no node of the Ray cluster can hold one of them (the most any node has: "
                f"{_show(largest)}), and Ray places each whole on one node, so the run would wait for it forever: "
                f"change {group.resources_field}, or add nodes that hold it")
    if not nodes.types:
        held = sum(_held(node, workers.one) for node in nodes.now)
        if held < workers.count:
            raise ValueError(
                f"DPOConfig: {workers}: the Ray cluster's nodes hold {held} of them, each whole on one node "
                f"(nodes: {', '.join(_show(node) for node in nodes.now)}), although the totals would fit, and the "
                f"run would wait for the rest forever: change num_workers or {workers.resources_field}")


def _held(node: Dict[str, float], one: Dict[str, float]) -> int:
    """How many requests of `one` a node with these resources holds (a GPU fraction f: 1 // f of them per GPU)."""
    counts = []
    for name, need in one.items():
        have = node.get(name, 0.0)
        if need <= 0:
            continue
        if name == "GPU" and need < 1:
            counts.append(int(math.floor(have + _STEP)) * int(math.floor(1 / need + _STEP)))
        else:
            counts.append(int(math.floor(have / need + _STEP)))
    return min(counts, default=1 << 30)


@dataclass(frozen=True)
class _Group:
    """`count` requests of `one`, as DPOConfig's `count_field` and `resources_field` made them."""
    count: int
    one: Dict[str, float]
    count_field: str
    resources_field: str
    given: bool  # resources_field was set by the user, rather than sized here

    def __str__(self) -> str:
        origin = self.resources_field if self.given else f"sized by raydpo, {self.resources_field}=None"
        return f"{self.count_field}={self.count} x {_show(self.one)} ({origin})"


def _groups(config, sizing: Sizing) -> Tuple[_Group, _Group]:
    """The training workers and the reference actors, as the checks name them. Local mode
    (num_workers=0) asks Ray for no worker: the loop runs in the driver's process."""
    return (_Group(config.num_workers, sizing.worker, "num_workers", "resources_per_worker",
                   config.resources_per_worker is not None),
            _Group(config.precompute_ref_num_actors, sizing.actor, "precompute_ref_num_actors",
                   "precompute_ref_resources", config.precompute_ref_resources is not None))


def _check_group(cluster: dict, groups: List[_Group], when: str) -> None:
    """Returns when Ray can place every request of `groups`, in that order, on the cluster; else ValueError."""
    for name in sorted({name for group in groups for name in group.one}):
        have = cluster.get(name, 0.0)
        demands = [group.one[name] for group in groups for _ in range(group.count) if group.one.get(name, 0.0) > 0]
        fits = _gpus_fit(demands, have) if name == "GPU" else sum(demands) <= have + _STEP
        if fits:
            continue
        fields = [field for group in groups for field in (group.count_field, group.resources_field)]
        if name == "GPU":
            fields += ["use_gpu"] + (["stream_ref_gpu_fraction"] if len(groups) == 2 else [])
        how = " (Ray never splits a fraction of a GPU over two GPUs)" if any(d % 1 for d in demands) else ""
        raise ValueError(f"DPOConfig, {when}: {' and '.join(map(str, groups))} cannot all be placed on the Ray "
                         f"cluster's {have:g} {name}{how}, and the run would wait for them forever: change "
                         f"{', '.join(fields)}, or give the cluster more {name}")


def _gpus_fit(demands: List[float], gpus: float) -> bool:
    """Whether Ray can place these GPU requests, in this order, on `gpus` GPUs: a whole number takes that
    many free GPUs, a fraction goes on the GPU with the smallest free share that fits it (Ray's best fit)."""
    # never more GPUs than the demands could use: an autoscaler's unlimited node type reports sys.maxsize
    free = [1.0] * min(int(math.floor(gpus + _STEP)), sum(math.ceil(demand) for demand in demands))
    for demand in demands:
        if demand >= 1:
            whole = [i for i, left in enumerate(free) if left >= 1 - _STEP][:int(demand)]
            if len(whole) < demand:
                return False
            for i in whole:
                free[i] = 0.0
            continue
        fitting = [i for i, left in enumerate(free) if left >= demand - _STEP]
        if not fitting:
            return False
        best = min(fitting, key=lambda i: free[i])
        free[best] -= demand
    return True


def _cpus_for_runs(cluster: dict) -> float:
    """The cluster's CPUs less one, which Ray Data's tasks need free (half of a 1-CPU cluster): workers taking
    every CPU starve those tasks, and on a 2-core machine the run hangs."""
    total = cluster.get("CPU", 1.0)
    return total - 1.0 if total >= 2 else total / 2


def _given(resources) -> Optional[dict]:
    return dict(resources) if resources else None


def _cpus(share: float) -> float:
    return round(max(0.1, share), 2)


def _floor(share: float) -> float:
    return round(math.floor(share / _STEP + 1e-6) * _STEP, 4)


def _show(resources: dict) -> str:
    return "{" + ", ".join(f"{name}: {value:g}" for name, value in resources.items()) + "}"
