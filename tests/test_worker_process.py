"""How raydpo sets up its CPU training and reference processes: glibc's malloc keeps freed memory
(cluster.cpu_process_env, passed to the Ray actors' runtime_env)."""

import os
import subprocess
import sys

import pytest

from raydpo import cluster
from raydpo.reference.precompute import remote_args

# In a thread (Ray Train runs the loop in one), allocate, touch and free a 64 MiB tensor (as a logits
# chunk is), then a 63 MiB one; print the page faults of the second. (A freed block serves a request
# that fits it: torch's 64-byte-aligned allocation of the very same size needs a few bytes more.)
PROBE = """
import resource, threading, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def run():
    x = torch.ones(2 ** 24); del x
    before = faults()
    x = torch.ones(63 * 2 ** 18); del x
    print(faults() - before)
thread = threading.Thread(target=run); thread.start(); thread.join()
"""
PAGES = 63 * 2 ** 18 * 4 // 4096  # 16128 pages of 4 KiB


def page_faults(env: dict) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    return int(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                              env={**clean, **env}).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    assert page_faults({}) > PAGES // 2  # glibc maps the 64 MiB afresh: each page faults in again
    assert page_faults(cluster.cpu_process_env()) < PAGES // 20  # kept: the first tensor's pages serve the second


def test_reference_actors_get_the_setting_on_cpu_only(monkeypatch):
    assert remote_args({"CPU": 1}, use_gpu=False)["runtime_env"] == {"env_vars": cluster.cpu_process_env()}
    assert "runtime_env" not in remote_args({"CPU": 1, "GPU": 1}, use_gpu=True)
    monkeypatch.setenv("RAYDPO_KEEP_FREED_MEMORY", "0")
    assert cluster.cpu_process_env() == {}
    assert "runtime_env" not in remote_args({"CPU": 1}, use_gpu=False)
