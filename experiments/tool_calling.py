"""Tool-calling DPO: the chosen answer calls the tool correctly, the rejected one with wrong arguments.

Preference rows are derived from an SFT tool-calling file (OpenAI `messages` + `tools`): the last
assistant turn is chosen; the same turn with corrupted arguments is rejected. The `tools` column
reaches the chat template, and `tool_calls` stay in the messages.

    python experiments/tool_calling.py --data calls.jsonl   # Qwen3-0.6B, GPU cluster
    python experiments/tool_calling.py --tiny               # offline: tiny model, ../shared/data stock calls
"""

import json

from common import parser, read_rows, shared_file, tiny_defaults, tiny_model, train_and_save, workers

from raydpo import DPOConfig


def to_preference(row: dict) -> dict:
    *prompt, answer = row["messages"]
    wrong = {**answer, "tool_calls": [
        {**call, "function": {**call["function"], "arguments": json.dumps({"symbol": "UNKNOWN"})}}
        for call in answer.get("tool_calls", [])]}
    return {"prompt": prompt, "chosen": [answer], "rejected": [wrong], "tools": row["tools"]}


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--data", help="SFT tool-calling .jsonl with messages and tools")
    args = p.parse_args(argv)
    path = args.data or shared_file("microsoft-foundry_fine-tuning", "stock_toolcall_validation.jsonl")
    rows = [to_preference(r) for r in read_rows(path, 10_000) if r["messages"][-1].get("tool_calls")]
    if args.tiny:
        model = tiny_model(rows)
        config = DPOConfig(output_dir=args.output_dir or "outputs/tool-calling-tiny", **tiny_defaults(args))
    else:
        model = "Qwen/Qwen3-0.6B"
        config = DPOConfig(output_dir=args.output_dir or "outputs/Qwen3-0.6B-tools", num_workers=workers(args, 2),
                           use_gpu=True, max_steps=args.max_steps or -1, num_train_epochs=3, learning_rate=1e-6,
                           model_init_kwargs={"dtype": "bfloat16"}, deepspeed={"bf16": {"enabled": True}})
    return train_and_save(model, config, rows)


if __name__ == "__main__":
    main()
