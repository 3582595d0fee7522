"""Data: read preference rows, tokenize them with Ray Data, and batch them for the workers."""

from raydpo.data.sources import to_ray_dataset
from raydpo.data.tokenize import TokenizedData, tokenize_dataset

__all__ = ["to_ray_dataset", "tokenize_dataset", "TokenizedData"]
