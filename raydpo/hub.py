"""Upload a trained model folder to the Hugging Face Hub, with a model card (README.md).

The folder is a plain transformers folder or a PEFT adapter folder (it has adapter_config.json), as
`DPOTrainer.save_model` and `raydpo train` write them. The card is added to the commit, never written
into the folder, so the folder on disk stays as training left it.

`model_card` is a dict with these keys (all optional; a missing one is stated as not recorded):
  base_model     the model DPO started from (a hub id or a local path)
  training_data  a description of the training set (a path as given, "list of 240 rows", ...)
  dpo_config     a DPOConfig (the card lists beta, loss_type and every non-default field) or a dict
  metrics        the final logged metrics (TrainOutput.metrics)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

from huggingface_hub import CommitOperationAdd, HfApi, ModelCardData

from raydpo.config import DPOConfig
from raydpo.model_loading import ADAPTER_CONFIG, is_adapter_dir

CARD_KEYS = ("base_model", "training_data", "dpo_config", "metrics")
# Where a run wrote its files and which cluster it used: local paths and addresses that say nothing
# about the model and should not end up in a (possibly public) card; and where it uploads to, with a secret.
RUN_LOCATION_FIELDS = ("output_dir", "run_name", "storage_path", "ray_address", "dataset_cache_dir",
                       "precompute_ref_cache_dir", "resume_from_checkpoint",
                       "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo")
ALWAYS_SHOWN_FIELDS = ("beta", "loss_type")
HUB_MODEL_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def push_to_hub(folder: str, repo_id: str, *, model_card: dict, token: Optional[str] = None,
                private: Optional[bool] = None, commit_message: str = "Upload DPO model trained with raydpo") -> str:
    """Create `repo_id` if needed and upload `folder` plus a generated README.md in one commit.

    Returns the repo URL. private=None keeps the Hub's default (or the existing repo's visibility)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no model folder at {folder!r}")
    readme = render_model_card(model_card, repo_id, adapter=is_adapter_dir(folder))
    api = HfApi()  # no endpoint argument: huggingface_hub then honours HF_ENDPOINT
    repo = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=path) for name, path in _folder_files(folder)]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode()))
    # repo.repo_id has the namespace the Hub resolved (a bare "name" goes to the token's user)
    api.create_commit(repo.repo_id, operations, commit_message=commit_message, token=token)
    return str(repo)


def _folder_files(folder: str) -> list:
    """(path in the repo, local path) of each file to upload: hidden entries (.git, .cache) are left out,
    and so is a README.md of the folder's own, which the generated card replaces."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = os.path.join(root, name)
            in_repo = os.path.relpath(path, folder).replace(os.sep, "/")
            if not name.startswith(".") and in_repo != "README.md":
                files.append((in_repo, path))
    return files


def describe_dataset(source) -> str:
    """A short description of a train_dataset for the card: a path as given, else its type and size."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    kind = "list" if isinstance(source, list) else f"{type(source).__module__}.{type(source).__qualname__}"
    try:
        return f"{kind} of {len(source)} rows"
    except (TypeError, AttributeError):  # a Ray Dataset has no cheap length
        return kind


def dpo_settings(config: DPOConfig) -> dict:
    """beta, loss_type and every other field that differs from DPOConfig's default, in field order."""
    settings = {name: getattr(config, name) for name in ALWAYS_SHOWN_FIELDS}
    for spec in dataclasses.fields(DPOConfig):
        value = getattr(config, spec.name)
        default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
        if spec.name not in settings and spec.name not in RUN_LOCATION_FIELDS and value != default:
            settings[spec.name] = value
    return settings


def folder_model_card(folder: str, base_model: Optional[str] = None, dpo_config=None,
                      training_data: Optional[str] = None) -> dict:
    """The card of a saved folder when the training run is not at hand (`raydpo push`): the base model
    is `base_model`, else what the folder records (an adapter's base, or config.json's _name_or_path)."""
    return {"base_model": base_model or recorded_base_model(folder), "training_data": training_data,
            "dpo_config": dpo_config, "metrics": None}


def recorded_base_model(folder: str) -> Optional[str]:
    adapter = is_adapter_dir(folder)
    name, key = (ADAPTER_CONFIG, "base_model_name_or_path") if adapter else ("config.json", "_name_or_path")
    try:
        with open(os.path.join(folder, name)) as f:
            return json.load(f).get(key) or None
    except (OSError, ValueError):
        return None


def render_model_card(card: dict, repo_id: str, adapter: bool = False) -> str:
    """README.md: YAML front matter (library_name, tags, base_model) and the training facts."""
    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise ValueError(f"model_card: unknown key(s) {unknown}; expected some of {list(CARD_KEYS)}")
    base_model = card.get("base_model")
    metadata = ModelCardData(library_name="peft" if adapter else "transformers", tags=["dpo", "raydpo"],
                             base_model=_hub_model_id(base_model))
    sections = [f"---\n{metadata.to_yaml()}\n---", f"# {repo_id.split('/')[-1]}",
                f"This {'PEFT adapter' if adapter else 'model'} was trained with Direct Preference Optimization "
                "(DPO) using raydpo, Ray-native DPO training with TRL's recipe and config names.",
                "## Base model", f"`{base_model}`" if base_model else _NOT_RECORDED.format("base model"),
                "## Training data", card.get("training_data") or _NOT_RECORDED.format("training data"),
                "## DPO configuration", _settings_table(card.get("dpo_config")),
                "## Final metrics", _metrics_table(card.get("metrics")),
                "## Usage", _usage(repo_id, base_model, adapter)]
    return "\n\n".join(sections) + "\n"


_NOT_RECORDED = "Not recorded: this upload did not know the {}."


def _hub_model_id(name: Optional[str]) -> Optional[str]:
    """`name` when it can be a Hub model id; the Hub rejects a card whose base_model is a local path."""
    if name and HUB_MODEL_ID.fullmatch(name) and not os.path.exists(name):
        return name
    return None


def _settings_table(config) -> str:
    if config is None:
        return _NOT_RECORDED.format("DPO configuration")
    settings = dpo_settings(config) if isinstance(config, DPOConfig) else dict(config)
    note = ("beta, loss_type and the settings that differ from raydpo's defaults (TRL 1.16's DPOConfig "
            "names and defaults).\n\n" if isinstance(config, DPOConfig) else "")
    return note + _table(("setting", "value"), settings)


def _metrics_table(metrics: Optional[dict]) -> str:
    if not metrics:
        return _NOT_RECORDED.format("final metrics")
    return "The last logged metrics of the run.\n\n" + _table(("metric", "value"), metrics)


def _table(header: tuple, values: dict) -> str:
    rows = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    rows += [f"| {_cell(name)} | {_cell(value)} |" for name, value in values.items()]
    return "\n".join(rows)


def _cell(value) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _usage(repo_id: str, base_model: Optional[str], adapter: bool) -> str:
    if adapter:
        code = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({(base_model or 'BASE_MODEL')!r})\n"
                f"model = PeftModel.from_pretrained(base, {repo_id!r})")
    else:
        code = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({repo_id!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({repo_id!r})")
    return f"```python\n{code}\n```"
