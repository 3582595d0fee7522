"""raydpo: Ray-native DPO training with a TRL-shaped API."""

__all__ = ["DPOConfig", "DPOTrainer", "TrainOutput"]
__version__ = "0.1.0"

# Imported on first use: Ray's helper processes (the metrics actor, the dataset shard manager, Ray
# Data's tasks) import raydpo submodules, and a package import pulling in torch and the trainer would
# cost each of them ~3 s of CPU.
_EXPORTS = {"DPOConfig": "raydpo.config", "DPOTrainer": "raydpo.train.trainer", "TrainOutput": "raydpo.train.trainer"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'raydpo' has no attribute {name!r}")
