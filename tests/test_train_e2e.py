"""End to end through the public API on the session's Ray: resume, mixed precision, padding-free pairs,
local mode (2 workers under DeepSpeed ZeRO 0/2/3: tests/test_many_runs.py)."""

import math

import pytest

from raydpo import DPOConfig, DPOTrainer


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), num_workers=2, max_steps=3, logging_steps=1, save_steps=100,
                  per_device_train_batch_size=4, learning_rate=1e-3, max_length=32)
    values.update(overrides)
    return DPOConfig(**values)


# 2 workers under ZeRO 0/2/3, every metric logged and finite: test_many_runs.test_two_workers_every_metric_finite


def test_resume_matches_uninterrupted_run(ray_session, tiny_model, parity_rows, tmp_path):
    """A Ray Train worker resumes a local-mode run's checkpoint and ends where it did (a 1-worker run's numbers are
    local mode's: test_local_mode_is_a_one_worker_run_in_this_process; 2 workers resuming under ZeRO-3:
    test_reference.test_tr_dpo_reference_at_a_sync_step; across nodes: test_multinode)."""
    rows = parity_rows[:40]
    full = DPOTrainer(tiny_model, args=config(tmp_path / "full", num_workers=0, max_steps=4, save_steps=2),
                      train_dataset=rows).train()
    checkpoint_2 = full.checkpoint.replace("checkpoint-4", "checkpoint-2")
    resumed = DPOTrainer(tiny_model, args=config(tmp_path / "resumed", num_workers=1, max_steps=4, save_steps=2),
                         train_dataset=rows, resume_from_checkpoint=checkpoint_2).train()
    assert [h["global_step"] for h in resumed.history] == [3, 4]
    assert resumed.metrics["loss"] == pytest.approx(full.metrics["loss"], abs=1e-5)
    assert resumed.metrics["num_tokens"] == full.metrics["num_tokens"]
    assert resumed.metrics["learning_rate"] == pytest.approx(full.metrics["learning_rate"])


def test_mixed_precision_bf16_and_fp16_on_cpu_workers(ray_session, tiny_model, parity_rows, tmp_path, capfd):
    """bf16 (TRL's: float32 weights under autocast): the policy (DeepSpeed's torch_autocast) and the
    in-worker reference (raydpo's autocast) compute alike, so at the first step, before any update, the
    rewards are exactly 0 (a float32 reference beside a bf16 policy gave 3.6e-5 on this tiny model). fp16: DeepSpeed's
    loss scaler starts too high (2**20), its first updates overflow and are skipped (and logged), and the
    run goes on to train. A CPU without float16 arithmetic (no AVX512-FP16/AMX-FP16) refuses fp16 by name."""
    from raydpo.precision import cpu_has_fp16

    runs = {}
    for name, options in {"bf16": dict(bf16=True), "fp16": dict(
            fp16=True, zero_stage=2, deepspeed={"fp16": {"initial_scale_power": 20}})}.items():
        # bf16 in local mode (num_workers=0: the loop in this process); fp16 in a Ray Train worker, whose
        # warning about skipped updates reaches this process's stderr
        args = config(tmp_path / name, num_workers=0 if name == "bf16" else 1, max_steps=6, save_strategy="no",
                      report_to="none", **options)
        trainer = DPOTrainer(tiny_model, args=args, train_dataset=parity_rows[:40])
        if name == "fp16" and not cpu_has_fp16():  # the worker runs on this machine's CPU
            with pytest.raises(Exception, match="fp16=True: this CPU worker has no float16 arithmetic"):
                trainer.train()
            continue
        runs[name] = trainer.train().history
    first = runs["bf16"][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert runs["bf16"][-1]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # and it trains
    if "fp16" not in runs:
        return
    norms = [row["grad_norm"] for row in runs["fp16"]]
    assert [row["global_step"] for row in runs["fp16"]] == [1, 2, 3, 4, 5, 6]
    assert math.isinf(norms[0]) and any(math.isfinite(norm) and norm > 0 for norm in norms)
    assert runs["fp16"][-1]["loss"] != pytest.approx(math.log(2), abs=1e-3)
    assert "fp16 gradients overflowed; DeepSpeed's loss scaler skipped this update" in capfd.readouterr().err


def test_padding_free_equals_padded_with_peft_on_two_workers(ray_session, tiny_model, parity_rows, tmp_path):
    """padding_free with a LoRA adapter (the reference: the base, adapters off), shared prompts, LD-DPO
    weights: every logged step equals the padded run's within 1e-5, and its batches hold no padding. Through
    Ray, 2 workers (ZeRO-2) whose micro-batches of 4 pairs are cut by a token budget (padding_free_max_tokens)
    of about two pairs, into pieces the two workers run as many of; uncut, in local mode."""
    from peft import LoraConfig

    budget = two_pair_budget(tiny_model, parity_rows[:40])
    runs = {}
    for name, options in {"padded": {}, "budget": dict(padding_free=True, padding_free_max_tokens=budget),
                          "padded, local": dict(num_workers=0), "free, local": dict(num_workers=0, padding_free=True),
                          }.items():
        args = config(tmp_path / name, max_steps=3, save_strategy="no", report_to="none", ld_alpha=0.5, **options)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        runs[name] = DPOTrainer(tiny_model, args=args, train_dataset=parity_rows[:40],
                                peft_config=lora).train().history
    for name, padded in (("budget", runs["padded"]), ("free, local", runs["padded, local"])):
        free = runs[name]
        assert [row["global_step"] for row in free] == [1, 2, 3]
        for metric in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected", "entropy",
                       "num_tokens"):
            assert [row[metric] for row in free] == pytest.approx([row[metric] for row in padded], rel=1e-5,
                                                                  abs=1e-6), (name, metric)
        assert all(row["padding_fraction"] == 0.0 for row in free)


def two_pair_budget(tiny_model, rows) -> int:
    """A padding_free_max_tokens of about two of these pairs (shared prompts, max_length 32): every
    micro-batch of 4 pairs is cut."""
    from transformers import AutoTokenizer

    from raydpo.data.batching import padding_free_lengths
    from raydpo.data.tokenize import tokenize_row

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lengths = padding_free_lengths([tokenize_row(tokenizer, row) for row in rows], 32, share_prompt=True)
    budget = 2 * sorted(lengths)[len(lengths) // 2]
    assert 4 * min(lengths) > budget
    return budget


def test_local_mode_is_a_one_worker_run_in_this_process(ray_session, tiny_model, parity_rows, tmp_path):
    """num_workers=0 (Ray Train's local mode) runs the loop in the driver's process. Every logged number
    is the 1-worker Ray Train run's, save the timings; it keeps the same checkpoints by the same rule
    (save_total_limit, ranked by eval loss with load_best_model_at_end) and returns the same best one,
    whose weights are the same; and a Ray Train checkpoint resumes in local mode."""
    import os

    import torch
    from safetensors.torch import load_file

    runs = {}
    for workers in (0, 1):
        args = config(tmp_path / str(workers), num_workers=workers, run_name="run", max_steps=4, save_steps=1,
                      save_total_limit=2, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                      metric_for_best_model="eval_loss", report_to="none")
        runs[workers] = DPOTrainer(tiny_model, args=args, train_dataset=parity_rows[:40],
                                   eval_dataset=parity_rows[40:52]).train()
    local, ray_run = runs[0], runs[1]
    timings = {"step_time", "tokens_per_second_per_worker"}
    assert [h["global_step"] for h in local.history] == [1, 2, 3, 4]
    assert [{k: v for k, v in h.items() if k not in timings} for h in local.history] == \
        [{k: v for k, v in h.items() if k not in timings} for h in ray_run.history]
    kept = {workers: sorted(p for p in os.listdir(tmp_path / str(workers) / "run") if p.startswith("checkpoint-"))
            for workers in (0, 1)}
    # Ray Train's rule: the 2 best by eval loss, and the latest whatever its rank
    assert kept[0] == kept[1] and 2 <= len(kept[0]) <= 3 and "checkpoint-4" in kept[0]
    assert os.path.basename(local.checkpoint) == os.path.basename(ray_run.checkpoint) and local.checkpoint in [
        str(tmp_path / "0" / "run" / name) for name in kept[0]]
    weights = [load_file(os.path.join(run.checkpoint, "model", "model.safetensors")) for run in (local, ray_run)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[1])
    # no worker process: the start-up phases begin at the loop, in this process
    assert "worker group" not in local.startup and local.startup["total"] > 0
    # the Ray Train run's earlier kept checkpoint resumes in local mode, which ends where both runs did
    # (the checkpoint's files are the same code's either way: checkpoint.save)
    earlier = kept[1][0]
    step = int(earlier.split("-")[1])
    resumed = DPOTrainer(tiny_model, args=config(tmp_path / "resumed_locally", num_workers=0, max_steps=4,
                                                 save_steps=4, report_to="none"), train_dataset=parity_rows[:40],
                         resume_from_checkpoint=str(tmp_path / "1" / "run" / earlier)).train()
    assert [h["global_step"] for h in resumed.history] == list(range(step + 1, 5))
    assert resumed.history[-1]["loss"] == pytest.approx(ray_run.history[-1]["loss"], abs=1e-6)


@pytest.mark.parametrize("stage, loss_type", [(0, "sigmoid"), (3, "sigmoid"), (0, ["sigmoid", "sft"])])
def test_token_budget_steps_equal_the_uncut_ones_under_deepspeed(ray_session, tiny_model, parity_rows, tmp_path, stage,
                                                                loss_type):
    """padding_free_max_tokens under DeepSpeed itself (local mode, ZeRO-0 and ZeRO-3, 2 micro-batches a step):
    pieces of about two pairs step exactly as the uncut micro-batches of 4 pairs, with the demo's sigmoid + sft too."""
    # chosen completions of uneven lengths, so that a piece's share of the chosen tokens (sft's) is not its share of the pairs
    rows = [dict(row, chosen=row["chosen"] + " even" * (i % 3)) for i, row in enumerate(parity_rows[:40])]
    runs, cut = {}, two_pair_budget(tiny_model, rows)
    for budget in (None, cut):
        args = config(tmp_path / str(budget), num_workers=0, zero_stage=stage, max_steps=3, gradient_accumulation_steps=2,
                      save_strategy="no", report_to="none", padding_free=True, padding_free_max_tokens=budget,
                      loss_type=loss_type)
        runs[budget] = DPOTrainer(tiny_model, args=args, train_dataset=rows).train().history
    assert [row["global_step"] for row in runs[cut]] == [1, 2, 3]
    for name in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "entropy", "mean_token_accuracy", "num_tokens"):
        assert [row[name] for row in runs[cut]] == pytest.approx([row[name] for row in runs[None]], rel=1e-5, abs=1e-6), name
