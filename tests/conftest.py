"""Shared fixtures: one Ray instance per test session, a tiny random model and a local tokenizer."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/raydpo/torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Worker-group start-up can exceed Ray Train's 60 s default while a 2-core machine is busy.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from raydpo import cluster

    # The dashboard serves the state API, which the tests ask about actors (cluster.session_actors), and
    # which Ray Train V2's own placement-group cleaner queries where raydpo's session cleaner is not used
    # (raydpo/placement_group_cleaner.py). cluster.connect names that dashboard to every Ray process of
    # the session (see there); the state API otherwise fails when a test starts a second Ray instance.
    cluster.connect("local", num_cpus=2,
                    runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"],
                                              "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def no_leftovers(request):
    """After each test that used the shared Ray session: every run it made has given back its placement
    groups and CPUs (a leftover makes a later run wait forever at "Requesting resources"), and closed its
    history."""
    yield
    if "ray_session" not in request.fixturenames:
        return
    import ray

    from raydpo import cluster

    if ray.is_initialized():
        left = cluster.leftovers()
        assert not left["placement_groups"] and not left["cpus_in_use"], f"{request.node.nodeid} left {left}"
        # and every run it made closed (or, when it failed, discarded) its history in the session's
        # SessionHistories actor (raydpo/train/history.py), if this driver made one
        from raydpo.train.history import NAME

        try:
            histories = ray.get_actor(NAME)
        except ValueError:
            histories = None
        if histories is not None:
            assert ray.get(histories.open_runs.remote()) == [], f"{request.node.nodeid} left run histories open"


@pytest.fixture
def fake_cluster(monkeypatch):
    """A Ray cluster's view without Ray, for the pure tests: `fake_cluster(resources, autoscaler=None,
    nodes=None)` makes ray.cluster_resources() return `resources`, ray.nodes() list `nodes` (each node's
    resources; by default one node holding all of `resources`), and the autoscaler's published
    ClusterConfig (what raydpo.cluster.capacity and nodes read) be `autoscaler`, None for a cluster without one."""
    import ray
    import ray._private.state

    def set_cluster(resources: dict, autoscaler=None, nodes=None):
        listed = [{"Alive": True, "Resources": dict(node)} for node in (nodes or [resources])]
        monkeypatch.setattr(ray, "cluster_resources", lambda: dict(resources))
        monkeypatch.setattr(ray, "nodes", lambda: listed)
        monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: autoscaler)

    return set_cluster


@pytest.fixture(scope="session")
def parity_rows():
    from raydpo.tasks import parity_pairs

    return parity_pairs(240, seed=1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, parity_rows):
    from raydpo.models import build_tiny_model

    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in parity_rows] + ["0 1 2 3 4 5 6 7 8 9 even odd"]
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), texts)
