"""A beta x loss-type sweep with ASHA early stopping, a results table, learning curves and the best model.

    python experiments/sweep_beta_loss.py          # Qwen3-0.6B on ultrafeedback, GPU cluster
    python experiments/sweep_beta_loss.py --tiny   # offline: tiny model, stack-exchange pairs
"""

from common import parser, read_rows, shared_file, tiny_defaults, tiny_model, workers
from ray import tune

from raydpo import DPOConfig
from raydpo.tune import sweep

SPACE = {"beta": tune.grid_search([0.05, 0.5]), "loss_type": tune.grid_search(["sigmoid", "ipo"])}


def to_trl(row):
    return {"prompt": row["question"], "chosen": row["response_j"], "rejected": row["response_k"]}


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    if args.tiny:
        rows = [to_trl(r) for r in read_rows(shared_file("torchtune", "tests", "assets", "stack_exchange_paired_tiny.json"), 12)]
        model, dataset = tiny_model(rows), rows
        config = DPOConfig(output_dir=args.output_dir or "outputs/sweep-tiny", **tiny_defaults(args, max_length=128))
    else:
        from datasets import load_dataset

        model = "Qwen/Qwen3-0.6B"
        dataset = load_dataset("trl-lib/ultrafeedback_binarized", split="train[:20000]")
        config = DPOConfig(output_dir=args.output_dir or "outputs/sweep-beta-loss", num_workers=workers(args, 2),
                           use_gpu=True, max_steps=args.max_steps or 500, logging_steps=25, save_steps=250,
                           learning_rate=5e-7, model_init_kwargs={"dtype": "bfloat16"},
                           deepspeed={"bf16": {"enabled": True}})
    # concurrent trials: sized from the cluster (its GPUs, or on CPU its cores per trial's workers)
    return sweep(model, dataset, SPACE, args=config, scheduler="asha", metric="loss", mode="min", name="beta-x-loss")


if __name__ == "__main__":
    main()
