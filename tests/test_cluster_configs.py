"""The cluster configs in cluster/: launcher YAMLs (AWS, GCP), KubeRay manifests, the image and the
example sweep. Each check is a function that raises AssertionError; the tests run them on the real
files, and on broken copies to show that each check can fail."""

import copy
import itertools
import os
import re

import pytest
import yaml

import raydpo.cli
from raydpo.config import DPOConfig

CLUSTER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster")
LAUNCHERS = ("aws-gpu.yaml", "gcp-gpu.yaml")
KUBERAY = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")
SWEEP = os.path.join(CLUSTER, "sweep.example.yaml")
SHARED = "/mnt/shared"

# (vCPUs, GPUs) of the instance / machine types the configs may use; add a row to use another type.
# GCP's N1 types get their GPUs from guestAccelerators; A2 / A3 / G2 types have theirs built in.
INSTANCE_TYPES = {
    "aws": {
        "m6i.2xlarge": (8, 0), "m6i.4xlarge": (16, 0), "m6i.8xlarge": (32, 0),
        "g5.xlarge": (4, 1), "g5.12xlarge": (48, 4), "g5.48xlarge": (192, 8),
        "g6.12xlarge": (48, 4), "g6e.12xlarge": (48, 4),
        "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
    },
    "gcp": {
        "n2-standard-8": (8, 0), "n2-standard-16": (16, 0), "n1-standard-16": (16, 0),
        "g2-standard-24": (24, 2), "g2-standard-48": (48, 4),
        "a2-highgpu-1g": (12, 1), "a2-highgpu-4g": (48, 4), "a2-highgpu-8g": (96, 8),
        "a3-highgpu-8g": (208, 8),
    },
}
LAUNCHER_KEYS = ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")


def load(name):
    with open(os.path.join(CLUSTER, name)) as f:
        return yaml.safe_load(f)


def strings(value):
    """Every string in a parsed YAML document (keys included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def check_never_public(doc):
    for text in strings(doc):
        assert "0.0.0.0" not in text and "::/0" not in text, f"a public address in {text!r}"
        for host in re.findall(r"dashboard[-_]host[= :]+\"?([^\s\";]+)", text):
            assert host == "127.0.0.1", f"dashboard host {host!r} in {text!r}"


# --- Ray cluster launcher -------------------------------------------------------------------------

def node_gpus(provider, node_config):
    if provider == "aws":
        return INSTANCE_TYPES["aws"][node_config["InstanceType"]]
    cpus, gpus = INSTANCE_TYPES["gcp"][node_config["machineType"]]
    gpus += sum(int(a["acceleratorCount"]) for a in node_config.get("guestAccelerators", []))
    return cpus, gpus


def install_commands(cfg):
    return [c for c in cfg["setup_commands"] + cfg.get("head_setup_commands", []) if not c.lstrip().startswith("#")]


def check_launcher(cfg):
    for key in LAUNCHER_KEYS:
        assert cfg.get(key), f"missing {key}"
    provider = cfg["provider"]["type"]
    assert provider in INSTANCE_TYPES, provider
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_workers = 0
    for name, node in types.items():
        assert "node_config" in node and "resources" in node, name
        machine = node["node_config"].get("InstanceType" if provider == "aws" else "machineType")
        assert machine in INSTANCE_TYPES[provider], f"{name}: {machine!r} is not in the test's table"
        cpus, gpus = node_gpus(provider, node["node_config"])
        assert node["resources"].get("GPU", 0) == gpus, f"{name}: GPU {node['resources']} but {machine} has {gpus}"
        assert node["resources"].get("CPU", cpus) == cpus, f"{name}: CPU {node['resources']} but {machine} has {cpus}"
        if provider == "gcp" and gpus:
            scheduling = node["node_config"].get("scheduling", {})
            scheduling = {k: v for d in scheduling for k, v in d.items()} if isinstance(scheduling, list) else scheduling
            assert scheduling.get("onHostMaintenance") == "TERMINATE", f"{name}: GPU VMs need onHostMaintenance TERMINATE"
        if name != cfg["head_node_type"]:
            assert node.get("min_workers", 0) <= node.get("max_workers", cfg.get("max_workers", 2)), name
            gpu_workers += bool(gpus)
    assert gpu_workers, "no GPU worker node type"


def check_launcher_install(cfg):
    commands = install_commands(cfg)

    def first(predicate, what):
        found = [i for i, c in enumerate(commands) if predicate(c)]
        assert found, f"no command installs {what}"
        return found[0]

    torch = first(lambda c: "pip install" in c and "torch==2.13.0" in c, "torch==2.13.0")
    ray = first(lambda c: "pip install" in c and re.search(r"ray\[([^\]]*)\]==2\.60\.0", c)
                and set(re.search(r"ray\[([^\]]*)\]", c).group(1).split(",")) >= {"default", "train", "tune", "data"},
                'ray[default,train,tune,data]==2.60.0')
    ds = first(lambda c: "deepspeed==0.19.8" in c, "deepspeed==0.19.8")
    assert "DS_BUILD_OPS=0" in commands[ds] and "--no-build-isolation" in commands[ds], commands[ds]
    raydpo = first(lambda c: re.search(r"pip install [^;&|]*raydpo", c) or "raydpo @ git+" in c, "raydpo")
    assert torch < ray < ds < raydpo, "install order must be torch, ray, deepspeed, raydpo"
    path = re.search(r"pip install -e (\S+)", commands[raydpo])
    if path:  # an editable install of the working tree: it must be mounted there
        assert path.group(1) in cfg.get("file_mounts", {}), f"{path.group(1)} is not in file_mounts"


def check_launcher_security(cfg):
    check_never_public(cfg)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts, f"{key} has no ray start"
        for command in starts:
            assert "RAY_AUTH_MODE=token" in command, f"token auth missing: {command!r}"
            if "--head" in command:
                assert "--dashboard-host=127.0.0.1" in command, f"dashboard not on loopback: {command!r}"
    assert "~/.ray/auth_token" in cfg.get("file_mounts", {}), "the auth token is not mounted on the nodes"
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not rule.get("IpRanges") and not rule.get("Ipv6Ranges"), f"security group opens {rule} to addresses"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config(name):
    cfg = load(name)
    check_launcher(cfg)
    check_launcher_install(cfg)
    check_launcher_security(cfg)
    assert cfg["provider"]["type"] == name.split("-")[0]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_rays_own_validation(name):
    """What `ray up` runs first: fill in the provider's defaults, then check against ray-schema.json."""
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(load(name))
    validate_config(cfg)
    check_launcher(cfg)  # Ray's defaults did not replace the node types or resources


LAUNCHER_BREAKS = {
    "dashboard on all interfaces": lambda c: c["head_start_ray_commands"].__setitem__(
        -1, c["head_start_ray_commands"][-1].replace("127.0.0.1", "0.0.0.0")),
    "dashboard on the node's address": lambda c: c["head_start_ray_commands"].__setitem__(
        -1, c["head_start_ray_commands"][-1].replace("127.0.0.1", "10.0.0.5")),
    "no token auth": lambda c: c["worker_start_ray_commands"].__setitem__(
        -1, c["worker_start_ray_commands"][-1].replace("RAY_AUTH_MODE=token", "")),
    "GPU count off": lambda c: c["available_node_types"][next(
        k for k, v in c["available_node_types"].items() if v["resources"].get("GPU"))]["resources"].update(GPU=1),
    "deepspeed with build isolation": lambda c: c["setup_commands"].__setitem__(*next(
        (i, s.replace(" --no-build-isolation", "")) for i, s in enumerate(c["setup_commands"]) if "deepspeed" in s)),
    "raydpo not installed": lambda c: c.update(setup_commands=[s for s in c["setup_commands"] if "raydpo" not in s]),
    "deepspeed before torch": lambda c: c.update(setup_commands=sorted(c["setup_commands"], key=lambda s: "torch==" in s)),
    "dashboard port opened": lambda c: c["provider"].setdefault("security_group", {}).setdefault(
        "IpPermissions", []).append({"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp",
                                     "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}),
    "missing head_node_type": lambda c: c.pop("head_node_type"),
}


@pytest.mark.parametrize("name", LAUNCHERS)
@pytest.mark.parametrize("brk", sorted(LAUNCHER_BREAKS))
def test_launcher_checks_catch(name, brk):
    cfg = copy.deepcopy(load(name))
    LAUNCHER_BREAKS[brk](cfg)
    with pytest.raises(AssertionError):
        check_launcher(cfg)
        check_launcher_install(cfg)
        check_launcher_security(cfg)


# --- KubeRay ----------------------------------------------------------------------------------------

def cluster_spec(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def groups(spec):
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def check_kuberay(doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in ("RayCluster", "RayJob")
    spec = cluster_spec(doc)
    assert spec["headGroupSpec"] and spec["workerGroupSpecs"], "head and worker groups required"
    assert str(spec.get("rayVersion")) == "2.60.0"
    images = set()
    for name, group in groups(spec):
        pod = group["template"]["spec"]
        ray_container = pod["containers"][0]
        images.add(ray_container["image"])
        res = ray_container.get("resources", {})
        requests, limits = res.get("requests", {}), res.get("limits", {})
        for key in ("cpu", "memory", "nvidia.com/gpu"):
            assert str(requests.get(key)) == str(limits.get(key)), f"{name}: {key} requests != limits"
        gpus = int(limits.get("nvidia.com/gpu", 0))
        if "num-gpus" in group.get("rayStartParams", {}):
            assert int(group["rayStartParams"]["num-gpus"]) == gpus, f"{name}: num-gpus != nvidia.com/gpu"
        if name == "head":
            continue
        assert gpus > 0, f"worker group {name} has no GPU"
        assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 1), name
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}: volumeMount {mount['name']} has no volume"
    assert len(images) == 1, f"head and workers run different images: {images}"
    assert "raydpo" in images.pop(), "the image must have raydpo installed (cluster/Dockerfile)"


def check_kuberay_security(doc):
    check_never_public(doc)
    spec = cluster_spec(doc)
    for text in strings(doc):
        assert text not in ("LoadBalancer", "NodePort"), "a Service exposed outside the cluster"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not spec["headGroupSpec"].get("enableIngress"), "Ingress to the dashboard"
    for _, group in groups(spec):
        assert group.get("rayStartParams", {}).get("dashboard-host", "127.0.0.1") == "127.0.0.1"
    token_env = all(any(e.get("name") == "RAY_AUTH_MODE" and e.get("value") == "token" for e in c.get("env", []))
                    for _, g in groups(spec) for c in g["template"]["spec"]["containers"][:1])
    assert spec.get("authOptions", {}).get("mode") == "token" or token_env, "token auth is off"


def check_rayjob(doc):
    entrypoint = doc["spec"]["entrypoint"]
    assert entrypoint.startswith("raydpo sweep "), entrypoint
    config = entrypoint.split()[2]
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert any(config.startswith(m["mountPath"].rstrip("/") + "/") for m in head.get("volumeMounts", [])), \
        f"{config} is not on a volume mounted in the head pod"


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest(name):
    doc = load(name)
    check_kuberay(doc)
    check_kuberay_security(doc)
    assert doc["kind"] == ("RayJob" if "rayjob" in name else "RayCluster")
    if doc["kind"] == "RayJob":
        check_rayjob(doc)


def _worker(doc):
    return cluster_spec(doc)["workerGroupSpecs"][0]


def _set_gpu_limit(doc, n):
    _worker(doc)["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = n


KUBERAY_BREAKS = {
    "GPU requests != limits": lambda d: _set_gpu_limit(d, "2"),
    "num-gpus != nvidia.com/gpu": lambda d: _worker(d)["rayStartParams"].update({"num-gpus": "8"}),
    "LoadBalancer": lambda d: cluster_spec(d)["headGroupSpec"].update(serviceType="LoadBalancer"),
    "NodePort head service": lambda d: cluster_spec(d)["headGroupSpec"].update(headService={"spec": {"type": "NodePort"}}),
    "dashboard on all interfaces": lambda d: cluster_spec(d)["headGroupSpec"]["rayStartParams"].update(
        {"dashboard-host": "0.0.0.0"}),
    "no token auth": lambda d: cluster_spec(d).pop("authOptions"),
    "stock Ray image": lambda d: [g["template"]["spec"]["containers"][0].update(image="rayproject/ray:2.60.0-gpu")
                                  for _, g in groups(cluster_spec(d))],
    "wrong apiVersion": lambda d: d.update(apiVersion="ray.io/v1alpha1"),
    "no worker group": lambda d: cluster_spec(d).update(workerGroupSpecs=[]),
}


@pytest.mark.parametrize("name", KUBERAY)
@pytest.mark.parametrize("brk", sorted(KUBERAY_BREAKS))
def test_kuberay_checks_catch(name, brk):
    doc = copy.deepcopy(load(name))
    KUBERAY_BREAKS[brk](doc)
    with pytest.raises(AssertionError):
        check_kuberay(doc)
        check_kuberay_security(doc)


def test_rayjob_check_catches_unmounted_config():
    doc = load("kuberay-rayjob.yaml")
    doc["spec"]["entrypoint"] = "raydpo sweep /elsewhere/sweep.yaml"
    with pytest.raises(AssertionError):
        check_rayjob(doc)


def test_dockerfile_installs_raydpo_in_order():
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        text = f.read()
    assert re.search(r"^FROM rayproject/ray:2\.60\.0\S*gpu", text, re.M), "base image: Ray 2.60 with GPU"
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    cfg = {"setup_commands": runs, "file_mounts": {}}
    check_launcher_install(cfg)
    assert "COPY" in text and re.search(r"pip install [^\n]*/raydpo", text)


# --- the example sweep ------------------------------------------------------------------------------

def test_sweep_example_loads_through_the_cli():
    config, run = raydpo.cli.load_config(SWEEP, [], raydpo.cli.SWEEP_KEYS)
    assert config.use_gpu is True
    assert set(run) >= {"model", "train_dataset", "search_space"}
    assert run.get("scheduler", "asha") in ("asha", "pbt", "fifo", "none", None)
    assert run.get("mode", "min") in ("min", "max")
    assert int(run.get("num_samples", 1)) >= 1
    assert config.output_dir.startswith(SHARED + "/"), "sweep results must be on the shared filesystem"

    # Every grid point (other samplers at their lower bound) is a valid DPOConfig.
    from raydpo.tune.sweep import search_space_from_dict

    search_space_from_dict(run["search_space"])
    grids, fixed = {}, {}
    for field, value in run["search_space"].items():
        if isinstance(value, dict) and "grid_search" in value:
            grids[field] = value["grid_search"]
        elif isinstance(value, dict) and len(value) == 1:
            kind, argument = next(iter(value.items()))
            fixed[field] = argument[0]  # choice: the first option; uniform etc.: the lower bound
        else:
            fixed[field] = value
    base = {k: v for k, v in config.to_dict().items()}
    for combo in itertools.product(*grids.values()):
        DPOConfig(**{**base, **fixed, **dict(zip(grids, combo))})


def test_sweep_example_fits_the_clusters():
    """A trial's GPU workers fit one worker node of every config, and every config mounts the shared
    filesystem that the sweep's output_dir is on."""
    config, _ = raydpo.cli.load_config(SWEEP, [], raydpo.cli.SWEEP_KEYS)
    for name in LAUNCHERS:
        cfg = load(name)
        provider = cfg["provider"]["type"]
        gpus = [node_gpus(provider, n["node_config"])[1] for k, n in cfg["available_node_types"].items()
                if k != cfg["head_node_type"]]
        assert max(gpus) >= config.num_workers, f"{name}: no worker node has {config.num_workers} GPUs"
        assert any(SHARED in c for c in install_commands(cfg)), f"{name} does not set up {SHARED}"
    for name in KUBERAY:
        spec = cluster_spec(load(name))
        gpus = int(spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus >= config.num_workers, name
        for group_name, group in groups(spec):
            mounts = [m["mountPath"] for m in group["template"]["spec"]["containers"][0].get("volumeMounts", [])]
            assert SHARED in mounts, f"{name}: {group_name} does not mount {SHARED}"


def test_sweep_example_check_catches_bad_values(tmp_path):
    for bad in ({"betta": 0.1}, {"use_gpu": "maybe", "loss_type": "nope"}):
        values = {**yaml.safe_load(open(SWEEP)), **bad}
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(values))
        with pytest.raises(ValueError):
            raydpo.cli.load_config(str(path), [], raydpo.cli.SWEEP_KEYS)


def test_readme_covers_each_config():
    with open(os.path.join(CLUSTER, "README.md")) as f:
        text = f.read()
    for name in LAUNCHERS + KUBERAY + ("sweep.example.yaml", "Dockerfile"):
        assert name in text, f"README does not mention {name}"
    for phrase in ("ray up", "ray job submit", "--working-dir .", "raydpo sweep", "kubectl apply",
                   "port-forward", "RAY_AUTH_MODE=token", "ray dashboard"):
        assert phrase in text, f"README does not show {phrase!r}"
