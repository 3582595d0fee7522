"""Connecting to Ray and setting up the workers' processes (their sizes: raydpo/sizing.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import warnings
from typing import Optional

import ray


IDLE_WORKERS = 8  # idle Ray worker processes an embedded Ray keeps between runs (connect)


def connect(address: Optional[str] = None, **init_kwargs) -> None:
    """Join `address` (or RAY_ADDRESS); with neither, or "local", start an embedded local Ray
    (`init_kwargs` go to ray.init, e.g. num_cpus). Reuse a live session."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address)
        return
    # Ray Train otherwise echoes every worker print through its logger too: each line twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    port = _free_port()
    # Works around a Ray 2.60 bug: Ray Train V2's PlacementGroupCleaner asks the state API for the
    # controller with no address, so the API looks for "the" Ray instance on the machine. With two on one
    # machine (two notebooks, a test beside a run) that raises ConnectionError, and with a busy GCS an
    # RpcError; it catches neither, and its monitor thread dies with a traceback in the run's output.
    # RAY_API_SERVER_ADDRESS names this session's dashboard to the state API: the raylet started here, and
    # so every Ray process of this session, inherits it, and a slow reply is then an error it does catch.
    previous = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # Ray kills idle worker processes beyond one per CPU after a second. A run's training workers count
    # towards that, so on a small machine the processes that tokenized the data (transformers imported,
    # the tokenizer loaded) are gone by the next run, which pays ~2.5 s to start them again
    # (bench/startup.py). Up to IDLE_WORKERS of them stay.
    system_config = {"num_workers_soft_limit": IDLE_WORKERS, **init_kwargs.pop("_system_config", {})}
    try:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 _system_config=system_config, **init_kwargs)
    finally:  # this process keeps what it had
        if previous is None:
            del os.environ["RAY_API_SERVER_ADDRESS"]
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = previous


# Ray Train's controller polls each training worker for its status every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
# (2 s by default), and a short run (a sweep trial, a notebook's, a test's) waits out polls at its end: from
# the workers' return to fit()'s, bench/startup.py measured ~1.8 s at 0.5 s and ~0.8 s at 0.1 s, with the
# time to the first step unchanged. Each poll is one call per worker, so a large group polls less often.
# A value set in the environment before raydpo is imported wins.
_POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
_USER_POLL_INTERVAL = os.environ.get(_POLL_INTERVAL_ENV)
FAST_POLL_WORKERS = 8  # up to this many workers, the controller polls every 0.1 s; more, every 0.5 s


def train_poll_interval(num_workers: int) -> str:
    """The RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (seconds, as text) for a run of `num_workers` workers."""
    if _USER_POLL_INTERVAL:
        return _USER_POLL_INTERVAL
    return "0.1" if num_workers <= FAST_POLL_WORKERS else "0.5"


def set_train_poll_interval(num_workers: int) -> None:
    """Set it for the next fit() in this process: the driver's environment reaches Ray Train's controller."""
    os.environ[_POLL_INTERVAL_ENV] = train_poll_interval(num_workers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_this_node():
    """A scheduling strategy that keeps an actor on the driver's node (which a run cannot outlive anyway)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


# Ray ends an actor that is not detached once its creator's handle is gone, named or not (handles that
# `ray.get_actor` or `get_if_exists` return do not count): the driver keeps each one it created here, or
# the actor would end with the first run that used it.
_driver_actors = {}  # name -> the handle this driver created


def in_driver() -> bool:
    """Whether this process is a Ray driver (a script, a notebook, a `ray job submit` entrypoint), not a
    Ray worker such as a Tune trial's."""
    return ray._private.worker.global_worker.mode == ray.SCRIPT_MODE


def driver_actor(actor_class, name: str):
    """The session's one `actor_class` actor, named `name` in the job's namespace: in the driver, created on
    first use (on the driver's node, owned by the driver, so it outlives every run and Tune trial of the
    session and ends with the driver); in a Ray process (a Tune trial), the one its driver made, or None
    when there is none."""
    try:
        found = ray.get_actor(name)  # a live one: a dead actor's name is free again
    except ValueError:  # none in this job's namespace (or only in an earlier Ray session)
        found = None
    own = _driver_actors.get(name)
    if found is not None:  # ours (the handle that keeps it alive), else a trial's driver's (or another
        # driver's, in a namespace shared on purpose)
        return own if own is not None and found._actor_id == own._actor_id else found
    if not in_driver():
        return None
    try:
        _driver_actors[name] = actor_class.options(name=name, scheduling_strategy=on_this_node()).remote()
    except ValueError:  # the name is still held by one that just ended: none this time
        return None
    return _driver_actors[name]


def resolve_use_gpu(config):
    """DPOConfig with use_gpu=None made definite: GPUs when this Ray cluster has any, or its autoscaler
    can start nodes that have them; in local mode (num_workers=0), when this process has one."""
    if config.use_gpu is not None:
        return config
    import dataclasses

    if config.num_workers == 0:  # local mode: the loop runs in this process, on its GPU if it has one
        import torch

        return dataclasses.replace(config, use_gpu=torch.cuda.is_available())
    return dataclasses.replace(config, use_gpu=capacity().get("GPU", 0) > 0)


def capacity() -> dict:
    """The most of each resource this Ray cluster can hold: what its nodes have now or, where an
    autoscaler (the cluster launcher's, KubeRay's) has published its node types, what they add up to at
    their max_workers, whichever is more. Ray Train checks its worker group against the same limit
    (ray._private.state.get_max_resources_from_cluster_config, None without an autoscaler)."""
    from ray._private.state import state

    now = ray.cluster_resources()
    most = state.get_max_resources_from_cluster_config() or {}
    return {name: max(float(now.get(name, 0.0)), float(most.get(name, 0))) for name in {*now, *most}}


def nodes():
    """This Ray cluster node by node (`sizing.Nodes`): each alive node's resources, and each node type its
    autoscaler has published and may still start (max_workers above 0)."""
    from ray._private.state import state

    from raydpo import sizing

    now = [{name: float(value) for name, value in node["Resources"].items()} for node in ray.nodes() if node["Alive"]]
    published = state.get_cluster_config()
    types = [{name: float(value) for name, value in group.resources.items()}
             for group in (published.node_group_configs if published else []) if group.max_count != 0]
    return sizing.Nodes(now, types)


def sizes(config):
    """`sizing.size` of `config` on this Ray cluster: its resources now, its capacity and its nodes."""
    from raydpo import sizing

    return sizing.size(config, ray.cluster_resources(), capacity(), nodes())


def cpu_process_env() -> dict:
    """Environment variables for a CPU training or reference process: glibc's malloc keeps freed memory.

    By default glibc serves every allocation over 32 MiB (a chunk of logits, a layer's activations at
    longer lengths) with a fresh mmap and unmaps it on free, so each step page-faults those tensors in
    again; threads other than the main one (Ray Train runs the loop in one) also get arenas of their
    own, which return memory the same way. Kept and shared: about 20% off a CPU step on
    bench/compare_trl.py's model, for ~7% more peak memory. glibc reads these at process start, so
    they go in the Ray actors' runtime_env. RAYDPO_KEEP_FREED_MEMORY=0 leaves malloc as it is."""
    if os.environ.get("RAYDPO_KEEP_FREED_MEMORY", "1") == "0":
        return {}
    return {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1), "MALLOC_ARENA_MAX": "1"}


def ray_log_level(log_level: str) -> str:
    """The level of Ray Train's and Ray Data's console logs for DPOConfig.log_level: "passive" keeps
    their INFO lines (a ~700-character "Reporting training result" per step and worker, each dataset's
    execution plan) out of the output; Ray's log files under the session folder keep everything."""
    return "WARNING" if log_level == "passive" else log_level.upper()


def quiet_logs(log_level: str, worker: bool = False) -> None:
    """Set this process's loggers for DPOConfig.log_level (driver and training workers; Ray Train's own
    logger is set through RunConfig.logging_config). Warnings and errors always get through."""
    logging.getLogger("ray.data").setLevel(ray_log_level(log_level))
    if log_level == "passive":
        # Ray Data's notice that its progress bars are off: raydpo turns them off on purpose.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    if not worker:
        return
    try:
        # Ray 2.60 logs each ray.train.report ("Reporting training result ...", ~700 characters per step and
        # worker) through logging.getLogger(__file__): a logger named by a path, outside "ray.train", so
        # RunConfig.logging_config does not reach it. Set on that logger itself.
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(ray_log_level(log_level))
    except ImportError:  # another Ray version: its own logging config applies
        pass
    import transformers

    if log_level != "passive":  # as transformers' Trainer does with log_level
        transformers.logging.set_verbosity(getattr(logging, log_level.upper()))
    if log_level in ("passive", "warning", "error", "critical"):
        # "Loading weights" and "Writing model shards" bars from every worker, at every load and save
        transformers.utils.logging.disable_progress_bar()
    if log_level in ("passive", "warning", "error", "critical"):
        # DeepSpeed's ZeRO calls a torch.distributed function that torch deprecated; nothing a user can act on.
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated", category=FutureWarning)


@contextlib.contextmanager
def signal_handlers_kept():
    """This process's Ctrl-C (SIGINT) and SIGUSR1 handlers as they were, whatever a Ray Train run or a
    Tune sweep inside the block installs. Works around Ray 2.60 leaving its handlers behind:
    TorchTrainer.fit() installs one that aborts its run and holds its controller actor (alive, torch
    imported) until the next run replaces it; Tuner.fit() one that ends its sweep. Once they are done,
    Ctrl-C in the driver would reach a finished run (twice logged, the third exits the process) or sweep
    (once ignored) instead of raising KeyboardInterrupt. Only the main thread has handlers to keep."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {number: signal.getsignal(number) for number in (signal.SIGINT, getattr(signal, "SIGUSR1", None))
            if number is not None}
    try:
        yield
    finally:
        for number, handler in kept.items():
            if handler is not None:  # None: set outside Python, which signal.signal cannot restore
                signal.signal(number, handler)


def leftovers(wait_s: float = 30.0) -> dict:
    """What earlier runs still hold in this Ray session, after waiting up to `wait_s` for Ray's
    asynchronous clean-up: {"placement_groups": [...], "actors": [...], "cpus_in_use": float}, empty lists
    and 0.0 when every run returned what it took. A run that leaves a placement group or a CPU-holding
    actor behind makes a later run wait at "Requesting resources"; the test suite checks this after
    every test that used the shared session (tests/conftest.py)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        groups = [f"{pg_id[:8]} {info.get('name') or ''} {info['state']} {info['bundles']}".strip()
                  for pg_id, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"]
        in_use = ray.cluster_resources().get("CPU", 0.0) - ray.available_resources().get("CPU", 0.0)
        if (not groups and in_use < 1e-6) or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # two GCS reads a round: polling often costs little, and most waits are short
    actors = []
    if groups or in_use >= 1e-6:
        try:
            actors = [f"{a.class_name} pid={a.pid} {a.required_resources}"
                      for a in session_actors([("state", "=", "ALIVE")]) if a.required_resources.get("CPU")]
        except Exception as error:  # the state API is a diagnosis here, not the check
            actors = [f"(actors unknown: {error})"]
    return {"placement_groups": groups, "actors": actors, "cpus_in_use": round(in_use, 3)}


def session_actors(filters: list) -> list:
    """This session's actors matching `filters` (Ray state API filters), asked of this session's own
    dashboard: with no address the state API looks for "the" Ray instance on the machine."""
    from ray.util.state import list_actors

    webui = ray._private.worker.global_worker.node.address_info.get("webui_url")
    return list_actors(address=f"http://{webui}" if webui else None, filters=filters, detail=True, limit=10000)
