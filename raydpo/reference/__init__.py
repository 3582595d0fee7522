"""Reference log-probs. Every implementation answers one question: `logps(batch) -> [2B]` summed
completion log-probs of the frozen reference, chosen rows first. The training loop does not know which."""

from raydpo.reference.in_worker import InWorkerReference

__all__ = ["InWorkerReference"]
