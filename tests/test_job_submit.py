"""`ray job submit -- raydpo train CONFIG.yaml` against a real local head node (slow).

The head node runs on loopback with its own temp dir and ports, token auth on (Ray's default for
`ray start --head`), and is stopped by killing its own processes only: a bare `ray stop` would also
stop the test session's Ray.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import psutil
import pytest
import yaml

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalHeadNode:
    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="rdj", dir="/tmp")  # short: Ray's socket paths are length-limited
        self.dashboard_port = free_port()
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                    "RAY_ADDRESS": f"http://127.0.0.1:{self.dashboard_port}"}
        self.env.pop("RAY_DEDUP_LOGS", None)

    def start(self):
        subprocess.run([f"{BIN}/ray", "start", "--head", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                        f"--ray-client-server-port={free_port()}", "--num-cpus=2", f"--temp-dir={self.temp_dir}",
                        "--disable-usage-stats"], env=self.env, check=True, capture_output=True, timeout=120)

    def ray(self, *args, timeout=120) -> str:
        done = subprocess.run([f"{BIN}/ray", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        return done.stdout + done.stderr

    def stop(self):
        """Kill this node's processes (found by their temp dir) and their children, nothing else."""
        roots = [p for p in psutil.process_iter(["cmdline"]) if self.temp_dir in " ".join(p.info["cmdline"] or [])]
        procs = {p for root in roots for p in [root, *root.children(recursive=True)]}
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=3)  # then SIGKILL: a Ray daemon may linger on SIGTERM
        for p in alive:
            p.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def head_node():
    node = LocalHeadNode()
    node.start()
    yield node
    node.stop()


@pytest.mark.slow
def test_ray_job_submit_trains(head_node, tiny_model, parity_rows, tmp_path):
    job_dir, output_dir = tmp_path / "job", tmp_path / "out"
    job_dir.mkdir()
    (job_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in parity_rows[:16]))
    (job_dir / "config.yaml").write_text(yaml.safe_dump({
        "model": tiny_model, "train_dataset": "pairs.jsonl", "output_dir": str(output_dir), "max_steps": 2,
        "per_device_train_batch_size": 4, "logging_steps": 1, "num_workers": 1}))
    # Without --no-wait the CLI follows the job to its end (one process, instead of polling `ray job status`,
    # each call of which is a Python start-up competing with the job for the 2 cores).
    head_node.ray("job", "submit", "--submission-id", "raydpo-test", "--working-dir", str(job_dir),
                  "--", "raydpo", "train", "config.yaml", timeout=400)
    status = head_node.ray("job", "status", "raydpo-test")
    logs = head_node.ray("job", "logs", "raydpo-test")
    assert "succeeded" in status, status + logs[-3000:]
    assert "[raydpo] step 2/2" in logs and "[raydpo] done: 2 steps" in logs
    assert (output_dir / "config.json").is_file() and (output_dir / "model.safetensors").is_file()
