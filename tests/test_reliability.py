"""Long runs without a person watching: a killed worker loses nothing, NaN stops before a checkpoint."""

import glob
import threading
import time

import psutil
import pytest

from raydpo import DPOConfig, DPOTrainer


def config(path, **overrides):
    values = dict(output_dir=str(path), num_workers=2, per_device_train_batch_size=4, learning_rate=1e-3,
                  max_length=32, logging_steps=1, run_name="run")
    values.update(overrides)
    return DPOConfig(**values)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(ray_session, tiny_model, parity_rows, tmp_path):
    from transformers import AutoModelForCausalLM

    # An absurd learning rate: step 1 is finite, its update overflows the logits at step 2.
    trainer = DPOTrainer(tiny_model, args=config(tmp_path, num_workers=1, learning_rate=1e30, max_grad_norm=0.0,
                                                 max_steps=4, save_steps=1), train_dataset=parity_rows[:16])
    with pytest.raises(Exception, match=r"non-finite (loss|grad_norm) \(.*\) at step 2"):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoint-2").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-1" / "model")
    assert all(p.isfinite().all() for p in model.parameters())


def _kill_a_worker_after(checkpoint_glob: str, killed: list):
    deadline = time.time() + 300
    while time.time() < deadline and not glob.glob(checkpoint_glob):
        time.sleep(0.05)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    if workers:
        workers[-1].kill()  # SIGKILL from outside, mid-run
        killed.append(workers[-1].pid)


@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint_and_matches(ray_session, tiny_model, parity_rows, tmp_path):
    rows = parity_rows[:160]  # 20 steps per epoch on 2 workers x 4 pairs
    steady = DPOTrainer(tiny_model, args=config(tmp_path / "steady", max_steps=30, save_steps=5, save_total_limit=2),
                        train_dataset=rows).train()
    assert len(glob.glob(str(tmp_path / "steady" / "run" / "checkpoint-*"))) == 2  # save_total_limit

    killed = []
    watcher = threading.Thread(target=_kill_a_worker_after,
                               args=(str(tmp_path / "killed" / "run" / "checkpoint-5"), killed))
    watcher.start()
    restarted = DPOTrainer(tiny_model, args=config(tmp_path / "killed", max_steps=30, save_steps=5, max_failures=1),
                           train_dataset=rows).train()
    watcher.join()
    assert killed, "no training worker was found to kill"
    assert [h["global_step"] for h in restarted.history] == list(range(1, 31))
    assert restarted.metrics["global_step"] == steady.metrics["global_step"] == 30
    assert restarted.metrics["loss"] == pytest.approx(steady.metrics["loss"], abs=1e-5)
    assert restarted.metrics["num_tokens"] == steady.metrics["num_tokens"]
