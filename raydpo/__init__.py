"""raydpo: Ray-native DPO training with a TRL-shaped API."""

from raydpo.config import DPOConfig
from raydpo.train.trainer import DPOTrainer, TrainOutput

__all__ = ["DPOConfig", "DPOTrainer", "TrainOutput"]
__version__ = "0.1.0"
