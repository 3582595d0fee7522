"""What the experiment scripts share: their command line, and the offline `--tiny` set-up.

With `--tiny` a script swaps the hub model for a tiny random model built here (with a tokenizer
trained on the rows) and the hub dataset for a file in ../shared/data, so it runs on a laptop with
no internet; without it, the script runs as written on a cluster that can reach the hub.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO, "..", "shared", "data")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="offline: a tiny random model and ../shared/data")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--num-workers", type=int, default=None,
                   help="Ray Train workers (default: 1 tiny, 8 full); 0 runs in this process (local mode)")
    p.add_argument("--max-steps", type=int, default=None, help="cap the run (default: 3 tiny, full epochs)")
    return p


def shared_file(*parts: str) -> str:
    path = os.path.normpath(os.path.join(SHARED_DATA, *parts))
    if not os.path.exists(path):
        raise FileNotFoundError(f"--tiny needs {path} (the repository's ../shared/data)")
    return path


def read_rows(path: str, limit: int) -> list:
    """The first `limit` rows of a .jsonl(.gz) or JSON-array file."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        if path.endswith(".json"):
            return json.load(f)[:limit]
        return [json.loads(line) for line, _ in zip(f, range(limit))]


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def tiny_model(rows: list, directory: str = None) -> str:
    """A tiny random Llama whose word-level tokenizer covers every string in `rows`."""
    from raydpo.models import build_tiny_model

    directory = directory or tempfile.mkdtemp(prefix="raydpo-tiny-")
    return build_tiny_model(directory, [text for row in rows for text in _strings(row)])


def workers(args, default: int) -> int:
    """--num-workers as given (0 too: local mode), else `default`."""
    return args.num_workers if args.num_workers is not None else default


def tiny_defaults(args, **config):
    """DPOConfig values for a short offline run."""
    values = {"num_workers": workers(args, 1), "max_steps": args.max_steps or 3, "logging_steps": 1,
              "per_device_train_batch_size": 2, "max_length": 256, "learning_rate": 1e-4,
              "skip_bad_rows": True}  # real rows: a few prompts fill max_length
    values.update(config)
    return values


def train_and_save(model: str, config, dataset, peft_config=None):
    """One DPOTrainer run; the trained policy (or PEFT adapter) is saved to config.output_dir."""
    from raydpo import DPOTrainer

    trainer = DPOTrainer(model, args=config, train_dataset=dataset, peft_config=peft_config)
    output = trainer.train()
    trainer.save_model()
    return output
