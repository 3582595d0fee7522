"""raydpo on more than one node, with its files on S3: a head and two worker nodes as separate raylets on
this machine (Ray's own test-cluster utility, token authentication on, dashboard on 127.0.0.1) and moto's
S3-compatible server on 127.0.0.1 as the bucket.

The training workers need a resource only the worker nodes have ("trainer"), so a 2-worker run spans both
and the head (which runs the driver's Ray Data tasks) can never be the node a test kills. Every process
this file starts (the nodes, the S3 server) is stopped by the module's fixtures.
"""

import json
import os
import secrets
import socket
import sys
import threading
import time

import pytest

from raydpo import DPOConfig, DPOTrainer, storage

STEPS, SAVE_STEPS = 10, 4  # checkpoints 4, 8 and 10; 80 pairs / (2 workers x 4) = 10 steps per epoch
WORKER_NODE = {"num_cpus": 1, "resources": {"trainer": 1}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """The environment every node must have: S3 credentials (read by pyarrow wherever a file is
    written) and Ray's token authentication. Set before the nodes start, so each raylet passes it on."""
    names = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
             # a job's entrypoint (`raydpo train`) runs with the head's environment: this Python's scripts first
             "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    saved = {name: os.environ.get(name) for name in [*names, "RAY_API_SERVER_ADDRESS"]}
    os.environ.update(names)
    _reload_ray_auth()
    yield names
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _reload_ray_auth()


def _reload_ray_auth():
    """This process read RAY_AUTH_MODE once, when Ray was imported: read it again (as ray.init does when it
    turns token auth on itself), and the token with it."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def bucket(s3_env):
    """`s3://raydpo?endpoint_override=...&scheme=http` on a moto server bound to 127.0.0.1."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                      allow_bucket_creation=True).create_dir("raydpo")
    yield f"s3://raydpo?endpoint_override=127.0.0.1:{port}&scheme=http"
    server.stop()


@pytest.fixture(scope="module")
def ray_cluster(s3_env, tmp_path_factory):
    """Head (1 CPU, no "trainer") + two worker nodes, each a raylet of its own; the driver connects by address."""
    import ray
    from ray.cluster_utils import Cluster

    dashboard_port = free_port()
    # Ray Train's placement-group cleaner asks the state API for "the" Ray instance: name this one's
    # dashboard, as cluster.connect does for an embedded Ray (other Ray instances run on this machine).
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    temp_dir = tmp_path_factory.mktemp("rmn", numbered=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
        "temp_dir": str(temp_dir)})
    # A job's supervisor finds "its" cluster through the address file in the head's temp dir, else by
    # looking for any GCS process on the machine (another test's): the utility writes the file only
    # in the default temp dir.
    ray._private.utils.write_ray_address(cluster.address, str(temp_dir))
    try:
        workers = [cluster.add_node(**WORKER_NODE) for _ in range(2)]
        ray.init(address=cluster.address, runtime_env={"env_vars": {
            "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"], "TOKENIZERS_PARALLELISM": "false"}})
        cluster.dashboard_port = dashboard_port
        cluster.initial_workers = workers
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()  # kills every process of every node it started


def config(storage_path, **overrides):
    values = dict(output_dir="unused-local-dir", storage_path=storage_path, num_workers=2,
                  per_device_train_batch_size=4, learning_rate=1e-3, max_length=32, logging_steps=1,
                  max_steps=STEPS, save_steps=SAVE_STEPS, run_name="run", resources_per_worker={"CPU": 1, "trainer": 1})
    values.update(overrides)
    return DPOConfig(**values)


def worker_nodes(ray_cluster) -> list:
    """Node ids of the Ray Train workers (alive or dead) this cluster has run, from the state API."""
    from ray.util.state import list_actors

    actors = list_actors(address=f"http://127.0.0.1:{ray_cluster.dashboard_port}",
                         filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
    return [a.node_id for a in actors]


def node_ids(nodes) -> set:
    return {node.node_id for node in nodes}


def s3_files(uri: str) -> set:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri)
    return {info.path[len(path) + 1:] for info in fs.get_file_info(pafs.FileSelector(path, recursive=True))}


@pytest.fixture(scope="module")
def steady_run(ray_cluster, bucket, tiny_model, parity_rows, tmp_path_factory):
    """10 steps on 2 workers (one per worker node), checkpoints in S3, never interrupted. Its DeepSpeed
    config is a JSON file deleted before train(): a worker that read the path would fail."""
    ds_json = tmp_path_factory.mktemp("ds") / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    trainer = DPOTrainer(tiny_model, args=config(storage.join(bucket, "steady"), deepspeed=str(ds_json)),
                         train_dataset=parity_rows[:80])
    ds_json.unlink()
    out = trainer.train()
    return trainer, out, worker_nodes(ray_cluster)  # the cluster's first run: all its workers are this run's


def test_workers_span_two_nodes_and_every_file_lands_in_s3(steady_run, ray_cluster, bucket):
    from transformers import AutoModelForCausalLM

    trainer, out, nodes = steady_run
    assert sorted(nodes) == sorted(node_ids(ray_cluster.initial_workers))  # one worker on each worker node
    assert [h["global_step"] for h in out.history] == list(range(1, STEPS + 1))
    # the returned checkpoint is a URI on the same server (its query kept), and the files are in the bucket
    assert out.checkpoint == storage.join(bucket, "steady", "run", "checkpoint-10")
    files = s3_files(storage.join(bucket, "steady", "run"))
    for step in (4, 8, 10):
        assert {f"checkpoint-{step}/model/model.safetensors", f"checkpoint-{step}/rng_rank0.pt",
                f"checkpoint-{step}/rng_rank1.pt"} <= files
    assert any(name.startswith("tensorboard/events.out.tfevents.") for name in files)
    # save_model to S3, read back from there
    saved = trainer.save_model(storage.join(bucket, "final"))
    assert {"model.safetensors", "config.json"} <= s3_files(saved)
    with storage.local_dir(saved) as folder:
        model = AutoModelForCausalLM.from_pretrained(folder)
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.slow  # `ray job submit`, as tests/test_job_submit.py
def test_job_submit_resumes_from_an_s3_checkpoint_and_matches(steady_run, ray_cluster, bucket, tiny_model,
                                                               parity_rows, tmp_path):
    """`ray job submit -- raydpo train config.yaml` to the cluster (token auth), resuming from the steady
    run's checkpoint-4 in S3: steps 5-10 only, and the model it saves to S3 is the steady run's
    checkpoint-10 model. Its DeepSpeed config is a JSON file in the job's working dir, read by the job's driver."""
    import subprocess

    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    _, steady, _ = steady_run
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in parity_rows[:80]))
    (job_dir / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    values = {k: v for k, v in config(storage.join(bucket, "job")).to_dict().items()
              if k in ("storage_path", "num_workers", "per_device_train_batch_size", "learning_rate", "max_length",
                       "logging_steps", "max_steps", "save_steps", "run_name", "resources_per_worker")}
    (job_dir / "config.yaml").write_text(yaml.safe_dump({
        **values, "model": tiny_model, "train_dataset": str(job_dir / "pairs.jsonl"), "deepspeed": "ds.json",
        "output_dir": storage.join(bucket, "job-model"),
        "resume_from_checkpoint": storage.join(bucket, "steady", "run", "checkpoint-4")}))
    env = {**os.environ, "RAY_ADDRESS": f"http://127.0.0.1:{ray_cluster.dashboard_port}"}
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")

    def ray(*args, timeout=120):
        done = subprocess.run([ray_cli, *args], env=env, capture_output=True, text=True, timeout=timeout)
        return done.stdout + done.stderr

    # Without --no-wait the CLI follows the job to its end (one process instead of polling `ray job status`).
    ray("job", "submit", "--submission-id", "raydpo-resume", "--working-dir", str(job_dir),
        "--", "raydpo", "train", "config.yaml", timeout=500)
    status, logs = ray("job", "status", "raydpo-resume"), ray("job", "logs", "raydpo-resume")
    assert "succeeded" in status, status + logs[-3000:]
    steps = [int(line.split()[2].split("/")[0]) for line in logs.splitlines() if line.startswith("[raydpo] step ")]
    assert steps == list(range(5, STEPS + 1)), logs[-3000:]
    assert "[raydpo] done: 10 steps" in logs
    with storage.local_dir(storage.join(bucket, "job-model")) as job_model, \
            storage.local_dir(storage.join(bucket, "steady", "run", "checkpoint-10", "model")) as steady_model:
        resumed, untouched = (AutoModelForCausalLM.from_pretrained(m).state_dict() for m in (job_model, steady_model))
    assert resumed.keys() == untouched.keys()
    for name, tensor in untouched.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_missing_s3_checkpoint_is_refused(bucket, tiny_model, parity_rows, ray_cluster):
    with pytest.raises(ValueError, match="resume_from_checkpoint: no checkpoint folder at 's3://raydpo/nothing"):
        DPOTrainer(tiny_model, args=config(storage.join(bucket, "x")), train_dataset=parity_rows[:8],
                   resume_from_checkpoint=storage.join(bucket, "nothing", "checkpoint-4"))


def test_sweep_and_reference_cache_in_s3(ray_cluster, bucket, tiny_model, parity_rows):
    """A sweep whose output_dir and reference log-prob cache are S3 URIs: the trials' checkpoints, the
    report and the best model land in the bucket, and the cached log-probs are read back from there."""
    from raydpo.reference.precompute import cached_ref_logps
    from raydpo.reference.precomputed import REF_COLUMNS
    from raydpo.tune import sweep

    cache = storage.join(bucket, "ref-cache")
    args = config(None, output_dir=storage.join(bucket, "sweeps"), num_workers=1, max_steps=2, save_steps=2,
                  precompute_ref_log_probs=True, precompute_ref_cache_dir=cache)
    result = sweep(tiny_model, parity_rows[:16], {"beta": {"grid_search": [0.1, 0.5]}}, args=args, scheduler=None,
                   name="grid")
    assert result.results_dir == storage.join(bucket, "sweeps", "grid")
    assert [row["status"] for row in result.table] == ["ok", "ok"]
    files = s3_files(result.results_dir)
    assert {"trials.jsonl", "results.csv", "learning_curves.png", "best_model/model.safetensors"} <= files
    assert sum(name.endswith("/model/model.safetensors") and name.startswith("trials/") for name in files) == 2
    assert any(name.endswith("/meta.json") for name in s3_files(cache))
    trainer = DPOTrainer(tiny_model, args=args, train_dataset=parity_rows[:16])
    cached = cached_ref_logps(trainer.train_data.dataset, tiny_model, trainer.args)
    assert cached is not None and cached.count() == 16
    assert all(row[c] is not None for row in cached.take_all() for c in REF_COLUMNS)


@pytest.mark.slow  # kills a node
def test_lost_node_resumes_from_s3_on_a_node_that_joins(steady_run, ray_cluster, bucket, tiny_model, parity_rows):
    """A worker node's raylet and every process of it are killed after checkpoint-4 reached S3; a new node
    joins, and the run goes on from that checkpoint to the same end as the untouched run. The run is
    the background thread here: starting a node sets signal handlers, which only the main thread may."""
    _, steady, _ = steady_run
    path = storage.join(bucket, "lost")
    result = {}

    def train():
        try:
            result["out"] = DPOTrainer(tiny_model, train_dataset=parity_rows[:80], args=config(
                path, max_failures=1, deepspeed={"zero_optimization": {"stage": 2}})).train()
        except BaseException as error:  # re-raised below, in the test's thread
            result["error"] = error

    run = threading.Thread(target=train)
    run.start()
    deadline = time.time() + 300
    while run.is_alive() and time.time() < deadline and not storage.is_file(
            storage.join(path, "run", "checkpoint-4", "rng_rank1.pt")):
        time.sleep(0.2)
    assert run.is_alive(), f"the run ended before a node was killed: {result}"
    victim = sorted(ray_cluster.worker_nodes, key=lambda node: node.node_id)[-1]
    ray_cluster.remove_node(victim, allow_graceful=False)
    joined = ray_cluster.add_node(**WORKER_NODE)
    run.join(timeout=600)
    assert not run.is_alive(), "the run did not end within 10 minutes of the node loss"
    if "error" in result:
        raise result["error"]
    out = result["out"]
    assert [h["global_step"] for h in out.history] == list(range(1, STEPS + 1))
    assert out.metrics["global_step"] == steady.metrics["global_step"] == STEPS
    assert out.metrics["loss"] == pytest.approx(steady.metrics["loss"], abs=1e-5)
    assert out.metrics["num_tokens"] == steady.metrics["num_tokens"]
    nodes = worker_nodes(ray_cluster)
    assert victim.node_id in nodes and joined.node_id in nodes  # a worker was lost with its node; one ran on the new node


def test_dashboard_refuses_requests_without_the_token(ray_cluster, s3_env):
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{ray_cluster.dashboard_port}/api/version"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=30)
    assert refused.value.code in (401, 403)
    authorized = urllib.request.Request(url, headers={"Authorization": f"Bearer {s3_env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(authorized, timeout=30) as response:
        assert response.status == 200
