import dataclasses

import pytest
import torch

from raydpo.data.batching import SHARED_PROMPT, collate
from raydpo.logprobs import completion_logps

# Two layouts of one batch (padded rows, a shared prompt, one padding-free row) multiply matrices of other
# shapes, so BLAS sums their gradients in another order. The tiny model's largest gradients are ~19, where
# float32 resolves ~2e-6: an element near zero can differ by that much between layouts. An AVX2-only CPU
# measured 3.8e-6 (atol 1e-6 failed there, passed on AVX-512 machines); a layout bug (a token attending
# across segments, a shifted position) moves gradients by ~1e-2. 1e-5 is the layouts' fp32 equality
# bound of issue 14 and torch.testing's float32 default.
LAYOUT_GRAD_ATOL = 1e-5


def direct_logps(logits, input_ids, completion_mask):
    """Token by token, straight from the definition: sum of log p(x_t | x_<t) over completion tokens."""
    out = []
    for b in range(input_ids.shape[0]):
        total = 0.0
        for t in range(1, input_ids.shape[1]):
            if completion_mask[b, t]:
                total += torch.log_softmax(logits[b, t - 1].double(), -1)[input_ids[b, t]].item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_prompt_and_padding_contribute_nothing():
    rows = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 9, 2]},
            {"prompt_ids": [1, 5], "chosen_ids": [7, 7, 7, 2], "rejected_ids": [3, 2]}]
    batch = collate(rows, pad_token_id=0)
    torch.manual_seed(0)
    logits = torch.randn(*batch.input_ids.shape, 11)
    expected = direct_logps(logits, batch.input_ids, batch.completion_mask)
    got = completion_logps(logits, batch.input_ids, batch.completion_mask, chunk_size=2)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)

    # Changing logits at prompt-predicting or padded positions must not move the result.
    poked = logits.clone()
    poked[0, 0] += 100.0  # predicts prompt token 5 of row 0
    poked[2, -1] += 100.0  # row 2 (rejected of pair 0) is full length; row 0 ends in padding
    poked[0, -1] += 100.0  # padding position of row 0
    torch.testing.assert_close(completion_logps(poked, batch.input_ids, batch.completion_mask), got)


def test_collate_layout_and_truncation():
    rows = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 9, 2]}]
    batch = collate(rows, pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 2, 0, 0], [1, 5, 6, 8, 9, 9, 2]]  # chosen first
    assert batch.completion_mask.tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7]
    start = collate(rows, pad_token_id=0, max_length=5, truncation_mode="keep_start")
    assert start.input_ids.tolist() == [[1, 5, 6, 7, 2], [1, 5, 6, 8, 9]]
    end = collate(rows, pad_token_id=0, max_length=4, truncation_mode="keep_end")
    assert end.input_ids.tolist() == [[5, 6, 7, 2], [8, 9, 9, 2]]
    assert end.completion_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_model_forward_skips_the_shared_prompt_and_changes_nothing(tiny_model):
    """The LM head runs only from the first position any sequence scores (logits_to_keep); the
    log-probs, token metrics and gradients equal those of the full logits."""
    from transformers import AutoModelForCausalLM

    from raydpo.logprobs import completion_stats, model_completion_stats

    rows = [{"prompt_ids": [1, 5, 6, 4, 4], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 9, 2]},
            {"prompt_ids": [1, 5, 6, 4], "chosen_ids": [7, 7, 7, 2], "rejected_ids": [3, 2]}]
    batch = collate(rows, pad_token_id=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(out.logits.shape[1]))

    cut = model_completion_stats(model, batch)
    cut.logps.sum().backward()
    cut_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    full = completion_stats(full_logits, batch.input_ids, batch.completion_mask, metrics=True)
    full.logps.sum().backward()

    assert seen[0] == batch.input_ids.shape[1] - 3  # positions 0-2 predict prompt tokens of every row
    for name in ("logps", "entropy", "mean_logits", "correct", "tokens"):
        torch.testing.assert_close(getattr(cut, name), getattr(full, name), rtol=1e-5, atol=1e-5)
    for mine, reference in zip(cut_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # eager adds its mask: it gets an additive one
def test_shared_prompt_layout_equals_two_sequences(tiny_model, attention):
    """One prompt+chosen+rejected sequence per pair gives the two-sequence layout's log-probs, token
    metrics, LD weights and gradients, with completions cut by keep_start truncation; keep_end
    truncation that would cut the prompts differently falls back to two sequences."""
    from transformers import AutoModelForCausalLM

    from raydpo.data.batching import token_counts
    from raydpo.logprobs import model_completion_stats
    from raydpo.loss_weights import ld_weights

    rows = [{"prompt_ids": [1, 5, 6, 4, 4], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 9, 2, 3, 3, 3]},
            {"prompt_ids": [1, 5], "chosen_ids": [7, 7, 7, 2], "rejected_ids": [3, 2]}]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention)

    def run(batch):
        model.zero_grad()
        batch = dataclasses.replace(batch, logp_weights=ld_weights(batch.completion_mask, 0.5))
        stats = model_completion_stats(model, batch)
        (stats.logps.sum() + stats.token_logps.sum()).backward()
        return stats, [p.grad.clone() for p in model.parameters()]

    two = collate(rows, pad_token_id=0, max_length=9)
    shared = collate(rows, pad_token_id=0, max_length=9, share_prompt=True)
    assert shared.layout == SHARED_PROMPT and shared.gather_index is not None and shared.input_ids.shape[0] == 2
    assert token_counts(shared)[0] == token_counts(two)[0]  # TRL's count: prompts counted twice
    (a, grads_a), (b, grads_b) = run(two), run(shared)
    for name in ("logps", "token_logps", "tokens", "entropy", "mean_logits", "correct"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-5)
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=LAYOUT_GRAD_ATOL)
    assert collate(rows, 0, max_length=6, truncation_mode="keep_end", share_prompt=True).gather_index is None


@pytest.mark.parametrize("share_prompt, max_length, truncation_mode, attention", [
    (False, 9, "keep_start", "sdpa"), (True, 9, "keep_start", "sdpa"), (False, 6, "keep_end", "sdpa"),
    (False, None, "keep_start", "sdpa"), (False, 9, "keep_start", "eager"), (True, 9, "keep_start", "eager")])
def test_padding_free_layout_equals_two_sequences(tiny_model, share_prompt, max_length, truncation_mode, attention):
    """Every sequence end to end in one row, no pad token: the same log-probs, token metrics and
    gradients as the padded layout (LD-DPO weights and WPO's statistics included), keep_end too."""
    from transformers import AutoModelForCausalLM

    from raydpo.data.batching import PADDING_FREE, token_counts
    from raydpo.logprobs import model_completion_stats
    from raydpo.loss_weights import ld_weights

    rows = [{"prompt_ids": [1, 5, 6, 4, 4], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 9, 2, 3, 3, 3]},
            {"prompt_ids": [1, 5], "chosen_ids": [7, 7, 7, 2], "rejected_ids": [3, 2]},
            {"prompt_ids": [1, 6, 6], "chosen_ids": [9], "rejected_ids": [8, 8, 2]}]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention)

    def run(batch):
        model.zero_grad()
        batch = dataclasses.replace(batch, logp_weights=ld_weights(batch.completion_mask, 0.5))
        stats = model_completion_stats(model, batch, wpo=True)
        (stats.logps.sum() + stats.token_logps.sum()).backward()
        return stats, [p.grad.clone() for p in model.parameters()]

    options = dict(pad_token_id=0, max_length=max_length, truncation_mode=truncation_mode)
    padded = collate(rows, **options)
    free = collate(rows, **options, share_prompt=share_prompt, padding_free=True)
    assert free.layout == PADDING_FREE and free.input_ids.shape[0] == 1
    # no mask in the batch: its segments describe the row (logprobs makes each kernel's form of them)
    assert free.attention_mask is None and len(free.segments) == (len(rows) if share_prompt else 2 * len(rows))
    assert 0 not in free.input_ids.tolist()[0][1:]  # no pad token (0) in what the model reads
    counts_free, counts_padded = token_counts(free), token_counts(padded)
    assert counts_free[0] == counts_padded[0]  # TRL's count: prompts counted twice
    assert counts_free[1] == counts_free[2] < counts_padded[2]  # every position holds a token
    (a, grads_a), (b, grads_b) = run(padded), run(free)
    for name in ("logps", "token_logps", "tokens", "entropy", "mean_logits", "correct", "wpo"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(free.completion_mask.sum(1), padded.completion_mask.sum(1))  # ipo's token count
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=LAYOUT_GRAD_ATOL)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_padding_free_sdpa_attends_within_each_segment(tiny_model, share_prompt, monkeypatch):
    """Under sdpa a padding-free row reaches raydpo's attention as segments, which replace the dense
    mask: the right segments give the padded layout's log-probs, and a wrong description (one segment
    for the whole row) changes them, so the segments are what the model attends by. Every call without
    segments is transformers' own sdpa."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    import raydpo.segment_attention as segment_attention
    from raydpo.logprobs import model_completion_stats

    rows = [{"prompt_ids": [1, 5, 6, 4, 4], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 9, 2, 3, 3, 3]},
            {"prompt_ids": [1, 5], "chosen_ids": [7, 7, 7, 2], "rejected_ids": [3, 2]}]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    free = collate(rows, 0, padding_free=True, share_prompt=share_prompt)
    assert [end - start for start, end, _ in free.segments] == (
        [14, 8] if share_prompt else [7, 12, 6, 4])  # a pair with its prompt once, or each sequence
    seen, masks = [], []

    def calls(*args, **kwargs):
        seen.append(kwargs.get(segment_attention.SEGMENTS_KWARG))
        masks.append(args[4])
        return segment_attention.segment_sdpa(*args, **kwargs)

    segment_attention.install()
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", calls)
    padded = model_completion_stats(model, collate(rows, 0)).logps
    assert seen and all(s is None for s in seen)  # no segments: transformers' sdpa
    assert segment_attention._transformers_sdpa is sdpa_attention_forward
    seen.clear()
    segment_attention.pair_mask.cache_clear()
    monkeypatch.setattr(segment_attention, "_arrive", {})  # this model class not seen yet
    masks.clear()
    torch.testing.assert_close(model_completion_stats(model, free).logps, padded, rtol=1e-5, atol=1e-5)
    assert len(seen) == model.config.num_hidden_layers and all(s == free.segments for s in seen)
    # a shared-prompt pair's small mask is built once for the forward, not once per layer
    built = segment_attention.pair_mask.cache_info()
    assert (built.misses, built.hits) == ((2, 2 * (model.config.num_hidden_layers - 1)) if share_prompt else (0, 0))
    # the first forward also carried the row's structure without the segments (a dense mask, or the one
    # transformers builds from the position ids); once the segments were seen to arrive, a stand-in of one
    # stored element: no [1, 1, S, S] mask is built at all
    width = free.input_ids.shape[1]
    assert all(m.shape[-2:] == (width, width) and m.untyped_storage().nbytes() >= width * width for m in masks)
    assert segment_attention.segments_arrive(model)
    masks.clear()
    torch.testing.assert_close(model_completion_stats(model, free).logps, padded, rtol=1e-5, atol=1e-5)
    assert masks and all(m.shape[-2:] == (width, width) and m.untyped_storage().nbytes() == 1 for m in masks)
    whole_row = dataclasses.replace(free, segments=((0, free.input_ids.shape[1], ()),))
    assert not torch.allclose(model_completion_stats(model, whole_row).logps, padded, atol=1e-3)


def test_segments_only_go_to_sdpa_models_that_pass_keyword_arguments_on():
    from raydpo.segment_attention import SEGMENTS_KWARG, segment_kwargs

    class PassesThem(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            pass

    class DoesNot(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            pass

    segments = ((0, 3, ()),)
    assert segment_kwargs(PassesThem(), "sdpa", segments) == segment_kwargs(PassesThem(), None, segments) == {
        SEGMENTS_KWARG: segments}
    assert segment_kwargs(DoesNot(), "sdpa", segments) == {}  # the dense mask alone, which it reads
    assert segment_kwargs(PassesThem(), "eager", segments) == {}
    assert segment_kwargs(PassesThem(), "sdpa", None) == {}  # not a padding-free batch


@pytest.mark.parametrize("layout", ["padded", "shared_prompt", "padding_free"])
def test_chunked_lm_head_equals_full_logits_and_keeps_none(tiny_model, layout, monkeypatch):
    """Past FUSED_HEAD_BYTES the LM head runs chunk by chunk under activation checkpointing: the same
    log-probs, metrics, WPO statistics and gradients as the full logits, and no [N, L, V] logits tensor
    is saved for the backward (only [N, chunk, V] slices exist, one at a time)."""
    from transformers import AutoModelForCausalLM

    import raydpo.logprobs as logprobs
    from raydpo.logprobs import model_completion_stats
    from raydpo.loss_weights import ld_weights

    rows = [{"prompt_ids": [1, 5, 6, 4, 4], "chosen_ids": [7, 2, 5, 5, 6], "rejected_ids": [8, 9, 9, 2, 3, 3, 3]},
            {"prompt_ids": [1, 5], "chosen_ids": [7, 7, 7, 2], "rejected_ids": [3, 2]}]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    vocabulary = model.config.vocab_size
    batch = collate(rows, 0, max_length=12, share_prompt=layout == "shared_prompt", padding_free=layout == "padding_free")
    batch = dataclasses.replace(batch, logp_weights=ld_weights(batch.completion_mask, 0.5))

    def run(fused: bool):
        monkeypatch.setattr(logprobs, "FUSED_HEAD_BYTES", 0 if fused else 2 ** 62)
        monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 3 * 4 * vocabulary)  # 3 positions of 4 rows per chunk
        saved = []
        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            stats = model_completion_stats(model, batch, wpo=True)
        (stats.logps.sum() + stats.token_logps.sum()).backward()
        widest = max((shape[-2] for shape in saved if len(shape) == 3 and shape[-1] == vocabulary), default=0)
        return stats, [p.grad.clone() for p in model.parameters()], widest

    (full, grads_full, widest_full), (fused, grads_fused, widest_fused) = run(False), run(True)
    for name in ("logps", "token_logps", "tokens", "entropy", "mean_logits", "correct", "wpo"):
        torch.testing.assert_close(getattr(fused, name), getattr(full, name), rtol=1e-5, atol=1e-5)
    for x, y in zip(grads_full, grads_fused):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)
    assert widest_full > 3 and widest_fused == 0  # full: [N, L, V] logits kept; chunked: none at all
