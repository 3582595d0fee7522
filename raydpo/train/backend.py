"""Ray Train's torch process-group setup, with torch kept out of Ray Train's controller.

Each run starts a new controller process. Ray's `TorchConfig` and `_TorchBackend` live in a module that
imports torch at its top: 1.3 s of CPU on an idle 2-core machine, 3-5 s on a busy one, paid by every
run's controller, which never runs a torch operation itself (bench/startup.py, "worker group").
`TorchBackendConfig` carries TorchConfig's three settings from a module without torch, and its backend
takes `_TorchBackend`'s steps in `_TorchBackend`'s order, each on the workers through Ray's own
function for it, named, so that only the workers import Ray's torch module (tests/test_startup.py
checks the calls against Ray's backend's). Process groups other than gloo and nccl (TPUs, HCCL) are
handed to Ray's `_TorchBackend` whole. Meanwhile the workers import torch and the training loop's
modules, which they would otherwise import only after that setup.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import ray
from ray._common.network_utils import build_address
from ray._private.ray_constants import env_integer
from ray.exceptions import GetTimeoutError
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S

logger = logging.getLogger(__name__)


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
        return _WorkerSideTorchBackend

    @property
    def train_func_context(self):  # read on the driver, where torch is imported anyway
        return self.torch_config().train_func_context

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}


# How Ray's _TorchBackend picks the process group's backend when TorchConfig.backend is None.
DEFAULT_BACKEND = {"GPU": "nccl", "TPU": "tpu_dist"}
WORKER_SIDE_BACKENDS = ("gloo", "nccl")  # the ones set up here; any other is Ray's _TorchBackend's whole


def _ray_torch(function: str, *args, **kwargs):
    """On a worker: Ray's process-group step `function` of ray.train.torch.config (which imports torch).
    The controller names the step; it never imports the module that holds it."""
    from ray.train.torch import config

    return getattr(config, function)(*args, **kwargs)


def _set_master(addr: str, port: int) -> None:
    """On a worker: the rendezvous address of init_method="env" (as Ray's _TorchBackend sets it)."""
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


class _WorkerSideTorchBackend(Backend):
    """Ray's `_TorchBackend` for the V2 worker group, with every torch step run on the workers."""

    share_cuda_visible_devices: bool = True  # as _TorchBackend

    @staticmethod
    def _backend(worker_group, backend_config: TorchBackendConfig) -> str:
        if backend_config.backend is not None:
            return backend_config.backend
        resources = worker_group.get_resources_per_worker()
        return next((name for kind, name in DEFAULT_BACKEND.items() if resources.get(kind, 0) > 0), "gloo")

    @staticmethod
    def _rays(backend_config: TorchBackendConfig):
        """Ray's own _TorchBackend and TorchConfig (imports torch), for the backends not set up here."""
        from ray.train.torch.config import _TorchBackend

        return _TorchBackend(), backend_config.torch_config()

    def on_start(self, worker_group, backend_config: TorchBackendConfig):
        # The workers, idle until now, import what they are about to need (torch among it) first: an
        # actor runs its tasks in order, so the setup calls below run on the workers after these.
        imported = worker_group.execute_async(_import_worker_modules)
        backend = self._backend(worker_group, backend_config)
        if backend not in WORKER_SIDE_BACKENDS:
            ray_backend, ray_config = self._rays(backend_config)
            ray_backend.on_start(worker_group, ray_config)
            ray.get(imported)
            return
        # From here on, _TorchBackend.on_start's steps, in its order (Ray 2.60's ray/train/torch/config.py).
        master_addr, master_port = worker_group.execute_single(0, get_address_and_port)
        if backend_config.init_method == "env":
            worker_group.execute(_set_master, master_addr, master_port)
            url = "env://"
        elif backend_config.init_method == "tcp":
            url = f"tcp://{build_address(master_addr, master_port)}"
        else:
            raise ValueError(f"TorchBackendConfig: init_method {backend_config.init_method!r} is not supported; "
                             "use 'env' or 'tcp' (as Ray's TorchConfig)")
        worker_group.execute(_ray_torch, "_set_torch_distributed_env_vars")
        ray.get([worker_group.execute_single_async(rank, _ray_torch, "_setup_torch_process_group", backend=backend,
                                                   world_rank=rank, world_size=len(worker_group), init_method=url,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])
        ray.get(imported)  # done by now; raises the import's own error, if any

    # on_training_start: Ray's _TorchBackend does nothing there for a V2 worker group (the base class's no-op).

    def on_shutdown(self, worker_group, backend_config: TorchBackendConfig):
        if self._backend(worker_group, backend_config) not in WORKER_SIDE_BACKENDS:
            ray_backend, ray_config = self._rays(backend_config)
            ray_backend.on_shutdown(worker_group, ray_config)
            return
        futures = worker_group.execute_async(_ray_torch, "_shutdown_torch", destroy_process_group=len(worker_group) > 1)
        timeout_s = env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            logger.warning(f"Torch process group shutdown timed out after {timeout_s} seconds")


def _import_worker_modules():
    """On each worker: the modules of Ray's process-group setup (torch, torch.distributed) and of the
    training loop, which the worker would import next anyway."""
    import ray.train.torch.config  # noqa: F401

    import raydpo.train.loop  # noqa: F401
