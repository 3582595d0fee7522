"""TRL's quickstart on Ray: Qwen3-0.6B on trl-lib/ultrafeedback_binarized (full fine-tuning).

    python experiments/dpo_qwen3_ultrafeedback.py                  # cluster with internet and GPUs
    python experiments/dpo_qwen3_ultrafeedback.py --tiny           # offline: tiny model, hh-rlhf rows
"""

from common import parser, read_rows, shared_file, tiny_defaults, tiny_model, train_and_save

from raydpo import DPOConfig


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (needs PEFT support, issue 5)")
    args = p.parse_args(argv)
    if args.lora:
        raise SystemExit("--lora needs raydpo's PEFT reference mode, which has not landed yet")
    if args.tiny:
        rows = read_rows(shared_file("anthropics_hh-rlhf", "harmless-base", "test.jsonl.gz"), 32)  # implicit prompt
        model, dataset = tiny_model(rows), rows
        config = DPOConfig(output_dir=args.output_dir or "outputs/qwen3-ultrafeedback-tiny", **tiny_defaults(args))
    else:
        from datasets import load_dataset

        model = "Qwen/Qwen3-0.6B"
        dataset = load_dataset("trl-lib/ultrafeedback_binarized", split="train")
        config = DPOConfig(output_dir=args.output_dir or "outputs/Qwen3-0.6B-DPO", num_workers=args.num_workers or 8,
                           use_gpu=True, zero_stage=2, max_steps=args.max_steps or -1, num_train_epochs=1,
                           per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=5e-7,
                           model_init_kwargs={"dtype": "bfloat16"}, deepspeed={"bf16": {"enabled": True}},
                           gradient_checkpointing=True)
    return train_and_save(model, config, dataset)


if __name__ == "__main__":
    main()
