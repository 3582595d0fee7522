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
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"],
                                       "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def build_tokenizer(texts):
    """A word-level tokenizer trained here, with BOS added and EOS as a special token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_tiny_model(directory, texts, hidden=64, layers=2, seed=0):
    """Save a randomly initialised tiny Llama and its tokenizer to `directory`; return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(texts)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def parity_rows():
    from raydpo.tasks import parity_pairs

    return parity_pairs(240, seed=1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, parity_rows):
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in parity_rows] + ["0 1 2 3 4 5 6 7 8 9 even odd"]
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), texts)
