"""Sweeps: many DPO runs with different DPOConfig fields, early stopping by Ray Tune."""

from raydpo.tune.sweep import SweepResult, search_space_from_dict, sweep

__all__ = ["sweep", "SweepResult", "search_space_from_dict"]
