"""TRL's quickstart on Ray: Qwen3-0.6B on trl-lib/ultrafeedback_binarized, full fine-tuning or LoRA.

    python experiments/dpo_qwen3_ultrafeedback.py                  # cluster with internet and GPUs
    python experiments/dpo_qwen3_ultrafeedback.py --lora           # a LoRA adapter, as TRL's doc: LoraConfig()
    python experiments/dpo_qwen3_ultrafeedback.py --tiny [--lora]  # offline: tiny model, hh-rlhf rows

With --lora the reference is the base model with the adapter disabled (no second copy), and the
output folder is the adapter, which `peft.PeftModel.from_pretrained(base, folder)` loads.
"""

from common import parser, read_rows, shared_file, tiny_defaults, tiny_model, train_and_save, workers

from raydpo import DPOConfig


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of the full model")
    args = p.parse_args(argv)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM")  # TRL's doc passes LoraConfig() with peft's defaults
    if args.tiny:
        rows = read_rows(shared_file("anthropics_hh-rlhf", "harmless-base", "test.jsonl.gz"), 32)  # implicit prompt
        model, dataset = tiny_model(rows), rows
        config = DPOConfig(output_dir=args.output_dir or "outputs/qwen3-ultrafeedback-tiny", **tiny_defaults(args))
    else:
        from datasets import load_dataset

        model = "Qwen/Qwen3-0.6B"
        dataset = load_dataset("trl-lib/ultrafeedback_binarized", split="train")
        config = DPOConfig(output_dir=args.output_dir or "outputs/Qwen3-0.6B-DPO", num_workers=workers(args, 8),
                           use_gpu=True, zero_stage=2, max_steps=args.max_steps or -1, num_train_epochs=1,
                           per_device_train_batch_size=4, gradient_accumulation_steps=2,
                           learning_rate=1e-5 if args.lora else 5e-7,  # TRL's doc: ~1e-5 for adapters
                           model_init_kwargs={"dtype": "bfloat16"}, deepspeed={"bf16": {"enabled": True}},
                           gradient_checkpointing=True)
    return train_and_save(model, config, dataset, peft_config)


if __name__ == "__main__":
    main()
