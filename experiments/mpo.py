"""MPO (Mixed Preference Optimization): sigmoid + bco_pair + sft with the MPO paper's weights.

    python experiments/mpo.py            # Qwen3-0.6B on trl-lib/ultrafeedback_binarized, on a GPU cluster
    python experiments/mpo.py --tiny     # offline: tiny model, OpenAI-format preference rows
"""

from common import parser, read_rows, shared_file, tiny_defaults, tiny_model, train_and_save, workers

from raydpo import DPOConfig

MPO = {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    if args.tiny:
        rows = read_rows(shared_file("microsoft-foundry_fine-tuning", "validation.jsonl"), 16)
        model, dataset = tiny_model(rows), rows
        config = DPOConfig(output_dir=args.output_dir or "outputs/mpo-tiny", **tiny_defaults(args), **MPO)
    else:
        from datasets import load_dataset

        model, dataset = "Qwen/Qwen3-0.6B", load_dataset("trl-lib/ultrafeedback_binarized", split="train")
        config = DPOConfig(output_dir=args.output_dir or "outputs/Qwen3-0.6B-MPO", num_workers=workers(args, 8),
                           use_gpu=True, max_steps=args.max_steps or -1, num_train_epochs=1, learning_rate=5e-7,
                           model_init_kwargs={"dtype": "bfloat16"}, deepspeed={"bf16": {"enabled": True}}, **MPO)
    return train_and_save(model, config, dataset)


if __name__ == "__main__":
    main()
