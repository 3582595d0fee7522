"""Evaluation during training: eval_ metrics, early stopping, load_best_model_at_end."""

import math

import pytest

from raydpo import DPOConfig, DPOTrainer
from test_hub import hub  # noqa: F401  (the imitated Hub, a fixture)
from test_model_objects import Recorder
from raydpo.train.schedule import EarlyStopping, eval_due, save_due


def test_eval_schedule_follows_strategy():
    steps = DPOConfig(eval_strategy="steps", eval_steps=3, logging_steps=5)
    assert [s for s in range(1, 10) if eval_due(s, steps, steps_per_epoch=4, last=s == 9)] == [3, 6, 9]
    every_log = DPOConfig(eval_strategy="steps", logging_steps=4)  # eval_steps None: logging_steps
    assert [s for s in range(1, 9) if eval_due(s, every_log, 100, last=False)] == [4, 8]
    epoch = DPOConfig(eval_strategy="epoch")
    assert [s for s in range(1, 10) if eval_due(s, epoch, steps_per_epoch=4, last=s == 9)] == [4, 8, 9]
    assert [s for s in range(1, 10) if eval_due(s, DPOConfig(), 4, last=s == 9)] == [9]  # "no": the end only
    best = DPOConfig(eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, save_steps=500)
    assert save_due(4, best, 100, last=False, evaluated=True) and not save_due(3, best, 100, last=False, evaluated=False)


def test_early_stopping_counts_like_transformers():
    config = DPOConfig(eval_strategy="steps", early_stopping_patience=2, early_stopping_threshold=0.1,
                       metric_for_best_model="eval_loss")
    stopper = EarlyStopping(config)
    assert (stopper.metric, stopper.greater) == ("eval_loss", False)
    decisions = [stopper.update({"eval_loss": v}) for v in (1.0, 0.95, 0.5, 0.45, 0.44)]
    # 0.95 beats 1.0 by less than the threshold: no reset, but it is the new best (as in transformers)
    assert decisions == [False, False, False, False, True]
    assert stopper.best == pytest.approx(0.44)
    restored = EarlyStopping(config, stopper.state())
    assert (restored.best, restored.evals_without_improvement) == (stopper.best, 2)
    accuracy = EarlyStopping(DPOConfig(eval_strategy="steps", metric_for_best_model="rewards/accuracies"))
    assert (accuracy.metric, accuracy.greater) == ("eval_rewards/accuracies", True)
    for name in ("loss", "eval_loss", "eval/loss"):  # transformers' spellings, and raydpo's former one
        assert DPOConfig(metric_for_best_model=name).best_metric == ("eval_loss", "min")


@pytest.mark.parametrize("values, message", [
    (dict(load_best_model_at_end=True), "need evaluation"),
    (dict(early_stopping_patience=2), "need evaluation"),
    (dict(eval_strategy="steps", eval_steps=3, save_steps=10, load_best_model_at_end=True), "multiple of eval_steps"),
    (dict(eval_strategy="sometimes"), "eval_strategy"),
    (dict(per_device_eval_batch_size=0), "per_device_eval_batch_size"),
])
def test_bad_eval_options_name_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        DPOConfig(**values)


def test_early_stopping_needs_an_eval_dataset(ray_session, tiny_model, parity_rows, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), eval_strategy="steps", early_stopping_patience=1, max_length=32)
    with pytest.raises(ValueError, match="need an eval_dataset"):
        DPOTrainer(tiny_model, args=args, train_dataset=parity_rows[:8])


def test_eval_metrics_early_stopping_and_best_checkpoint(ray_session, tiny_model, parity_rows, tmp_path, hub):
    """ZeRO-3 on 2 workers with 5 eval rows in batches of 2: worker 0 runs a padding forward. A huge
    threshold makes the second evaluation (step 4 of 8) stop the run. The same run delivers its events to
    a TrainerCallback, pushes each checkpoint and the final model to an imitated Hub (push_to_hub,
    hub_strategy="every_save"), and trainer.evaluate() recomputes the best step's eval metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydpo.evaluate import preference_scores

    eval_rows = parity_rows[200:205]
    args = DPOConfig(output_dir=str(tmp_path), run_name="run", num_workers=2, zero_stage=3, max_steps=8,
                     per_device_train_batch_size=4, per_device_eval_batch_size=2, learning_rate=3e-3,
                     max_length=32, logging_steps=1, eval_strategy="steps", eval_steps=2, save_steps=2,
                     early_stopping_patience=1, early_stopping_threshold=1e9, load_best_model_at_end=True,
                     push_to_hub=True, hub_model_id="org/evaluated", hub_strategy="every_save")
    recorder = Recorder()
    trainer = DPOTrainer(tiny_model, args=args, train_dataset=parity_rows[:40], eval_dataset=eval_rows,
                         callbacks=[recorder])
    initial = trainer.evaluate()  # before training: the initial policy is its own reference
    assert initial["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert initial["eval_rewards/margins"] == 0.0 and initial["eval_rewards/accuracies"] == 0.0
    recorder.calls.clear()
    out = trainer.train()

    assert [h["global_step"] for h in out.history] == [1, 2, 3, 4]  # stopped early
    evaluated = {h["global_step"]: h for h in out.history if "eval_loss" in h}
    assert sorted(evaluated) == [2, 4]
    for name in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "entropy", "logits/chosen"):
        assert all(math.isfinite(h[f"eval_{name}"]) for h in evaluated.values()), name
    best_step = min(evaluated, key=lambda s: evaluated[s]["eval_loss"])
    assert out.checkpoint.endswith(f"checkpoint-{best_step}")

    # The logged eval metrics are those of the saved model, recomputed here without Ray.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    scores = preference_scores(AutoModelForCausalLM.from_pretrained(f"{out.checkpoint}/model"), tokenizer,
                               eval_rows, beta=args.beta, max_length=32,
                               ref_model=AutoModelForCausalLM.from_pretrained(tiny_model))
    assert evaluated[best_step]["eval_rewards/margins"] == pytest.approx(scores["reward_margin"], abs=1e-4)
    assert evaluated[best_step]["eval_rewards/accuracies"] == pytest.approx(scores["reward_accuracy"])
    events = list(tmp_path.glob("run/tensorboard/events.out.tfevents.*"))
    assert events and b"eval/rewards/accuracies" in events[0].read_bytes()

    # trainer.evaluate(): the returned (best) policy on the eval set, in the driver, with the loop's code;
    # the micro-batches are the workers' ([r0 r1] | [r2 r3] [r4]), so the pair metrics and the loss agree
    metrics = trainer.evaluate()
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected"):
        assert metrics[f"eval_{name}"] == pytest.approx(evaluated[best_step][f"eval_{name}"], abs=1e-5), name

    # the callback got every event while the run went on, in transformers' order
    assert recorder.events() == [("on_train_begin", 0), ("on_log", 1), ("on_log", 2), ("on_log", 2),
                                 ("on_evaluate", 2), ("on_save", 2), ("on_log", 3), ("on_log", 4), ("on_log", 4),
                                 ("on_evaluate", 4), ("on_save", 4), ("on_train_end", 4),
                                 ("on_log", 4), ("on_evaluate", 4)]  # the last two: trainer.evaluate()
    assert recorder.calls[4][2] == {**{k: v for k, v in evaluated[2].items() if k.startswith("eval_")},
                                    "epoch": evaluated[2]["epoch"]}  # on_evaluate(metrics=...) at step 2
    best_checkpoints = {step: path for name, step, path in recorder.calls if name == "on_save"}
    assert best_checkpoints[4] == out.checkpoint  # state.best_model_checkpoint at the last save

    # push_to_hub with every_save: each checkpoint's model as it was saved, then the returned one
    commits = hub.commits()
    assert [c["header"]["summary"] for c in commits] == ["Training in progress, step 2", "Training in progress, step 4",
                                                         "End of training"]
    assert all({"config.json", "model.safetensors", "README.md"} <= set(c["files"]) for c in commits)
    with open(f"{out.checkpoint}/model/model.safetensors", "rb") as f:
        assert commits[-1]["files"]["model.safetensors"] == f.read()
    assert "| eval_loss |" in commits[-1]["files"]["README.md"].decode()
