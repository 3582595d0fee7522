"""Start-up accounting (raydpo/train/startup.py) and the DeepSpeed import it measured: no Ray."""

import os
import sys

import pytest

from raydpo.train.startup import PHASES, StartupClock, startup_seconds


def test_phases_are_seconds_between_consecutive_marks_in_run_order():
    marks = {"worker_process_start": 103.0, "loop_start": 105.5, "data": 106.0, "model": 108.0, "deepspeed": 109.0,
             "reference": 109.25, "first_step": 110.0}
    seconds = startup_seconds(100.0, marks)
    assert list(seconds) == [phase for _, phase in PHASES] + ["total"]
    assert seconds["worker group"] == 3.0 and seconds["imports and process group"] == 2.5
    assert seconds["model load"] == 2.0 and seconds["first step"] == 0.75
    assert seconds["total"] == 10.0 == sum(v for k, v in seconds.items() if k != "total")


def test_a_missing_mark_folds_into_the_next_phase_and_no_marks_give_nothing():
    seconds = startup_seconds(0.0, {"loop_start": 4.0, "first_step": 9.0})
    assert seconds == {"imports and process group": 4.0, "first step": 5.0, "total": 9.0}
    assert startup_seconds(0.0, {}) == {}


def test_only_rank_0_sends_and_only_once_the_first_step_is_done():
    sent = []

    class History:
        class mark:
            @staticmethod
            def remote(marks):
                sent.append(dict(marks))

    assert StartupClock(1).marks is None
    clock = StartupClock(0)
    clock.mark("data")
    clock.send(History)
    assert sent == []  # not before the first step
    clock.mark("first_step")
    first = clock.marks["first_step"]
    clock.mark("first_step")  # a later step does not move it
    clock.send(History)
    clock.send(History)
    assert len(sent) == 1 and sent[0]["first_step"] == first
    assert sent[0]["worker_process_start"] <= sent[0]["loop_start"] <= sent[0]["data"] <= first


def test_deepspeed_imports_without_mlflow_or_the_shared_memory_op_and_mlflow_still_imports():
    from raydpo.train.deepspeed import import_deepspeed

    deepspeed = import_deepspeed()
    from deepspeed.autotuning import autotuner

    assert "mlflow" not in sys.modules or sys.modules["mlflow"] is not None
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert autotuner.has_mlflow is False or "mlflow" in sys.modules
    import mlflow  # hidden for deepspeed's import only

    assert mlflow.__version__


# --- Ray Train's controller starts without torch (raydpo/train/backend.py) ---

def _unpickling_imports_torch(config) -> bool:
    """What a new Ray Train controller process does first with the run's backend config: unpickle it."""
    import pickle
    import subprocess

    code = "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(config), capture_output=True, check=True)
    return out.stdout.strip() == b"True"


def test_the_backend_config_reaches_the_controller_without_torch():
    """raydpo's config unpickles without importing torch; Ray's own TorchConfig imports it (so the check
    can tell), and both carry the same settings."""
    from ray.train.torch.config import TorchConfig

    from raydpo.train.backend import TorchBackendConfig

    ours = TorchBackendConfig(backend="gloo", timeout_s=60)
    assert not _unpickling_imports_torch(ours)
    assert _unpickling_imports_torch(TorchConfig(backend="gloo"))
    assert ours.torch_config() == TorchConfig(backend="gloo", timeout_s=60)
    assert ours.to_dict() == TorchConfig(backend="gloo", timeout_s=60).to_dict()
    assert ours.framework == TorchConfig().framework
    assert ours.train_func_context is TorchConfig().train_func_context


class _FakeWorkerGroup:
    """Ray Train V2's worker group as a backend drives it: each call runs its function here, once per
    target rank, and is recorded as (rank, step, arguments). A function of Ray's torch module is recorded
    under its own name whether called directly (Ray's backend) or named through raydpo's `_ray_torch`;
    `run=False` runs nothing (a process that must not import torch)."""

    def __init__(self, size, resources=None, run=True):
        self.size, self.resources, self.run, self.calls = size, resources or {"CPU": 1}, run, []

    def __len__(self):
        return self.size

    def get_resources_per_worker(self):
        return dict(self.resources)

    def _call(self, rank, fn, args, kwargs):
        if fn.__name__ == "_ray_torch":
            (name, *args), fn = args, None
        else:
            name = fn.__name__
        self.calls.append((rank, name, tuple(args), dict(kwargs)))
        if name == "get_address_and_port":
            return "10.0.0.1", 29500
        if self.run and fn is not None and name not in ("_import_worker_modules", "set_env_vars", "_set_master"):
            return fn(*args, **kwargs)

    def execute_single_async(self, rank, fn, *args, **kwargs):
        return self._call(rank, fn, args, kwargs)

    execute_single = execute_single_async

    def execute_async(self, fn, *args, **kwargs):
        return [self._call(rank, fn, args, kwargs) for rank in range(self.size)]

    execute = execute_async


def _steps(calls):
    """The calls as steps: set_env_vars (Ray's closure) and _set_master (raydpo's) both set MASTER_ADDR and
    MASTER_PORT from (addr, port), by keyword in Ray's and by position in raydpo's."""
    steps = []
    for rank, name, args, kwargs in calls:
        if name in ("set_env_vars", "_set_master"):
            name, args, kwargs = "set master", (), dict(zip(("addr", "port"), args), **kwargs)
        steps.append((rank, name, args, kwargs))
    return steps


@pytest.mark.parametrize("size, resources, backend, init_method", [
    (2, {"CPU": 1}, None, "env"), (1, {"CPU": 1}, None, "tcp"), (3, {"CPU": 1, "GPU": 1}, None, "env"),
    (2, {"CPU": 1, "GPU": 1}, "gloo", "env")])
def test_the_backend_takes_rays_steps_on_the_workers(monkeypatch, size, resources, backend, init_method):
    """raydpo's backend runs Ray's _TorchBackend's steps (on a V2 worker group: Ray's Train V2) on the same
    ranks, in the same order, with the same arguments, after the workers' imports; Ray's own backend and
    raydpo's drive a recording stand-in of the worker group here. Ray's step functions are stood in for
    too (they would join a real process group)."""
    import ray
    from ray.train.backend import Backend
    from ray.train.torch import config as ray_torch
    from ray.train.torch.config import TorchConfig, _TorchBackend

    from raydpo.train.backend import TorchBackendConfig, _WorkerSideTorchBackend

    # a method Ray adds later fails here rather than silently running the base class's no-op
    public = {name for name in vars(_TorchBackend) if callable(vars(_TorchBackend)[name]) and not name.startswith("_")}
    assert public == {"on_start", "on_training_start", "on_shutdown"}
    assert issubclass(_WorkerSideTorchBackend, Backend)
    assert _WorkerSideTorchBackend.share_cuda_visible_devices == _TorchBackend.share_cuda_visible_devices
    assert _WorkerSideTorchBackend.has_replica_groups == _TorchBackend.has_replica_groups
    for name in ("_set_torch_distributed_env_vars", "_setup_torch_process_group", "_shutdown_torch"):
        stand_in = lambda *args, **kwargs: None  # noqa: E731
        stand_in.__name__ = name
        monkeypatch.setattr(ray_torch, name, stand_in)
    monkeypatch.setattr(ray, "get", lambda refs, timeout=None: refs)

    groups = {}
    for kind, backend_obj, config in [("ray", _TorchBackend(), TorchConfig(backend, init_method, 60)),
                                      ("raydpo", _WorkerSideTorchBackend(), TorchBackendConfig(backend, init_method, 60))]:
        groups[kind] = _FakeWorkerGroup(size, resources)
        for method in ("on_start", "on_training_start", "on_shutdown"):
            getattr(backend_obj, method)(groups[kind], config)
    imports = [(rank, "_import_worker_modules", (), {}) for rank in range(size)]
    assert groups["raydpo"].calls[:size] == imports  # first, so that the imports overlap the controller's work
    assert _steps(groups["raydpo"].calls[size:]) == _steps(groups["ray"].calls)
    expected = backend or ("nccl" if "GPU" in resources else "gloo")
    assert [kwargs["backend"] for _, name, _, kwargs in groups["ray"].calls
            if name == "_setup_torch_process_group"] == [expected] * size  # the stand-in saw what Ray does


def test_the_controllers_side_of_the_backend_imports_no_torch():
    """A whole run's backend calls (on a group that runs nothing: the workers' side is elsewhere), in a
    fresh process like a controller's: torch is never imported there."""
    import subprocess

    code = ("import sys; sys.path.insert(0, 'tests'); import ray; ray.get = lambda refs, timeout=None: refs\n"
            "from test_startup import _FakeWorkerGroup\n"
            "from raydpo.train.backend import TorchBackendConfig\n"
            "config = TorchBackendConfig(); backend = config.backend_cls(); group = _FakeWorkerGroup(2, run=False)\n"
            "[getattr(backend, m)(group, config) for m in ('on_start', 'on_training_start', 'on_shutdown')]\n"
            "print(len(group.calls), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split()[-2:] == [b"11", b"False"], out.stdout


def test_the_workers_import_what_they_need_next():
    """_import_worker_modules, run in a fresh process: torch.distributed and the training loop, no more."""
    import subprocess

    code = ("import sys; from raydpo.train.backend import _import_worker_modules; _import_worker_modules(); "
            "print(all(m in sys.modules for m in ('torch.distributed', 'ray.train.torch.config', 'raydpo.train.loop')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert out.stdout.strip().endswith(b"True")


def test_the_controller_polls_small_groups_often_and_a_users_interval_wins(monkeypatch):
    """Ray Train's controller waits out its status polls at a run's end (cluster.train_poll_interval):
    0.1 s up to FAST_POLL_WORKERS workers, 0.5 s beyond, the user's RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
    whatever the size. The driver's value is one Ray Train passes on to its controller."""
    import os

    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE, HEALTH_CHECK_INTERVAL_S_ENV_VAR

    from raydpo import cluster

    assert HEALTH_CHECK_INTERVAL_S_ENV_VAR == cluster._POLL_INTERVAL_ENV in ENV_VARS_TO_PROPAGATE
    monkeypatch.setattr(cluster, "_USER_POLL_INTERVAL", None)
    monkeypatch.delenv(cluster._POLL_INTERVAL_ENV, raising=False)
    assert [cluster.train_poll_interval(n) for n in (1, 2, cluster.FAST_POLL_WORKERS, cluster.FAST_POLL_WORKERS + 1,
                                                     256)] == ["0.1", "0.1", "0.1", "0.5", "0.5"]
    cluster.set_train_poll_interval(64)
    assert os.environ[cluster._POLL_INTERVAL_ENV] == "0.5"
    cluster.set_train_poll_interval(2)  # the next run's own
    assert os.environ[cluster._POLL_INTERVAL_ENV] == "0.1"
    monkeypatch.setattr(cluster, "_USER_POLL_INTERVAL", "3")
    cluster.set_train_poll_interval(2)
    assert os.environ[cluster._POLL_INTERVAL_ENV] == "3"


# --- No DatasetManager actor, and no cleaner actor, per run (raydpo/train/trainer.py RunTrainer) ---

def test_the_run_trainer_drops_the_datasets_callback_and_swaps_the_cleaner():
    """Without `datasets` raydpo's TorchTrainer leaves out Ray Train's DatasetsCallback (which starts a
    DatasetManager actor per run); given the session's placement-group cleaner, it puts
    SessionCleanerCallback (holding that cleaner) where Ray's PlacementGroupCleanerCallback (a new
    cleaner actor per run) was. Every other callback TorchTrainer makes stays, in order; given datasets
    and no cleaner, the callbacks are TorchTrainer's. tests/test_many_runs.py checks real runs."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from raydpo.placement_group_cleaner import SessionCleanerCallback
    from raydpo.train.backend import TorchBackendConfig
    from raydpo.train.trainer import RunTrainer

    def callbacks(cls, cleaner=None, **datasets):
        extra = {"cleaner": cleaner} if cls is RunTrainer else {}
        trainer = cls(lambda: None, torch_config=TorchBackendConfig(), datasets=datasets or None,
                      scaling_config=ray.train.ScalingConfig(num_workers=2), **extra)
        return trainer._create_default_callbacks()

    kinds = lambda *args, **kwargs: [type(c) for c in callbacks(*args, **kwargs)]  # noqa: E731
    ray_default = kinds(TorchTrainer)
    assert DatasetsCallback in ray_default and PlacementGroupCleanerCallback in ray_default and len(ray_default) > 3
    assert kinds(RunTrainer) == [kind for kind in ray_default if kind is not DatasetsCallback]
    cleaner = object()  # stands in for the actor handle: the callback only holds it until the controller runs
    swapped = callbacks(RunTrainer, cleaner)
    assert [type(c) for c in swapped] == [SessionCleanerCallback if kind is PlacementGroupCleanerCallback else kind
                                          for kind in ray_default if kind is not DatasetsCallback]
    assert [c._cleaner for c in swapped if isinstance(c, SessionCleanerCallback)] == [cleaner]
    dataset = object()  # the callback only holds it until a run starts
    assert kinds(RunTrainer, train=dataset) == kinds(TorchTrainer, train=dataset)


def test_a_run_and_a_sweep_give_the_driver_its_signal_handlers_back(monkeypatch):
    """Ray 2.60's Ray Train fit() and Tune's install SIGINT (Tune also SIGUSR1) handlers and leave them
    behind; RunTrainer and the sweep (cluster.signal_handlers_kept) put the driver's back, on success
    and on error. Here Ray's controller start is stood in for by a function that installs a handler as
    Ray's does; tests/test_many_runs.py checks real runs and a real sweep."""
    import signal

    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from raydpo.cluster import signal_handlers_kept
    from raydpo.train.backend import TorchBackendConfig
    from raydpo.train.trainer import RunTrainer

    def installs_handlers(self, fail=False, **kwargs):
        signal.signal(signal.SIGINT, lambda *args: None)  # Ray's holds the run's controller
        signal.signal(signal.SIGUSR1, lambda *args: None)
        if fail:
            raise RuntimeError("the run failed")
        return "result"

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)
    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller", installs_handlers)
    trainer = RunTrainer(lambda: None, torch_config=TorchBackendConfig(),
                         scaling_config=ray.train.ScalingConfig(num_workers=1))
    assert trainer._initialize_and_run_controller() == "result"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)) == before
    with pytest.raises(RuntimeError, match="the run failed"):
        trainer._initialize_and_run_controller(fail=True)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)) == before
    with signal_handlers_kept():
        installs_handlers(None)
        assert signal.getsignal(signal.SIGINT) != before[0]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)) == before
