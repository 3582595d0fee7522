"""Ray Train's torch process-group setup, with torch kept out of the start of Ray Train's controller.

Each run starts a new controller process, and the first thing it does is unpickle the trainer's
backend config. Ray's `TorchConfig` lives in a module that imports torch: 1.3 s of CPU on an idle
2-core machine, 3-5 s on a busy one, all of it before the controller asks for a single worker
(bench/startup.py, "worker group"). `TorchBackendConfig` carries the same three settings from a module
without torch. Its backend imports Ray's own `_TorchBackend` when the controller first calls it, once
the worker processes are already up, and hands every call to it: the process group is set up, started
and shut down exactly as `TorchTrainer`'s default does it. Meanwhile the workers import torch and the
training loop's modules, which they would otherwise import only after that setup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import ray
from ray.train.backend import Backend, BackendConfig


@dataclass
class TorchBackendConfig(BackendConfig):
    """`ray.train.torch.TorchConfig`'s fields and meaning (TorchTrainer's `torch_config`)."""

    backend: Optional[str] = None  # None: TorchTrainer picks nccl with GPUs, else gloo
    init_method: str = "env"
    timeout_s: int = 1800

    def torch_config(self):
        """Ray's TorchConfig with these settings (imports torch)."""
        from ray.train.torch.config import TorchConfig

        return TorchConfig(backend=self.backend, init_method=self.init_method, timeout_s=self.timeout_s)

    @property
    def backend_cls(self):
        return _DeferredTorchBackend

    @property
    def train_func_context(self):  # read on the driver, where torch is imported anyway
        return self.torch_config().train_func_context

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}


class _DeferredTorchBackend(Backend):
    """Ray's `_TorchBackend`, imported at its first call (tests/test_startup.py checks that every method
    Ray's backend defines is handed on)."""

    share_cuda_visible_devices: bool = True  # as _TorchBackend

    @staticmethod
    def _torch_backend():
        from ray.train.torch.config import _TorchBackend

        return _TorchBackend()

    def on_start(self, worker_group, backend_config: TorchBackendConfig):
        # The workers, idle until now, import what they are about to need while this process imports
        # torch for Ray's backend: the two imports overlap instead of running one after the other. An
        # actor runs its tasks in order, so Ray's setup calls below run on the workers after these.
        imported = worker_group.execute_async(_import_worker_modules)
        self._torch_backend().on_start(worker_group, backend_config.torch_config())
        ray.get(imported)  # done by now; raises the import's own error, if any

    def on_training_start(self, worker_group, backend_config: TorchBackendConfig):
        self._torch_backend().on_training_start(worker_group, backend_config.torch_config())

    def on_shutdown(self, worker_group, backend_config: TorchBackendConfig):
        self._torch_backend().on_shutdown(worker_group, backend_config.torch_config())


def _import_worker_modules():
    """On each worker: the modules of Ray's process-group setup (torch, torch.distributed) and of the
    training loop, which the worker would import next anyway."""
    import ray.train.torch.config  # noqa: F401

    import raydpo.train.loop  # noqa: F401
