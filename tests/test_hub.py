"""Uploading to the Hugging Face Hub, against a local HTTP server that imitates the Hub and records
every request. Nothing here starts Ray or contacts the real Hub."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from raydpo.cli import main as cli
from raydpo.config import DPOConfig

TOKEN = "hf_recorder_token"
USER = "recorder-user"  # the namespace the imitated Hub gives a repo id without one
AGENT_REGISTRY = "/api/agent-harnesses"


class HubRecorder(ThreadingHTTPServer):
    """The Hub endpoints that HfApi.create_repo and create_commit call (huggingface_hub 2.x): create a
    repo, validate README.md's YAML, preupload (every file "regular", so its bytes come inline in the
    commit) and commit. Any other request gets a 404, and every request is recorded."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), RecordingHandler)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests = []  # (method, path, headers with lower-case names, body bytes)
        self.repos = set()

    def uploads(self) -> list:
        """The upload's requests. Left out: huggingface_hub's once-per-process fetch of its agent registry
        for the user-agent header (answered 404, so it writes no cache file and detects no agent)."""
        return [request for request in self.requests if request[:2] != ("GET", AGENT_REGISTRY)]

    def paths(self) -> list:
        return [f"{method} {path}" for method, path, _, _ in self.uploads()]

    def created(self) -> dict:
        """The payload of the first create-repo request."""
        return next(json.loads(body) for _, path, _, body in self.requests if path == "/api/repos/create")

    def commits(self) -> list:
        """Each recorded commit as {"header": ..., "files": {path in repo: bytes}}."""
        commits = []
        for _, path, _, body in self.requests:
            if "/commit/" in path:
                lines = [json.loads(line) for line in body.decode().splitlines() if line]
                files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                         for line in lines if line["key"] == "file"}
                header = next(line["value"] for line in lines if line["key"] == "header")
                commits.append({"header": header, "files": files})
        return commits

    def create_repo(self, payload: dict) -> tuple:
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        status = 409 if repo_id in self.repos else 200  # the Hub answers 409 for an existing repo
        self.repos.add(repo_id)
        return status, {"url": f"{self.endpoint}/{repo_id}"}


class RecordingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client expects

    def do_GET(self):
        self._record_and_answer()

    def do_POST(self):
        self._record_and_answer()

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _record_and_answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = unquote(urlsplit(self.path).path)
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.server.requests.append((self.command, path, headers, body))
        status, answer = self._answer(path, body)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, path: str, body: bytes) -> tuple:
        if self.command != "POST":
            return 404, {"error": f"not imitated: {self.command} {path}"}
        if path == "/api/repos/create":
            return self.server.create_repo(json.loads(body))
        if path == "/api/validate-yaml":
            return 200, {}
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in files]}
        if "/commit/" in path:
            repo_id = path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
            return 200, {"commitUrl": f"{self.server.endpoint}/{repo_id}/commit/{'a' * 40}",
                         "commitOid": "a" * 40, "pullRequestUrl": None}
        return 404, {"error": f"not imitated: POST {path}"}


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    server = HubRecorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # huggingface_hub reads HF_ENDPOINT once, at import, into constants.ENDPOINT, and HfApi() takes that
    # constant when it is built. It is imported long before this fixture runs (raydpo imports it), so
    # setting the variable alone would not move HfApi: patch the constant as well. raydpo itself never
    # passes an endpoint, so what it uses is exactly what HF_ENDPOINT gives a fresh process.
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # read at each request; no stored login is used
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def listing(folder) -> list:
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


def adapter_folder(base: str, directory) -> str:
    """A real LoRA adapter of the tiny model, as PeftModel.save_pretrained writes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(directory)
    return str(directory)


def test_push_uploads_the_folder_and_a_model_card(hub, tiny_model):
    from raydpo.hub import push_to_hub

    before = listing(tiny_model)
    config = DPOConfig(beta=0.25, loss_type="ipo", max_steps=7, output_dir="/somewhere/local")
    card = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "training_data": "pairs.jsonl",
            "dpo_config": config, "metrics": {"loss": 0.6123456789, "rewards/accuracies": 0.75, "global_step": 7}}
    url = push_to_hub(tiny_model, "org/tiny-dpo", model_card=card, private=True)

    assert url == f"{hub.endpoint}/org/tiny-dpo"
    assert hub.paths() == ["POST /api/repos/create", "POST /api/validate-yaml",
                           "POST /api/models/org/tiny-dpo/preupload/main", "POST /api/models/org/tiny-dpo/commit/main"]
    assert all(headers["authorization"] == f"Bearer {TOKEN}" for _, _, headers, _ in hub.uploads())
    assert hub.created() == {"name": "tiny-dpo", "organization": "org", "visibility": "private"}

    [commit] = hub.commits()
    files = commit["files"]
    # every file of the folder, byte for byte, plus the card; the folder itself is left as it was
    assert sorted(files) == sorted(before + ["README.md"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    for name in before:
        with open(os.path.join(tiny_model, name), "rb") as f:
            assert files[name] == f.read(), name
    assert listing(tiny_model) == before

    readme = files["README.md"].decode()
    assert front_matter(readme) == {"library_name": "transformers", "tags": ["dpo", "raydpo"],
                                    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert "`HuggingFaceTB/SmolLM2-135M-Instruct`" in readme and "## Training data\n\npairs.jsonl\n" in readme
    for row in ("| beta | 0.25 |", "| loss_type | ipo |", "| max_steps | 7 |",
                "| loss | 0.612346 |", "| rewards/accuracies | 0.75 |", "| global_step | 7 |"):
        assert row in readme
    assert "learning_rate" not in readme  # a default: only non-default settings are listed
    assert "/somewhere/local" not in readme  # where the run wrote its files stays out of the card
    assert "AutoModelForCausalLM.from_pretrained('org/tiny-dpo')" in readme


def test_pushing_again_updates_the_existing_repo(hub, tiny_model):
    from raydpo.hub import push_to_hub

    card = {"base_model": "gpt2", "dpo_config": DPOConfig()}
    push_to_hub(tiny_model, "org/again", model_card=card)
    url = push_to_hub(tiny_model, "org/again", model_card=card, token="hf_explicit")

    assert url == f"{hub.endpoint}/org/again"  # the Hub's 409 "already exists" is accepted (exist_ok)
    assert len(hub.commits()) == 2
    assert hub.uploads()[-1][2]["authorization"] == "Bearer hf_explicit"  # an explicit token wins over HF_TOKEN
    readme = hub.commits()[1]["files"]["README.md"].decode()
    assert "| beta | 0.1 |" in readme and "| loss_type | sigmoid |" in readme  # shown even at their defaults
    assert "did not know the training data" in readme and "did not know the final metrics" in readme


def test_adapter_folder_is_a_peft_card(hub, tiny_model, tmp_path):
    from raydpo.hub import folder_model_card, push_to_hub

    adapter = adapter_folder(tiny_model, tmp_path / "adapter")
    push_to_hub(adapter, "org/tiny-lora", model_card=folder_model_card(adapter))

    [commit] = hub.commits()
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(commit["files"])
    readme = commit["files"]["README.md"].decode()
    # base_model is the adapter's own base: here a local path, so named in the text but kept out of the
    # front matter (the Hub rejects a base_model that is not a model id)
    assert front_matter(readme) == {"library_name": "peft", "tags": ["dpo", "raydpo"]}
    assert f"`{tiny_model}`" in readme and "PeftModel.from_pretrained(base, 'org/tiny-lora')" in readme


def test_cli_push_of_a_saved_folder(hub, tiny_model, capsys):
    assert cli(["push", tiny_model, "tiny-dpo", "--private", "--base-model", "Qwen/Qwen3-0.6B"]) == 0

    assert f"pushed {tiny_model} to {hub.endpoint}/{USER}/tiny-dpo" in capsys.readouterr().out
    assert hub.created()["visibility"] == "private"
    assert f"POST /api/models/{USER}/tiny-dpo/commit/main" in hub.paths()  # the namespace the Hub resolved
    readme = hub.commits()[0]["files"]["README.md"].decode()
    assert front_matter(readme)["base_model"] == "Qwen/Qwen3-0.6B"
    assert "did not know the final metrics" in readme and "did not know the DPO configuration" in readme


def test_cli_push_with_the_training_config(hub, tiny_model, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "train_dataset": "pairs.jsonl",
                                      "beta": 0.3, "loss_type": "hinge"}))
    assert cli(["push", tiny_model, "org/from-config", "--config", str(config)]) == 0

    assert "visibility" not in hub.created()  # no --private: the Hub's default
    readme = hub.commits()[0]["files"]["README.md"].decode()
    assert front_matter(readme)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "| beta | 0.3 |" in readme and "| loss_type | hinge |" in readme
    assert "## Training data\n\npairs.jsonl\n" in readme


def test_a_fresh_process_follows_HF_ENDPOINT(hub, tiny_model, tmp_path):
    """The real route, with no patched constant: HF_ENDPOINT (inherited from the fixture) set before
    huggingface_hub is imported is the only thing that sends `raydpo push` to the recorder."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"))  # leave the user's Hugging Face cache alone
    done = subprocess.run([sys.executable, "-m", "raydpo.cli", "push", tiny_model, "org/fresh", "--base-model", "gpt2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "POST /api/models/org/fresh/commit/main" in hub.paths()
    assert front_matter(hub.commits()[0]["files"]["README.md"].decode())["base_model"] == "gpt2"


def test_cli_push_of_a_missing_folder_exits_2(hub, tmp_path, capsys):
    assert cli(["push", str(tmp_path / "nowhere"), "org/x"]) == 2
    assert "no model folder" in capsys.readouterr().err
    assert hub.requests == []


def trainer_after_training(tiny_model, checkpoint):
    """A DPOTrainer in the state train() leaves it in, built without Ray: a checkpoint whose model/ is the
    trained policy, the config, the data description and the final metrics."""
    from raydpo.data.tokenize import TokenizedData
    from raydpo.train.trainer import DPOTrainer, TrainOutput

    shutil.copytree(tiny_model, checkpoint / "model")
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    trainer.args = DPOConfig(beta=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], max_steps=3)
    trainer.train_dataset_description = "list of 240 rows"
    trainer.train_data = TokenizedData(dataset=None, num_rows=240)
    trainer.state = TrainOutput(metrics={"loss": 0.5, "global_step": 3}, checkpoint=str(checkpoint))
    return trainer


def test_trainer_push_to_hub_uploads_the_trained_model(hub, tiny_model, tmp_path):
    trainer = trainer_after_training(tiny_model, tmp_path / "checkpoint-3")
    url = trainer.push_to_hub("org/trained", private=False)

    assert url == f"{hub.endpoint}/org/trained"
    assert hub.created()["visibility"] == "public"
    files = hub.commits()[0]["files"]
    assert sorted(files) == sorted(listing(tiny_model) + ["README.md"])
    readme = files["README.md"].decode()
    assert front_matter(readme)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for text in ("list of 240 rows; 240 pairs trained on", "| beta | 0.5 |", "| loss_type | ['sigmoid', 'sft'] |",
                 "| loss_weights | [1.0, 0.5] |", "| loss | 0.5 |", "| global_step | 3 |"):
        assert text in readme


def test_trainer_push_to_hub_before_training_raises(hub, tiny_model, tmp_path):
    trainer = trainer_after_training(tiny_model, tmp_path / "checkpoint-3")
    trainer.state = None
    with pytest.raises(RuntimeError, match="finished train"):
        trainer.push_to_hub("org/untrained")
    assert hub.requests == []


def test_trainer_push_to_hub_takes_the_hub_fields(hub, tiny_model, tmp_path):
    """hub_model_id, hub_token and hub_private_repo are push_to_hub's defaults; the token stays out of the card."""
    trainer = trainer_after_training(tiny_model, tmp_path / "checkpoint-3")
    trainer.args = DPOConfig(push_to_hub=True, hub_model_id="org/from-config", hub_token="hf_config_token",
                             hub_private_repo=True, hub_strategy="end")
    assert trainer.push_to_hub() == f"{hub.endpoint}/org/from-config"
    assert hub.created()["visibility"] == "private"
    assert hub.uploads()[-1][2]["authorization"] == "Bearer hf_config_token"
    readme = hub.commits()[0]["files"]["README.md"].decode()
    assert "hf_config_token" not in readme and "hub_" not in readme and "hf_config_token" not in repr(trainer.args)
    trainer.args = DPOConfig(output_dir=str(tmp_path / "my-run"))  # no hub_model_id: output_dir's name
    assert trainer.push_to_hub() == f"{hub.endpoint}/{USER}/my-run"


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints", "sometimes"])
def test_unsupported_hub_strategies_are_refused(strategy):
    with pytest.raises(ValueError, match=f"hub_strategy must be one of \\('end', 'every_save'\\), got '{strategy}'"):
        DPOConfig(push_to_hub=True, hub_strategy=strategy)


@pytest.mark.parametrize("strategy, commits", [
    ("end", ["End of training"]),
    ("every_save", ["Training in progress, step 2", "End of training"]),
])
def test_raydpo_train_pushes_once_at_the_end(hub, tiny_model, tmp_path, monkeypatch, capsys, strategy, commits):
    """`raydpo train` with push_to_hub: train() is what pushes (once at the end; with every_save also at
    each save), the CLI adds no push of its own, and TRL's dataset_name names the training data on the card.
    Ray is replaced by a fit() that saves checkpoint-2 (reported to the callback handler) and checkpoint-3."""
    import raydpo
    from raydpo.train import trainer as trainer_module
    from raydpo.train.callbacks import CallbackHandler

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    checkpoint = tmp_path / "checkpoint-3"

    class Trainer(trainer_module.DPOTrainer):
        def __init__(self, model, args=None, **kwargs):
            built = trainer_after_training(tiny_model, checkpoint)
            self.__dict__.update(built.__dict__, args=args, state=None, resume_from_checkpoint=None, peft_config=None,
                                 ref_model=None, processing_class=None, eval_data=None)
            self.callback_handler = CallbackHandler(None, args, on_save_hook=self._push_checkpoint)

    def fit(config, *args, handler=None, **kwargs):
        assert (handler is not None) == (strategy == "every_save")
        if handler is not None:
            handler.on_save_hook(2, str(checkpoint), {"loss": 0.6})
        return trainer_module.TrainOutput(metrics={"loss": 0.5, "global_step": 3}, checkpoint=str(checkpoint))

    monkeypatch.setattr(raydpo, "DPOTrainer", Trainer)
    monkeypatch.setattr(trainer_module, "fit", fit)
    out = tmp_path / "my-run"
    assert cli(["train", "--model_name_or_path", "/models/m", "--dataset_name", str(data), "--output_dir", str(out),
                "--push_to_hub", "--hub_strategy", strategy, "--report_to", "none"]) == 0
    assert [commit["header"]["summary"] for commit in hub.commits()] == commits
    assert f"{data}; 240 pairs trained on" in hub.commits()[-1]["files"]["README.md"].decode()
    assert f"pushed the model to the Hub as my-run" in capsys.readouterr().out
    assert os.path.isfile(out / "config.json")  # save_model still writes output_dir
