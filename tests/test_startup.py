"""Start-up accounting (raydpo/train/startup.py) and the DeepSpeed import it measured: no Ray."""

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


def test_the_deferred_backend_hands_every_call_to_rays(monkeypatch):
    """Every method Ray's _TorchBackend defines is handed on, with Ray's TorchConfig of the same settings
    (a method Ray adds later fails this test rather than silently running the base class's no-op)."""
    from ray.train.backend import Backend
    from ray.train.torch.config import TorchConfig, _TorchBackend

    from raydpo.train.backend import TorchBackendConfig, _DeferredTorchBackend

    public = {name for name in vars(_TorchBackend) if callable(vars(_TorchBackend)[name]) and not name.startswith("_")}
    assert public == {"on_start", "on_training_start", "on_shutdown"}
    assert public <= set(vars(_DeferredTorchBackend))
    assert _DeferredTorchBackend.share_cuda_visible_devices == _TorchBackend.share_cuda_visible_devices
    assert _DeferredTorchBackend.has_replica_groups == _TorchBackend.has_replica_groups
    assert issubclass(_DeferredTorchBackend, Backend)

    calls = []

    class Group:  # Ray Train's worker group, as far as on_start uses it before handing it on
        def execute_async(self, fn):
            calls.append(("execute_async", fn.__name__))
            return ["ref"]

    group = Group()
    for name in public:
        monkeypatch.setattr(_TorchBackend, name, lambda self, group, config, name=name: calls.append((name, group, config)))
    monkeypatch.setattr("raydpo.train.backend.ray.get", lambda refs: calls.append(("get", refs)))
    config = TorchBackendConfig(backend="gloo")
    backend = config.backend_cls()
    for name in sorted(public):
        getattr(backend, name)(group, config)
    ray_config = TorchConfig(backend="gloo")
    # on_start: the workers start importing, Ray's setup runs, and the imports' outcome is collected
    assert calls == [("on_shutdown", group, ray_config),
                     ("execute_async", "_import_worker_modules"), ("on_start", group, ray_config), ("get", ["ref"]),
                     ("on_training_start", group, ray_config)]


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
