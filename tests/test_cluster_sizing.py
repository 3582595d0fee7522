"""How much of the cluster the training workers and reference actors ask for (raydpo/sizing.py), and the
refusal of what cannot fit. Pure: the cluster is a dict as ray.cluster_resources() returns it; no Ray."""

import pytest

from raydpo import sizing
from raydpo.config import DPOConfig


def config(**options) -> DPOConfig:
    return DPOConfig(output_dir="unused", report_to="none", **options)


def gpus(count: int) -> dict:
    return {"CPU": 16.0 * count, "GPU": float(count)}


def placed(result: sizing.Sizing, cfg: DPOConfig, cluster: dict) -> bool:
    """Whether Ray's best fit places the run's GPU requests in the order raydpo makes them: streamed
    actors after the workers (ReferencePool starts them when the first worker asks)."""
    workers = [result.worker.get("GPU", 0)] * cfg.num_workers
    actors = [result.actor.get("GPU", 0)] * cfg.precompute_ref_num_actors
    return sizing._gpus_fit([d for d in workers + actors if d > 0], cluster["GPU"])


# --- precompute: the actors run before training and share every GPU ---

@pytest.mark.parametrize("num_gpus, actors, share", [
    (8, 2, 1.0),  # enough GPUs: a whole one each
    (8, 8, 1.0),
    (1, 4, 0.25),  # more actors than GPUs: four to a GPU
    (8, 12, 0.5),  # two to a GPU on 6 of them (8/12 = 0.67 each would fit one to a GPU: 8 of the 12)
    (3, 4, 0.5),
    (2, 3, 0.5),
    (1, 3, 0.3333),  # three of 0.3333 fit in one GPU; 1/3 rounded up would not
])
def test_precompute_actors_share_all_the_gpus(num_gpus, actors, share):
    cfg = config(use_gpu=True, precompute_ref_log_probs=True, precompute_ref_num_actors=actors, num_workers=num_gpus)
    result = sizing.size(cfg, gpus(num_gpus))
    assert result.actor == {"GPU": share}
    assert result.worker == {"CPU": 1, "GPU": 1}  # training comes after: the workers take whole GPUs
    assert sizing._gpus_fit([share] * actors, num_gpus)


# --- streamed: the actors run beside the training workers ---

def test_streamed_actors_share_the_workers_gpus_when_none_is_spare():
    """8 GPUs, 8 workers, 2 actors: each actor takes stream_ref_gpu_fraction of a worker's GPU, and every
    worker asks for the rest, so that a worker and an actor fit on one GPU."""
    cfg = config(use_gpu=True, stream_ref_log_probs=True, num_workers=8, precompute_ref_num_actors=2)
    result = sizing.size(cfg, gpus(8))
    assert result.actor == {"GPU": 0.25}
    assert result.worker == {"CPU": 1, "GPU": 0.75}
    assert placed(result, cfg, gpus(8))
    # Why the pool starts after the workers: started first, Ray's best fit puts both actors on one GPU,
    # which then has 0.5 left, too little for a worker: 7 GPUs for 8 workers, and the run would wait forever.
    assert not sizing._gpus_fit([0.25] * 2 + [0.75] * 8, 8)


def test_more_streamed_actors_than_workers_split_the_share():
    cfg = config(use_gpu=True, stream_ref_log_probs=True, num_workers=8, precompute_ref_num_actors=16,
                 stream_ref_gpu_fraction=0.2)
    result = sizing.size(cfg, gpus(8))
    assert result.actor == {"GPU": 0.1}  # two actors on each GPU, 0.2 of it together
    assert result.worker == {"CPU": 1, "GPU": 0.8}
    assert placed(result, cfg, gpus(8))
    uneven = config(use_gpu=True, stream_ref_log_probs=True, num_workers=2, precompute_ref_num_actors=3)
    result = sizing.size(uneven, gpus(2))
    assert result.actor == {"GPU": 0.125} and result.worker == {"CPU": 1, "GPU": 0.75}
    assert placed(result, uneven, gpus(2))


@pytest.mark.parametrize("actors, share", [(2, 1.0), (4, 1.0), (6, 0.5), (9, 0.3333)])
def test_streamed_actors_use_the_gpus_the_workers_leave(actors, share):
    """8 GPUs, 4 workers: the actors share the 4 spare GPUs and the workers keep whole ones."""
    cfg = config(use_gpu=True, stream_ref_log_probs=True, num_workers=4, precompute_ref_num_actors=actors)
    result = sizing.size(cfg, gpus(8))
    assert result.actor == {"GPU": share}
    assert result.worker == {"CPU": 1, "GPU": 1}
    assert placed(result, cfg, gpus(8))


def test_given_resources_win_and_the_workers_leave_room_for_them():
    cfg = config(use_gpu=True, stream_ref_log_probs=True, num_workers=4, precompute_ref_num_actors=4,
                 precompute_ref_resources={"CPU": 2, "GPU": 0.1})
    result = sizing.size(cfg, gpus(4))
    assert result.actor == {"CPU": 2, "GPU": 0.1}
    assert result.worker == {"CPU": 1, "GPU": 0.9}
    given = config(use_gpu=True, stream_ref_log_probs=True, num_workers=4, precompute_ref_num_actors=4,
                   precompute_ref_resources={"GPU": 0.2}, resources_per_worker={"CPU": 2, "GPU": 0.8})
    assert sizing.size(given, gpus(4)) == sizing.Sizing(worker={"CPU": 2, "GPU": 0.8}, actor={"GPU": 0.2})
    on_cpus = config(use_gpu=True, stream_ref_log_probs=True, num_workers=8, precompute_ref_resources={"CPU": 4})
    assert sizing.size(on_cpus, gpus(8)).worker == {"CPU": 1, "GPU": 1}  # actors with no GPU: workers keep theirs


# --- what cannot fit is refused, naming the fields ---

@pytest.mark.parametrize("options, cluster, names", [
    # a whole GPU per actor beside 8 whole-GPU workers on 8 GPUs
    (dict(stream_ref_log_probs=True, num_workers=8, precompute_ref_num_actors=2,
          precompute_ref_resources={"GPU": 1}), gpus(8), ["precompute_ref_resources", "precompute_ref_num_actors=2",
                                                          "num_workers=8", "8 GPU"]),
    # 4 whole-GPU workers on 2 GPUs
    (dict(num_workers=4, resources_per_worker={"CPU": 1, "GPU": 1}), gpus(2), ["num_workers=4", "resources_per_worker",
                                                                               "2 GPU"]),
    # use_gpu on a cluster with no GPU
    (dict(num_workers=1), {"CPU": 8.0}, ["num_workers=1", "0 GPU", "use_gpu"]),
    # precompute actors asking for more GPUs than there are
    (dict(precompute_ref_log_probs=True, precompute_ref_num_actors=3, precompute_ref_resources={"GPU": 1}), gpus(2),
     ["precompute_ref_log_probs", "precompute_ref_num_actors=3", "2 GPU"]),
    # fractions that each fit but not together on one GPU: 0.6 + 0.6
    (dict(precompute_ref_log_probs=True, precompute_ref_num_actors=2, precompute_ref_resources={"GPU": 0.6}),
     gpus(1), ["precompute_ref_num_actors=2", "never splits"]),
    # a custom resource the cluster lacks
    (dict(resources_per_worker={"CPU": 1, "GPU": 1, "trainer": 1}), gpus(1), ["resources_per_worker", "0 trainer"]),
])
def test_what_cannot_fit_is_refused_by_name(options, cluster, names):
    with pytest.raises(ValueError) as error:
        sizing.size(config(use_gpu=True, **options), cluster)
    for name in names:
        assert name in str(error.value)
    assert "wait for them forever" in str(error.value)


def test_actors_that_leave_a_worker_half_a_gpu_are_refused():
    cfg = config(use_gpu=True, stream_ref_log_probs=True, num_workers=4, precompute_ref_num_actors=8,
                 precompute_ref_resources={"GPU": 0.3})  # two on each worker's GPU: 0.6 of it
    with pytest.raises(ValueError, match="0.6 of it.*precompute_ref_resources. GPU or precompute_ref_num_actors"):
        sizing.size(cfg, gpus(4))


def test_a_fraction_above_one_gpu_is_refused():
    with pytest.raises(ValueError, match=r"DPOConfig.precompute_ref_resources asks for 1.5 GPUs"):
        sizing.size(config(use_gpu=True, precompute_ref_log_probs=True, precompute_ref_resources={"GPU": 1.5}),
                    gpus(4))


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9, -0.1])
def test_stream_ref_gpu_fraction_is_checked(fraction):
    with pytest.raises(ValueError, match="DPOConfig.stream_ref_gpu_fraction must be in"):
        config(stream_ref_gpu_fraction=fraction)


# --- CPUs: as before ---

@pytest.mark.parametrize("cpus, workers, actors, worker_cpus, actor_cpus", [
    (2.0, 2, 1, 0.25, 0.5),  # the test machine: 1 CPU for the run, half of it the pool's
    (2.0, 1, 1, 0.5, 0.5),
    (16.0, 4, 2, 3.25, 1.0),  # 15 CPUs: the pool 1 each (at most), the workers the rest
    (1.0, 1, 1, 0.25, 0.25),  # a 1-CPU cluster: half of it for the run
])
def test_streamed_on_cpus(cpus, workers, actors, worker_cpus, actor_cpus):
    cfg = config(use_gpu=False, stream_ref_log_probs=True, num_workers=workers, precompute_ref_num_actors=actors)
    assert sizing.size(cfg, {"CPU": cpus}) == sizing.Sizing(worker={"CPU": worker_cpus}, actor={"CPU": actor_cpus})


@pytest.mark.parametrize("cpus, workers, worker_cpus", [(2.0, 2, 0.5), (2.0, 1, 1.0), (16.0, 3, 5.0), (2.0, 16, 0.1)])
def test_cpu_workers_share_all_but_one_cpu(cpus, workers, worker_cpus):
    cfg = config(use_gpu=False, num_workers=workers, precompute_ref_log_probs=True)
    assert sizing.size(cfg, {"CPU": cpus}) == sizing.Sizing(worker={"CPU": worker_cpus}, actor={"CPU": 1})


def test_too_many_cpu_workers_are_refused():
    with pytest.raises(ValueError, match=r"num_workers=30 x \{CPU: 0.1\} \(sized by raydpo"):
        sizing.size(config(use_gpu=False, num_workers=30), {"CPU": 2.0})


# --- an autoscaling cluster: sized and checked against what it can grow to ---

def test_a_run_waits_for_nodes_the_autoscaler_can_start():
    """A cluster with one 4-GPU node now whose autoscaler can add an 8-GPU one: 8 workers are accepted
    (Ray then asks the autoscaler for the node), and streamed actors are planned over its 12 GPUs. Without
    that capacity the same request is refused. CPU shares still come from the CPUs there are now."""
    now, grown = {"CPU": 56.0, "GPU": 4.0}, {"CPU": 152.0, "GPU": 12.0}
    cfg = config(use_gpu=True, num_workers=8)
    assert sizing.size(cfg, now, grown).worker == {"CPU": 1, "GPU": 1}
    with pytest.raises(ValueError, match="cluster's 4 GPU"):
        sizing.size(cfg, now)
    streamed = config(use_gpu=True, num_workers=8, stream_ref_log_probs=True, precompute_ref_num_actors=4)
    assert sizing.size(streamed, now, grown).actor == {"GPU": 1.0}  # 4 spare GPUs once the node is up
    with pytest.raises(ValueError, match="cluster's 12 GPU"):
        sizing.size(config(use_gpu=True, num_workers=13), now, grown)
    cpu = config(num_workers=2)
    assert sizing.size(cpu, {"CPU": 4.0}, {"CPU": 1e6}).worker == {"CPU": 1.5}  # (4 - 1) / 2, not a share of 1e6


def test_an_unlimited_node_type_is_no_limit():
    """An autoscaler node type without max_workers reports sys.maxsize of each resource: the check still runs, in
    proportion to the request."""
    import sys

    cfg = config(use_gpu=True, num_workers=64, stream_ref_log_probs=True, precompute_ref_num_actors=8)
    result = sizing.size(cfg, {"CPU": 8.0}, {"CPU": float(sys.maxsize), "GPU": float(sys.maxsize)})
    assert result.worker == {"CPU": 1, "GPU": 1} and result.actor == {"GPU": 1.0}


def test_capacity_reads_the_autoscaler_node_types(fake_cluster):
    """cluster.capacity: the cluster's resources now, raised to what the autoscaler's published node types
    add up to (Ray's own computation of that limit, from the ClusterConfig an autoscaler writes to the GCS)."""
    from ray.core.generated import autoscaler_pb2

    from raydpo import cluster

    published = autoscaler_pb2.ClusterConfig()
    for name, resources, most in (("head", {"CPU": 8}, 1), ("a10g", {"CPU": 48, "GPU": 4}, 2),
                                  ("a100", {"CPU": 96, "GPU": 8}, 1)):
        group = published.node_group_configs.add(name=name, max_count=most)
        group.resources.update(resources)
    fake_cluster({"CPU": 56.0, "GPU": 4.0, "memory": 1e11}, published)
    assert cluster.capacity() == {"CPU": 200.0, "GPU": 16.0, "memory": 1e11}
    assert cluster.resolve_use_gpu(config(use_gpu=None)).use_gpu is True
    fake_cluster({"CPU": 56.0, "GPU": 4.0, "memory": 1e11})  # no autoscaler
    assert cluster.capacity() == {"CPU": 56.0, "GPU": 4.0, "memory": 1e11}
    fake_cluster({"CPU": 2.0}, published)  # CPUs only now: the autoscaler's GPU node types still count
    assert cluster.resolve_use_gpu(config(use_gpu=None)).use_gpu is True
    fake_cluster({"CPU": 2.0})
    assert cluster.resolve_use_gpu(config(use_gpu=None)).use_gpu is False


# --- node by node: Ray places each worker and actor whole on one node ---

def test_a_cpu_worker_asks_for_what_one_node_holds():
    """2 nodes of 2 CPUs: the totals leave 3 CPUs for one worker, but no node has 3; it asks for 2. Two
    workers get 1.5 each, one per node; on nodes of 4 and 1 CPUs, two workers get 2 each, both on the big one."""
    two_by_two = sizing.Nodes([{"CPU": 2.0}, {"CPU": 2.0}])
    assert sizing.size(config(num_workers=1), {"CPU": 4.0}).worker == {"CPU": 3.0}  # totals alone
    assert sizing.size(config(num_workers=1), {"CPU": 4.0}, nodes=two_by_two).worker == {"CPU": 2.0}
    assert sizing.size(config(num_workers=2), {"CPU": 4.0}, nodes=two_by_two).worker == {"CPU": 1.5}
    uneven = sizing.Nodes([{"CPU": 4.0}, {"CPU": 1.0}])
    assert sizing.size(config(num_workers=2), {"CPU": 5.0}, nodes=uneven).worker == {"CPU": 2.0}
    three = sizing.Nodes([{"CPU": 2.0}] * 3)  # (6 - 1) / 3 = 1.67 fits one per node
    assert sizing.size(config(num_workers=3), {"CPU": 6.0}, nodes=three).worker == {"CPU": 1.67}
    # a single node: as before
    assert sizing.size(config(num_workers=2), {"CPU": 2.0}, nodes=sizing.Nodes([{"CPU": 2.0}])).worker == {"CPU": 0.5}


@pytest.mark.parametrize("options, nodes, names", [
    # 2 GPUs per worker, and no node has more than 1
    (dict(use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 2}), [gpus(1), gpus(1)],
     ["resources_per_worker", "no node", "GPU: 1", "add nodes"]),
    # 8 CPUs per worker on 4-CPU nodes
    (dict(resources_per_worker={"CPU": 8}), [{"CPU": 4.0}] * 4, ["resources_per_worker", "no node", "CPU: 4"]),
    # a precompute actor bigger than any node
    (dict(precompute_ref_log_probs=True, precompute_ref_num_actors=1, precompute_ref_resources={"CPU": 6}),
     [{"CPU": 4.0}] * 2, ["precompute_ref_resources", "no node"]),
    # 3 workers of 2 CPUs: the totals fit (6 of 7) but each node holds one
    (dict(num_workers=3, resources_per_worker={"CPU": 2}), [{"CPU": 3.5}] * 2, ["num_workers=3", "hold 2 of them"]),
])
def test_what_no_node_can_hold_is_refused_by_name(options, nodes, names):
    cluster = {name: sum(node.get(name, 0.0) for node in nodes) for name in ("CPU", "GPU")}
    sizing.size(config(**options), cluster)  # the totals alone let it through
    with pytest.raises(ValueError) as error:
        sizing.size(config(**options), cluster, nodes=sizing.Nodes(nodes))
    for name in names:
        assert name in str(error.value)
    assert "wait for" in str(error.value) and "forever" in str(error.value)


def test_a_node_type_the_autoscaler_can_start_counts():
    """A worker asking for 8 GPUs fits no node now, but the autoscaler can start an 8-GPU node: accepted,
    and the run waits for that node. Node by node counting is left to the autoscaler then."""
    cfg = config(use_gpu=True, num_workers=2, resources_per_worker={"CPU": 8, "GPU": 8})
    nodes = sizing.Nodes([gpus(4)], types=[{"CPU": 96.0, "GPU": 8.0}])
    assert sizing.size(cfg, gpus(4), {"CPU": 1000.0, "GPU": 20.0}, nodes).worker == {"CPU": 8, "GPU": 8}
    with pytest.raises(ValueError, match="no node"):
        sizing.size(cfg, gpus(4), {"CPU": 1000.0, "GPU": 20.0}, sizing.Nodes([gpus(4)]))


def test_fractional_gpu_workers_are_counted_per_gpu():
    """Workers of 0.6 GPU: one to a GPU, so 2 nodes of 1 GPU hold 2 of them and not 3."""
    nodes = sizing.Nodes([gpus(1), gpus(1)])
    two = config(use_gpu=True, num_workers=2, resources_per_worker={"CPU": 1, "GPU": 0.6})
    assert sizing.size(two, gpus(2), nodes=nodes).worker["GPU"] == 0.6
    with pytest.raises(ValueError):
        sizing.size(config(use_gpu=True, num_workers=3, resources_per_worker={"CPU": 1, "GPU": 0.6}), gpus(2),
                    nodes=nodes)


def test_cluster_nodes_reads_ray_nodes_and_the_node_types(fake_cluster):
    from ray.core.generated import autoscaler_pb2

    from raydpo import cluster

    published = autoscaler_pb2.ClusterConfig()
    for name, resources, most in (("head", {"CPU": 8}, 1), ("a100", {"CPU": 96, "GPU": 8}, 2), ("off", {"CPU": 1}, 0)):
        group = published.node_group_configs.add(name=name, max_count=most)
        group.resources.update(resources)
    fake_cluster({"CPU": 4.0}, published, nodes=[{"CPU": 2.0}, {"CPU": 2.0}])
    assert cluster.nodes() == sizing.Nodes([{"CPU": 2.0}, {"CPU": 2.0}], [{"CPU": 8.0}, {"CPU": 96.0, "GPU": 8.0}])
    fake_cluster({"CPU": 4.0}, nodes=[{"CPU": 2.0}, {"CPU": 2.0}])
    assert cluster.sizes(config(num_workers=1)).worker == {"CPU": 2.0}


def test_a_sweep_trial_leaves_each_small_node_room_for_a_worker():
    """A sweep trial's own process only waits on its Ray Train run, so what it asks for (Tune's request,
    as tune.with_resources makes it) takes nothing a training worker needs: with a trial on every 1-CPU
    node, each node still holds a 1-CPU worker. A 0.01-CPU request left 0.99 CPU per node, no worker fit,
    and every trial's run waited forever (tests/test_multinode.py's sweep hung so)."""
    from ray import tune

    from raydpo.sizing import _held
    from raydpo.tune.sweep import TRIAL_RESOURCES

    request = tune.with_resources(lambda config: None, TRIAL_RESOURCES)._resources.required_resources
    node = {"CPU": 1.0, "memory": 4.0 * 2**30, "object_store_memory": 2.0 * 2**30}
    left = {name: have - request.get(name, 0.0) for name, have in node.items()}
    assert min(left.values()) >= 0 and request  # it fits beside the worker, and Tune has a request to place
    assert _held(left, {"CPU": 1.0}) == 1
    assert _held({**node, "CPU": 1.0 - 0.01}, {"CPU": 1.0}) == 0  # what the former 0.01-CPU request left
