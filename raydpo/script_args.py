"""`raydpo train` as `trl dpo` takes it: a YAML config (`--config`) and `--field value` flags.

The fields are those of TRL's three argument classes for its DPO script: `ScriptArguments` (the
dataset), `DPOConfig` (raydpo's, whose field names are TRL's, with the Ray fields on top) and
`ModelConfig` (the model, its dtype and LoRA). Flags are parsed by transformers' HfArgumentParser, as
TRL's TrlParser does, so `--use_peft`, `--no_remove_unused_columns` and `--lora_target_modules q_proj
v_proj` work as there. raydpo's own keys (`model`, `ref_model`, `train_dataset`, `eval_dataset`) and
`--set key=value` still work. A key raydpo does not support is refused by name; none is ignored.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

import yaml

from raydpo.config import DPOConfig

RUN_KEYS = ("model", "ref_model", "train_dataset", "eval_dataset")

# TRL 1.16 DPOConfig fields that are not transformers TrainingArguments fields and that raydpo lacks
# (tests/test_trl_cli.py checks this list against the installed TRL).
TRL_ONLY_UNSUPPORTED = ("activation_offloading", "dataset_num_proc", "pad_to_multiple_of", "pad_token")
# TRL's DatasetMixtureConfig (the `datasets:` section of a `trl dpo` config).
MIXTURE_KEYS = ("datasets", "streaming", "test_split_size")
WHY = {
    "fsdp": "raydpo shards with DeepSpeed ZeRO: use zero_stage or deepspeed",
    "ddp_backend": "raydpo's workers are Ray Train's, with DeepSpeed",
    "logging_strategy": "raydpo logs every logging_steps",
}


@dataclass
class ScriptArguments:
    """The dataset options of TRL's scripts (same names and defaults)."""

    dataset_name: Optional[str] = field(default=None, metadata={
        "help": "A Hub dataset id, a local folder that datasets.load_dataset reads (split files such as "
                "train.jsonl, test.jsonl), a folder saved with save_to_disk, or a .jsonl/.json/.parquet file "
                "(the train split)."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "load_dataset's `name`."})
    dataset_train_split: str = field(default="train", metadata={"help": "The split to train on."})
    dataset_test_split: str = field(default="test", metadata={
        "help": "The split to evaluate on, when eval_strategy is not 'no'."})
    dataset_streaming: bool = field(default=False, metadata={"help": "Not supported by raydpo (refused)."})
    ignore_bias_buffers: bool = field(default=False, metadata={
        "help": "A DDP workaround of TRL's script; not supported by raydpo (refused)."})


@dataclass
class ModelConfig:
    """The model options of TRL's scripts (same names and defaults), plus transformers 4's torch_dtype."""

    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "The model to train (a path or id)."})
    model_revision: str = field(default="main", metadata={"help": "The model revision (branch, tag or commit)."})
    dtype: Optional[str] = field(default="float32", metadata={
        "help": "The dtype the model is loaded in: auto, bfloat16, float16 or float32 (model_init_kwargs['dtype']).",
        "choices": ["auto", "bfloat16", "float16", "float32"]})
    torch_dtype: Optional[str] = field(default=None, metadata={
        "help": "transformers 4's name of dtype.", "choices": ["auto", "bfloat16", "float16", "float32"]})
    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "from_pretrained's attn_implementation, e.g. sdpa or eager."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter (peft) instead of the model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={
        "help": "LoRA dropout (with disable_dropout, the default, it is set to 0 in training, as all dropout)."})
    lora_target_modules: Optional[List[str]] = field(default=None, metadata={
        "help": "The modules LoRA adapts (one name such as all-linear is passed as that string)."})
    lora_target_parameters: Optional[List[str]] = field(default=None, metadata={"help": "LoRA target parameters."})
    lora_modules_to_save: Optional[List[str]] = field(default=None, metadata={
        "help": "Modules trained in full beside the adapter."})
    lora_task_type: str = field(default="CAUSAL_LM", metadata={"help": "Only CAUSAL_LM is supported."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilized LoRA scaling."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Not supported by raydpo (refused)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Not supported by raydpo (refused)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "Not supported by raydpo (refused)."})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Not supported by raydpo (refused)."})
    bnb_4bit_quant_storage: Optional[str] = field(default=None, metadata={"help": "Not supported by raydpo (refused)."})


@dataclass
class TrainJob:
    """What `raydpo train` runs: DPOTrainer's arguments."""

    config: DPOConfig
    model: str
    train_dataset: Any
    ref_model: Optional[str] = None
    eval_dataset: Any = None
    peft_config: Any = None
    dataset_name: Optional[str] = None


class ConfigError(ValueError):
    pass


def split_argv(argv: List[str]) -> tuple:
    """(config path or None, [--set items], the remaining flags) from `raydpo train`'s arguments: a first
    positional CONFIG.yaml (raydpo's form) or `--config CONFIG.yaml` (TRL's form), and `--set key=value`."""
    config, sets, rest = None, [], []
    items = list(argv)
    if items and not items[0].startswith("-"):
        config = items.pop(0)
    while items:
        item = items.pop(0)
        name, eq, value = item.partition("=")
        if name in ("--config", "--set"):
            if not eq:
                if not items:
                    raise ConfigError(f"{name} needs a value")
                value = items.pop(0)
            if name == "--config":
                if config is not None:
                    raise ConfigError("give one config file (as CONFIG.yaml or --config CONFIG.yaml)")
                config = value
            else:
                sets.append(value)
        else:
            rest.append(item)
    return config, sets, rest


def read_config(path: Optional[str], sets: List[str]) -> dict:
    values = {}
    if path is not None:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"cannot read config {path}: {error}") from error
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values")
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        values[key.strip()] = yaml.safe_load(raw)
    return values


def build_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser((ScriptArguments, DPOConfig, ModelConfig), prog="raydpo train",
                            description="raydpo train [CONFIG.yaml | --config CONFIG.yaml] [--set key=value ...] "
                                        "[--FIELD VALUE ...]: train one DPO run. Takes `trl dpo`'s config files and "
                                        "flags (TRL's ScriptArguments, DPOConfig and ModelConfig) plus raydpo's Ray "
                                        "fields.")


def refusal(names: List[str]) -> str:
    """Why each name is not accepted: a transformers/TRL field raydpo does not support, or unknown."""
    from transformers import TrainingArguments

    training_args = {f.name for f in dataclasses.fields(TrainingArguments)}
    lines = []
    for name in names:
        if name in MIXTURE_KEYS:
            why = "TRL's dataset mixtures (DatasetMixtureConfig) are not supported; use dataset_name"
        elif name in training_args or name in TRL_ONLY_UNSUPPORTED:
            origin = "transformers TrainingArguments" if name in training_args else "TRL DPOConfig"
            why = f"a {origin} field raydpo does not support" + (f" ({WHY[name]})" if WHY.get(name) else "")
        else:
            why = "unknown key"
        lines.append(f"{name}: {why}")
    return "not supported: " + "; ".join(lines)


def parse_train_args(argv: List[str]) -> TrainJob:
    """The run `raydpo train ARGS` describes (a ConfigError or ValueError names what is wrong)."""
    path, sets, flags = split_argv(argv)
    values = read_config(path, sets)
    env = values.pop("env", None)  # TRL's `env:` section
    if env is not None and not isinstance(env, dict):
        raise ConfigError("env: expected a mapping of environment variables to values")
    run = {key: values.pop(key) for key in RUN_KEYS if key in values}
    parser = build_parser()
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(refusal(unknown))
    parser.set_defaults(**values)  # as TrlParser: the config's values become defaults that flags override
    *parsed, rest = parser.parse_args_into_dataclasses(args=flags, return_remaining_strings=True)
    if rest:
        names = [item[2:].partition("=")[0].replace("-", "_") for item in rest if item.startswith("--")]
        raise ConfigError(refusal(names) if names else f"unexpected argument(s): {' '.join(rest)}")
    script, config, model_args = parsed
    for key, value in (env or {}).items():  # set before Ray starts: an embedded Ray's workers inherit them
        os.environ[str(key)] = str(value)
    return _job(script, config, model_args, run)


def _job(script: ScriptArguments, config: DPOConfig, model_args: ModelConfig, run: dict) -> TrainJob:
    _refuse_unsupported(script, model_args)
    if run.get("model") and model_args.model_name_or_path:
        raise ConfigError("give the model once: model or model_name_or_path")
    model = run.get("model") or model_args.model_name_or_path
    if not model:
        raise ConfigError("missing required key 'model' (TRL's model_name_or_path)")
    if run.get("train_dataset") is not None and script.dataset_name:
        raise ConfigError("give the training data once: train_dataset or dataset_name")
    init_kwargs = model_init_kwargs(model_args)
    if init_kwargs or config.model_init_kwargs:  # as TRL's script: DPOConfig.model_init_kwargs wins
        config = dataclasses.replace(config, model_init_kwargs={**init_kwargs, **(config.model_init_kwargs or {})})
    train, evaluate = run.get("train_dataset"), run.get("eval_dataset")
    if script.dataset_name:
        train, evaluate = load_splits(script, evaluate=config.eval_strategy != "no")
    elif train is None:
        raise ConfigError("missing required key 'train_dataset' (TRL's dataset_name)")
    return TrainJob(config=config, model=model, ref_model=run.get("ref_model"), train_dataset=train,
                    eval_dataset=evaluate, peft_config=peft_config(model_args), dataset_name=script.dataset_name)


def _refuse_unsupported(script: ScriptArguments, model_args: ModelConfig) -> None:
    """Fields raydpo has (for TRL's configs) but cannot honour at a non-default value."""
    refused = []
    if script.dataset_streaming:
        refused.append("dataset_streaming: raydpo reads datasets through Ray Data; load them whole")
    if script.ignore_bias_buffers:
        refused.append("ignore_bias_buffers: a DDP workaround; raydpo's workers do not use DDP")
    for name in ("load_in_8bit", "load_in_4bit", "use_bnb_nested_quant", "bnb_4bit_quant_type",
                 "bnb_4bit_quant_storage"):
        if getattr(model_args, name) != ModelConfig.__dataclass_fields__[name].default:
            refused.append(f"{name}: raydpo does not train quantized (bitsandbytes) base models")
    if model_args.lora_task_type != "CAUSAL_LM":
        refused.append(f"lora_task_type={model_args.lora_task_type!r}: raydpo trains causal LMs (CAUSAL_LM)")
    if refused:
        raise ConfigError("not supported: " + "; ".join(refused))


def model_init_kwargs(model_args: ModelConfig) -> dict:
    """from_pretrained's keyword arguments from TRL's model flags (as TRL's dpo.py builds them; the default
    revision and attention implementation are left out, as from_pretrained's own defaults)."""
    if model_args.torch_dtype and model_args.dtype not in ("float32", model_args.torch_dtype):
        raise ConfigError(f"dtype {model_args.dtype!r} and torch_dtype {model_args.torch_dtype!r} disagree; give one")
    kwargs = {"dtype": model_args.torch_dtype or model_args.dtype}
    if model_args.model_revision != "main":
        kwargs["revision"] = model_args.model_revision
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return {key: value for key, value in kwargs.items() if value is not None}


def peft_config(model_args: ModelConfig):
    """A peft LoraConfig from TRL's LoRA flags, or None without use_peft."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    if isinstance(targets, list) and len(targets) == 1:  # "all-linear" is special to peft only as a string
        targets = targets[0]
    extra = {"target_parameters": model_args.lora_target_parameters} if model_args.lora_target_parameters else {}
    return LoraConfig(task_type=model_args.lora_task_type, r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                      lora_dropout=model_args.lora_dropout, target_modules=targets, bias="none",
                      use_rslora=model_args.use_rslora, use_dora=model_args.use_dora,
                      modules_to_save=model_args.lora_modules_to_save, **extra)


def load_splits(script: ScriptArguments, evaluate: bool) -> tuple:
    """(train, eval or None) for dataset_name. A .jsonl/.json/.parquet file is the train split alone and is
    read by raydpo's own readers; a save_to_disk folder is loaded from disk; anything else (a Hub id, or a
    folder of split files) goes to datasets.load_dataset, as in TRL's script (offline for local folders)."""
    from raydpo.data.sources import data_files, is_saved_dataset

    name = script.dataset_name
    if os.path.isfile(name):
        data_files([name], "dataset_name")  # an unsupported file type is named here
        if script.dataset_train_split != "train" or evaluate:
            raise ConfigError(f"dataset_name {name!r} is one file, the train split only; for "
                              f"dataset_train_split/dataset_test_split give a folder of split files "
                              f"(train.jsonl, test.jsonl, ...) or a Hub dataset")
        return name, None
    import datasets

    if is_saved_dataset(name):
        dataset = datasets.load_from_disk(name)
    else:
        dataset = datasets.load_dataset(name, name=script.dataset_config)
    if isinstance(dataset, datasets.Dataset):
        dataset = datasets.DatasetDict({"train": dataset})
    splits = [script.dataset_train_split] + ([script.dataset_test_split] if evaluate else [])
    for split in splits:
        if split not in dataset:
            raise ConfigError(f"dataset {name!r} has no split {split!r} (it has {sorted(dataset)})")
    return dataset[script.dataset_train_split], dataset[script.dataset_test_split] if evaluate else None
