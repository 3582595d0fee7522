"""`raydpo train` with `trl dpo`'s configs and flags, and TRL's own DPO script run on raydpo.

TRL (installed for tests only) is the oracle: its argument classes parse the same command lines, and
every field they have is either accepted by `raydpo train` or refused by name.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml

from raydpo.cli import main as cli

HERE = os.path.dirname(os.path.abspath(__file__))

# A `trl dpo --config` file as TRL's docs write one (model, data and sizes swapped for the tiny test
# ones); the tests add only Ray fields to it.
TRL_CONFIG = """\
model_name_or_path: {model}
dataset_name: {data}
learning_rate: 5.0e-7
num_train_epochs: 1
max_steps: 2
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
beta: 0.1
max_length: 64
eval_strategy: steps
eval_steps: 2
output_dir: {out}
logging_steps: 1
gradient_checkpointing: true
use_peft: true
lora_r: 8
lora_alpha: 16
lora_target_modules: all-linear
report_to: none
remove_unused_columns: false
"""


def trl_config(tmp_path, model="/models/m", data="/data/d", extra=None):
    text = TRL_CONFIG.format(model=model, data=data, out=tmp_path / "out")
    path = tmp_path / "trl.yaml"
    path.write_text(text + (yaml.safe_dump(extra) if extra else ""))
    return str(path)


def split_folder(tmp_path, rows, n_train=16, n_test=4):
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:n_train + n_test]))
    return str(folder)


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_every_trl_field_is_accepted_or_refused_by_name():
    """TRL's ScriptArguments, ModelConfig and DPOConfig fields (and its dataset-mixture keys): each is a
    `raydpo train` flag, or refused with a reason that is not 'unknown key'."""
    import trl
    from transformers import TrainingArguments

    from raydpo.config import DPOConfig
    from raydpo.script_args import TRL_ONLY_UNSUPPORTED, build_parser, refusal

    accepted = {action.dest for action in build_parser()._actions}
    trl_fields = set()
    for cls in (trl.ScriptArguments, trl.ModelConfig, trl.DPOConfig, trl.DatasetMixtureConfig):
        trl_fields |= {f.name for f in dataclasses.fields(cls)}
    refused = sorted(trl_fields - accepted)
    assert "fsdp" in refused and "bf16" not in refused and "model_name_or_path" not in refused and "use_peft" not in refused
    for line in refusal(refused).removeprefix("not supported: ").split("; "):
        assert "unknown key" not in line, line
    # the static list of TRL-only fields raydpo lacks is exactly what the installed TRL has
    raydpo_fields = {f.name for f in dataclasses.fields(DPOConfig)}
    training_args = {f.name for f in dataclasses.fields(TrainingArguments)}
    trl_only = {f.name for f in dataclasses.fields(trl.DPOConfig)} - training_args - raydpo_fields
    assert trl_only == set(TRL_ONLY_UNSUPPORTED)


def test_flags_parse_as_trl_parses_them(tmp_path):
    """The same config file and command line through TRL's TrlParser (TRL's classes) and through
    `raydpo train`'s parser give the same values for every field both have, and the same LoRA config."""
    import trl

    from raydpo.config import DPOConfig
    from raydpo.script_args import parse_train_args

    path = trl_config(tmp_path, data=str(tmp_path / "pairs.jsonl"))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    flags = ["--config", path, "--learning_rate", "1e-6", "--lr_scheduler_type", "cosine_with_min_lr",
             "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}', "--warmup_steps", "0.1", "--loss_type", "sigmoid",
             "bco_pair", "--loss_weights", "0.8", "0.2", "--lora_target_modules", "q_proj", "v_proj",
             "--lora_dropout", "0.1", "--dtype", "float32", "--attn_implementation", "eager", "--seed", "7",
             "--trust_remote_code", "--eval_strategy", "no"]
    script, config, model_args = trl.TrlParser((trl.ScriptArguments, trl.DPOConfig, trl.ModelConfig)) \
        .parse_args_and_config(flags + ["--use_cpu", "true"])
    job = parse_train_args(flags + ["--num_workers", "2", "--zero_stage", "2"])
    ours = job.config
    assert (ours.num_workers, ours.zero_stage) == (2, 2)
    assert job.model == model_args.model_name_or_path and job.train_dataset == script.dataset_name
    shared = {f.name for f in dataclasses.fields(DPOConfig)} & {f.name for f in dataclasses.fields(trl.DPOConfig)}
    # bf16: TRL's None means True even on CPU; raydpo's None is resolved per worker (True on a bf16 GPU,
    # False on CPU workers: precision.resolve), and an explicit value is TRL's
    assert ours.bf16 is None and config.bf16 is True
    assert parse_train_args(flags + ["--bf16", "true", "--fp16", "false"]).config.bf16 is True
    # gradient_checkpointing likewise (TRL_CONFIG sets it: True on both sides); unset, raydpo's None
    assert ours.gradient_checkpointing is True is config.gradient_checkpointing
    for name in sorted(shared - {"model_init_kwargs", "report_to", "loss_type", "output_dir", "bf16"}):
        theirs = getattr(config, name)
        theirs = getattr(theirs, "value", theirs)  # transformers' enums (eval_strategy, optim, ...)
        assert getattr(ours, name) == theirs, name
    assert ours.loss_type == config.loss_type == ["sigmoid", "bco_pair"]
    assert ours.report_to == "none" and config.report_to == [] and ours.output_dir == config.output_dir
    assert ours.remove_unused_columns is False
    # model_init_kwargs as TRL's dpo.py builds them (the default revision left out)
    assert ours.model_init_kwargs == {"dtype": "float32", "attn_implementation": "eager"}
    lora, theirs = job.peft_config, trl.get_peft_config(model_args)
    for name in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type", "use_rslora", "use_dora"):
        assert getattr(lora, name) == getattr(theirs, name), name


@pytest.mark.parametrize("extra, flags, named", [
    ({"datasets": [{"path": "x"}]}, [], "datasets"),
    ({}, ["--load_in_4bit"], "load_in_4bit"),
    ({}, ["--dataset_streaming"], "dataset_streaming"),
    ({"betta": 0.1}, [], "betta"),
    ({}, ["--dtype", "int8"], "dtype"),
    ({"model": "/models/other"}, [], "model_name_or_path"),
])
def test_unsupported_fields_are_refused_by_name(tmp_path, capsys, extra, flags, named):
    path = trl_config(tmp_path, extra=extra)
    try:
        code = cli(["train", "--config", path] + flags)
    except SystemExit as error:  # argparse's own refusal of a bad choice
        code = error.code
    assert code == 2
    assert named in capsys.readouterr().err


def test_dataset_name_local(tmp_path, datasets_cache, parity_rows):
    """dataset_name: a folder of split files (datasets.load_dataset, offline), a single file (the train split)."""
    from raydpo.script_args import ScriptArguments, load_splits

    folder = split_folder(tmp_path, parity_rows)
    train, test = load_splits(ScriptArguments(dataset_name=folder), evaluate=True)
    assert (len(train), len(test)) == (16, 4) and train[0] == parity_rows[0]
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_splits(ScriptArguments(dataset_name=folder, dataset_test_split="validation"), evaluate=True)
    one = os.path.join(folder, "train.jsonl")
    assert load_splits(ScriptArguments(dataset_name=one), evaluate=False) == (one, None)
    with pytest.raises(ValueError, match="train split only"):
        load_splits(ScriptArguments(dataset_name=one), evaluate=True)


def test_trl_config_trains(ray_session, tiny_model, parity_rows, tmp_path, datasets_cache, capsys):
    """A TRL-style config with LoRA, a local split folder as dataset_name and evaluation on its test
    split, plus Ray fields only: two steps, then the adapter is saved to output_dir."""
    path = trl_config(tmp_path, model=tiny_model, data=split_folder(tmp_path, parity_rows),
                      extra={"num_workers": 0, "zero_stage": 0})  # local mode: in this process
    assert cli(["train", "--config", path, "--beta", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "done: 2 steps" in out and "eval_loss" in out
    assert os.path.isfile(tmp_path / "out" / "adapter_config.json")


def test_trl_dpo_script_runs_on_raydpo(ray_session, tiny_model, parity_rows, tmp_path):
    """TRL's dpo.py with DPOConfig and DPOTrainer imported from raydpo, run as a script: TRL's parser,
    load_dataset on a local folder (offline), get_peft_config, train, save_model, accelerator.print, end."""
    folder = split_folder(tmp_path, parity_rows)
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf_cache"),
               PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(HERE), os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, os.path.join(HERE, "fixtures", "trl_dpo_script.py"),
               "--model_name_or_path", tiny_model, "--dataset_name", folder, "--output_dir", str(tmp_path / "out"),
               "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "5.0e-7",
               "--logging_steps", "1", "--report_to", "none", "--max_length", "64", "--no_remove_unused_columns",
               "--use_peft", "--lora_r", "8", "--lora_target_modules", "all-linear", "--num_workers", "0"]  # local mode: in the script's process
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Training completed." in result.stdout and f"Model saved to {tmp_path / 'out'}." in result.stdout
    assert os.path.isfile(tmp_path / "out" / "adapter_config.json")


def test_local_datasets_dataset_is_read_without_the_hub(ray_session, tmp_path, datasets_cache, parity_rows, monkeypatch):
    """A datasets.Dataset loaded from a local folder is named after the folder ("pairs"):
    ray.data.from_huggingface would ask the Hub for a dataset of that name. raydpo reads its own rows,
    selections applied, with no request."""
    import requests

    from raydpo.data.sources import JSON_COLUMN, to_ray_dataset
    from raydpo.script_args import ScriptArguments, load_splits

    def no_network(*args, **kwargs):
        raise AssertionError("a request to the Hub")

    train, _ = load_splits(ScriptArguments(dataset_name=split_folder(tmp_path, parity_rows)), evaluate=False)
    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(requests, "head", no_network)
    rows = to_ray_dataset(train.select([5, 2, 9])).take_all()
    assert [{k: v for k, v in row.items() if k != JSON_COLUMN} for row in rows] == [parity_rows[i] for i in (5, 2, 9)]
