"""The `raydpo` command: thin entry points over the Python API.

    raydpo train [CONFIG.yaml | --config CONFIG.yaml] [--set key=value ...] [--FIELD VALUE ...]
    raydpo sweep CONFIG.yaml [--set key=value ...]
    raydpo report RESULTS_DIR [--metric loss --mode min]
    raydpo data DATA --model MODEL [--max-length 1024 --truncation-mode keep_start]
    raydpo push FOLDER REPO_ID [--private] [--base-model MODEL] [--config CONFIG.yaml]

A config is one flat YAML mapping: DPOConfig fields plus `model`, `ref_model`, `train_dataset`,
`eval_dataset` (and, for sweeps, `search_space`, `scheduler`, `metric`, `mode`, `num_samples`,
`max_concurrent_trials`, `name`). Unknown keys and bad values exit with status 2 naming the key.
`raydpo train` also takes `trl dpo`'s configs and flags (TRL's ScriptArguments, DPOConfig and
ModelConfig: `model_name_or_path`, `dataset_name`, `use_peft`, ...): see raydpo/script_args.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from raydpo.config import DPOConfig
from raydpo.script_args import ConfigError, read_config

RUN_KEYS = {"model", "ref_model", "train_dataset", "eval_dataset"}
SWEEP_KEYS = {"search_space", "scheduler", "metric", "mode", "num_samples", "max_concurrent_trials", "name"}


def load_config(path: str, overrides: list, extra_keys: set) -> tuple:
    """(DPOConfig, the run/sweep keys) from a YAML file and `--set key=value` overrides."""
    values = read_config(path, overrides)
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    unknown = sorted(set(values) - fields - RUN_KEYS - extra_keys)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    for key in ("model", "train_dataset"):
        if key not in values:
            raise ConfigError(f"missing required key {key!r}")
    config = DPOConfig(**{k: v for k, v in values.items() if k in fields})
    return config, {k: v for k, v in values.items() if k not in fields}


def train(args) -> int:
    from raydpo import DPOTrainer
    from raydpo.script_args import parse_train_args

    job = parse_train_args(args.argv)
    config = job.config
    trainer = DPOTrainer(job.model, ref_model=job.ref_model, args=config, train_dataset=job.train_dataset,
                         eval_dataset=job.eval_dataset, peft_config=job.peft_config)
    if job.dataset_name:  # TRL's dataset_name names the training data on the model card, as in TRL's script
        trainer.train_dataset_description = job.dataset_name
    output = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    saved = trainer.save_model()
    if config.push_to_hub:  # train() pushed (at the end, and with hub_strategy="every_save" at each save)
        print(f"[raydpo] pushed the model to the Hub as {trainer.hub_model_id}")
    final = ", ".join(f"{name} {output.metrics[name]:.4f}" for name in ("loss", "eval_loss", "eval_rewards/accuracies")
                      if name in output.metrics)
    print(f"[raydpo] done: {output.metrics.get('global_step')} steps, {final}; "
          f"checkpoint {output.checkpoint}; model saved to {saved}")
    return 0


def sweep(args) -> int:
    from raydpo.tune import sweep as run_sweep

    config, run = load_config(args.config, args.set, SWEEP_KEYS)
    if "search_space" not in run:
        raise ConfigError("missing required key 'search_space'")
    result = run_sweep(run.pop("model"), run.pop("train_dataset"), run.pop("search_space"), args=config, **run)
    print(f"[raydpo] sweep results in {result.results_dir}: {result.csv_path}, {result.plot_path}; "
          f"best config {result.best_config}; best model {result.best_model_dir}")
    return 0


def report(args) -> int:
    from raydpo.tune.report import write_report

    write_report(args.results_dir, args.metric, args.mode)
    return 0


def data(args) -> int:
    from raydpo import cluster
    from raydpo.data.tokenize import summarize_dataset
    from raydpo.train.trainer import load_tokenizer

    cluster.connect()
    print(summarize_dataset(args.data, load_tokenizer(args.model), args.max_length, args.truncation_mode))
    return 0


def push(args) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from raydpo.hub import describe_dataset, folder_model_card, push_to_hub

    if not os.path.isdir(args.folder):
        raise FileNotFoundError(f"no model folder at {args.folder!r}")
    config, run = load_config(args.config, [], set()) if args.config else (None, {})
    card = folder_model_card(args.folder, base_model=args.base_model or run.get("model"), dpo_config=config,
                             training_data=describe_dataset(run["train_dataset"]) if run else None)
    # --private makes the repo private; without it the Hub's default (or the existing repo's setting) holds
    try:
        url = push_to_hub(args.folder, args.repo_id, model_card=card, private=True if args.private else None)
    except HfHubHTTPError as error:  # no token, no write access, ...: the Hub's own message says which
        print(f"raydpo push: upload failed: {error}", file=sys.stderr)
        return 1
    print(f"[raydpo] pushed {args.folder} to {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydpo", description="Ray-native DPO training and sweeps")
    commands = parser.add_subparsers(dest="command", required=True)
    # train's arguments (TRL's flags too) are parsed by raydpo.script_args: `raydpo train -h` lists them
    sub = commands.add_parser("train", add_help=False, help="train one DPO run from a YAML config (raydpo's or "
                                                            "`trl dpo`'s) and TRL-style --field value flags")
    sub.set_defaults(handler=train)
    sub = commands.add_parser("sweep", help="run a Ray Tune sweep from a YAML config")
    sub.add_argument("config")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config key (YAML value), repeatable")
    sub.set_defaults(handler=sweep)
    sub = commands.add_parser("report", help="print the table and redraw the plot of a finished sweep")
    sub.add_argument("results_dir")
    sub.add_argument("--metric", default="loss")
    sub.add_argument("--mode", default="min", choices=["min", "max"])
    sub.set_defaults(handler=report)
    sub = commands.add_parser("data", help="summarize a preference dataset: rows, format, token lengths, "
                                           "truncated and skipped rows")
    sub.add_argument("data", help="a .jsonl/.json/.parquet file (or .gz), or a folder of them")
    sub.add_argument("--model", required=True, help="the model (or tokenizer) path whose tokenizer to use")
    sub.add_argument("--max-length", type=int, default=1024)
    sub.add_argument("--truncation-mode", default="keep_start", choices=["keep_start", "keep_end"])
    sub.set_defaults(handler=data)
    sub = commands.add_parser("push", help="upload a saved model or adapter folder to the Hugging Face Hub "
                                           "with a model card (HF_ENDPOINT and HF_TOKEN are honoured)")
    sub.add_argument("folder", help="a folder written by `raydpo train` or DPOTrainer.save_model")
    sub.add_argument("repo_id", help="the Hub repo, e.g. user/my-dpo-model (created if missing)")
    sub.add_argument("--private", action="store_true", help="create the repo as private")
    sub.add_argument("--base-model", help="the model training started from, for the card (default: what the "
                                          "folder records, if anything)")
    sub.add_argument("--config", help="the YAML config the folder was trained with: the card then states its "
                                      "DPO settings, training data and model")
    sub.set_defaults(handler=push)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["train"]:  # everything after `train` is train's own (TRL-style flags included)
        args = parser.parse_args(argv[:1])
        args.argv = argv[1:]
    else:
        args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"raydpo {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
