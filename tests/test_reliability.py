"""Long runs without a person watching: a killed worker loses nothing, NaN stops before a checkpoint."""

import glob
import os
import shutil
import tempfile
import threading
import time

import psutil
import pytest

from raydpo import DPOConfig, DPOTrainer
from raydpo.train.run_context import SAVE_PREFIX


def config(path, **overrides):
    values = dict(output_dir=str(path), num_workers=2, per_device_train_batch_size=4, learning_rate=1e-3,
                  max_length=32, logging_steps=1, run_name="run")
    values.update(overrides)
    return DPOConfig(**values)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(ray_session, tiny_model, parity_rows, tmp_path):
    from transformers import AutoModelForCausalLM

    # An absurd learning rate: step 1 is finite, its update overflows the logits at step 2. Local mode
    # (num_workers=0): the loop's check and the checkpoint's publication, without a worker process.
    trainer = DPOTrainer(tiny_model, args=config(tmp_path, num_workers=0, learning_rate=1e30, max_grad_norm=0.0,
                                                 max_steps=4, save_steps=1), train_dataset=parity_rows[:16])
    with pytest.raises(Exception, match=r"non-finite (loss|grad_norm) \(.*\) at step 2"):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoint-2").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-1" / "model")
    assert all(p.isfinite().all() for p in model.parameters())


def _wait(condition, timeout=300.0, every=0.005):
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        time.sleep(every)


def _kill_a_worker(killed: list):
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    if workers:
        workers[-1].kill()  # SIGKILL from outside, mid-run
        killed.append(workers[-1].pid)


@pytest.fixture(scope="module")
def steady_run(ray_session, tiny_model, parity_rows, tmp_path_factory):
    """15 steps on 2 workers x 4 pairs (10 steps per epoch, so a restart also crosses an epoch), never interrupted."""
    path = tmp_path_factory.mktemp("steady")
    out = DPOTrainer(tiny_model, args=config(path, max_steps=15, save_steps=5, save_total_limit=2),
                     train_dataset=parity_rows[:80]).train()
    assert len(glob.glob(str(path / "run" / "checkpoint-*"))) == 2  # save_total_limit
    return out


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["after_checkpoint_5", "during_save_of_checkpoint_10"])
def test_killed_worker_restarts_from_checkpoint_and_matches(steady_run, tiny_model, parity_rows, tmp_path, moment):
    run_dir = tmp_path / "killed" / "run"
    saving = os.path.join(tempfile.gettempdir(), f"{SAVE_PREFIX}*", "deepspeed")  # a worker's save in progress
    killed = []

    def watch():
        _wait(lambda: (run_dir / "checkpoint-5").exists())
        if moment == "during_save_of_checkpoint_10":
            _wait(lambda: not glob.glob(saving))  # checkpoint-5's save is over
            _wait(lambda: glob.glob(saving))  # checkpoint-10's has begun
        _kill_a_worker(killed)
        saving_at_kill.append(bool(glob.glob(saving)))

    saving_at_kill = []
    watcher = threading.Thread(target=watch)
    watcher.start()
    restarted = DPOTrainer(tiny_model, args=config(tmp_path / "killed", max_steps=15, save_steps=5, max_failures=1),
                           train_dataset=parity_rows[:80]).train()
    watcher.join()
    assert killed, "no training worker was found to kill"
    if moment == "during_save_of_checkpoint_10":
        assert saving_at_kill == [True]
    assert [h["global_step"] for h in restarted.history] == list(range(1, 16))
    assert restarted.metrics["global_step"] == steady_run.metrics["global_step"] == 15
    assert restarted.metrics["loss"] == pytest.approx(steady_run.metrics["loss"], abs=1e-5)
    assert restarted.metrics["num_tokens"] == steady_run.metrics["num_tokens"]
    for folder in glob.glob(os.path.dirname(saving)):  # the killed worker's half-written save
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_a_killed_controller_gives_back_its_placement_group(ray_session, tiny_model, parity_rows, tmp_path):
    """What the session's placement-group cleaner is for (raydpo/placement_group_cleaner.py): a run's Ray
    Train controller killed mid-run from outside, as the out-of-memory killer or a forced Tune stop would
    end it. The run raises, and its workers' placement group is removed within seconds instead of holding
    their CPUs until the driver exits, so the next run of the session starts."""
    import ray

    from raydpo import cluster
    from raydpo.placement_group_cleaner import session_cleaner

    cleaner = session_cleaner()
    before = ray.get(cleaner.status.remote())
    killed = []

    def kill_the_controller():
        _wait(lambda: ray.get(cleaner.status.remote())["watched"], every=0.1)  # the run's worker group is up
        controller_id = next(iter(ray.get(cleaner.status.remote())["watched"]))
        [actor] = cluster.session_actors([("actor_id", "=", controller_id)])
        psutil.Process(actor.pid).kill()  # SIGKILL, mid-run
        killed.append(actor.pid)

    killer = threading.Thread(target=kill_the_controller)
    killer.start()
    with pytest.raises(ray.exceptions.RayActorError):
        DPOTrainer(tiny_model, args=config(tmp_path, num_workers=1, max_steps=10 ** 4, save_strategy="no"),
                   train_dataset=parity_rows[:80]).train()
    killer.join()
    assert killed, "no controller was found to kill"
    left = cluster.leftovers()
    assert not left["placement_groups"] and not left["cpus_in_use"], left
    after = ray.get(cleaner.status.remote())
    assert len(after["removed"]) == len(before["removed"]) + 1 and after["watched"] == {}, after


class _Boom:
    def __reduce__(self):  # unpickling this would run code: it must be refused
        return (open, (str(_Boom.marker), "w"))


def test_checkpoint_files_load_without_unpickling_code(tmp_path):
    import pickle
    import types

    import torch

    from raydpo.train.checkpoint import _weights_only_loads

    _Boom.marker = tmp_path / "code-ran"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "evil": _Boom()}, path)
    engine = types.SimpleNamespace(checkpoint_engine=types.SimpleNamespace(load=None))
    with _weights_only_loads(engine):
        with pytest.raises(pickle.UnpicklingError):
            engine.checkpoint_engine.load(str(path), map_location="cpu")
    assert not _Boom.marker.exists()
    assert engine.checkpoint_engine.load is None  # DeepSpeed's own loader is put back
