"""Model objects as `DPOTrainer(model=..., ref_model=...)`: a `transformers.PreTrainedModel` or a
`peft.PeftModel` is saved once with `save_pretrained` into a folder, and the workers get that folder.

Every code path that takes a path (load_model, adapter folders, the reference modes, the reference
actors) then works unchanged, and the driver keeps no copy of its own: the trainer holds the path.
A PeftModel is saved as the adapter folder `PeftModel.save_pretrained` writes, whose base is the
adapter's `base_model_name_or_path`, so it continues that adapter exactly as its saved folder would.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

from raydpo.model_loading import ADAPTER_CONFIG, is_peft_model

OBJECTS_DIR = "raydpo-model-objects"  # under the run's storage_path (a local one)


def is_model_object(value) -> bool:
    from transformers import PreTrainedModel

    return isinstance(value, PreTrainedModel) or is_peft_model(value)


def model_name(model) -> Optional[str]:
    """What the object was loaded from (a hub id or a path): a PeftModel's base, else config._name_or_path.
    It names the tokenizer to load and the base model of the model card."""
    if is_peft_model(model):
        return model.peft_config[model.active_adapter].base_model_name_or_path or None
    return getattr(model.config, "_name_or_path", None) or None


def objects_folder(storage_path: str) -> str:
    """A fresh folder for this trainer's model objects: under a local storage_path (shared storage on a
    cluster, as checkpoints need), else (a URI) in the local temp dir, which only a one-node run can read."""
    if "://" in storage_path:
        return tempfile.mkdtemp(prefix="raydpo-model-objects-")
    parent = os.path.join(os.path.abspath(storage_path), OBJECTS_DIR)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent)


def save_model_object(model, directory: str, role: str) -> str:
    """Save `model` (the `role` argument, "model" or "ref_model") once and return the folder to load.

    A PreTrainedModel: a transformers folder, in the dtype the object has (raydpo loads it as float32,
    as it loads any path). A PeftModel: its active adapter's folder, with the base recorded as an
    absolute path when it is a local folder (the workers' working directory may differ)."""
    if is_peft_model(model):
        if role == "ref_model":
            raise TypeError("ref_model is a peft.PeftModel: pass a plain model (e.g. its merge_and_unload()) or "
                            "ref_model=None, whose reference for a continued adapter is a frozen copy of that adapter")
        adapter = model.active_adapter
        base = model.peft_config[adapter].base_model_name_or_path
        if not base:
            raise ValueError("model is a peft.PeftModel whose adapter config names no base_model_name_or_path: "
                             "save its base model and load it from that folder before wrapping it")
        model.save_pretrained(directory, selected_adapters=[adapter])
        folder = directory if adapter == "default" else os.path.join(directory, adapter)  # peft's layout
        if os.path.isdir(base):
            config_path = os.path.join(folder, ADAPTER_CONFIG)
            with open(config_path) as f:
                config = json.load(f)
            config["base_model_name_or_path"] = os.path.abspath(base)
            with open(config_path, "w") as f:
                json.dump(config, f, indent=2)
        return folder
    model.save_pretrained(directory)
    return directory
