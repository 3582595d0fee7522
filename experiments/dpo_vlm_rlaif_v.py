"""DPO on a vision-language model: the TRL doc's Qwen2.5-VL-3B-Instruct on RLAIF-V.

    python experiments/dpo_vlm_rlaif_v.py          # Qwen2.5-VL-3B-Instruct on HuggingFaceH4/rlaif-v_formatted, GPUs
    python experiments/dpo_vlm_rlaif_v.py --tiny   # offline: a tiny random Llava and generated colour images

max_length=None, as the TRL doc advises for VLMs: truncation could cut image tokens.
"""

import tempfile

from common import parser, tiny_defaults, train_and_save, workers

from raydpo import DPOConfig


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    if args.tiny:
        from raydpo.models import build_tiny_vlm
        from raydpo.tasks import colour_pairs

        model = build_tiny_vlm(tempfile.mkdtemp(prefix="raydpo-tiny-vlm-"),
                               ["what colour is this image ? it is red green blue"])
        dataset = colour_pairs(32)
        config = DPOConfig(output_dir=args.output_dir or "outputs/vlm-tiny",
                           **tiny_defaults(args, max_length=None, per_device_train_batch_size=4, learning_rate=1e-3))
    else:
        from datasets import load_dataset

        model = "Qwen/Qwen2.5-VL-3B-Instruct"
        dataset = load_dataset("HuggingFaceH4/rlaif-v_formatted", split="train")
        config = DPOConfig(output_dir=args.output_dir or "outputs/Qwen2.5-VL-3B-DPO", num_workers=workers(args, 8),
                           use_gpu=True, max_steps=args.max_steps or -1, num_train_epochs=1, learning_rate=5e-7,
                           max_length=None, per_device_train_batch_size=2, gradient_accumulation_steps=8,
                           gradient_checkpointing=True, zero_stage=3, model_init_kwargs={"dtype": "bfloat16"},
                           deepspeed={"bf16": {"enabled": True}})
    return train_and_save(model, config, dataset)


if __name__ == "__main__":
    main()
