"""raydpo/flops.py's hardware-FLOPs count, by hand, on each batch layout (no model, no Ray).

The tiny shape: 1 layer of width 8, MLP 16, 2 heads of 4, vocabulary 16. Per forward that is
2 * 640 FLOPs per position the body runs on (q 64, k 64, v 64, o 64, MLP 384), 2 * 128 per position
the LM head runs on, and 2 * 1 * 8 * span^2 of attention per span.
"""

from transformers import LlamaConfig

from raydpo import flops
from raydpo.data.batching import PADDED, PADDING_FREE, SHARED_PROMPT, collate

CONFIG = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2)
PAIR = {"prompt_ids": [1, 2], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12]}  # p 2, c 2, r 3
LONG_PAIR = {"prompt_ids": [1, 2, 3, 4], "chosen_ids": [8, 9, 5, 6], "rejected_ids": [10]}  # p 4, c 4, r 1


def body(positions, spans):
    return 2 * 640 * positions + 2 * 8 * sum(s * s for s in spans)


def head(positions):
    return 2 * 128 * positions


def with_kernel(kernel):
    config = LlamaConfig(**CONFIG.to_dict())
    config._attn_implementation = kernel
    return config


def test_padded_layout_by_hand():
    batch = collate([PAIR], pad_token_id=0)
    assert batch.layout == PADDED and tuple(batch.input_ids.shape) == (2, 5)  # sequences of 4 and 5, one pad
    # the head starts at position 1 (its logits score token 2, the first completion token): 2 rows x 4
    assert flops.lm_head_positions(batch) == 8
    forward = body(10, [5, 5]) + head(8)  # sdpa runs both rows whole, the pad included
    assert flops.hardware_flops(CONFIG, batch) == 4 * forward  # policy 3 passes, reference 1
    assert flops.hardware_flops(CONFIG, batch, reference_forward=False) == 3 * forward
    # FlashAttention unpads: attention over the 4 and 5 real tokens (the matmuls still run the pad)
    assert flops.hardware_flops(with_kernel("flash_attention_2"), batch) == 4 * (body(10, [4, 5]) + head(8))


def test_shared_prompt_layout_by_hand():
    batch = collate([PAIR], pad_token_id=0, share_prompt=True)
    assert batch.layout == SHARED_PROMPT and tuple(batch.input_ids.shape) == (1, 7)  # p + c + r: the prompt once
    assert flops.lm_head_positions(batch) == 6  # gather_index [2 sides, max(c, r) = 3]
    # a [1, 1, 7, 7] mask: every kernel that takes it runs the row whole
    assert flops.hardware_flops(CONFIG, batch) == 4 * (body(7, [7]) + head(6))


def test_padding_free_layout_by_hand():
    batch = collate([PAIR], pad_token_id=0, padding_free=True)
    assert batch.layout == PADDING_FREE and tuple(batch.input_ids.shape) == (1, 9)  # 4 + 5, no pad
    assert batch.attention_mask is None  # sequences told apart by position ids
    assert flops.lm_head_positions(batch) == 6  # gather_index [2 sides, 3]
    # raydpo's sdpa attends within each sequence (segment_attention.py), as FlashAttention does; eager
    # gets the [9, 9] block-diagonal mask transformers builds: the whole row
    assert flops.attention_spans(batch, None) == flops.attention_spans(batch, "sdpa") == [4, 5]
    assert flops.hardware_flops(CONFIG, batch) == 4 * (body(9, [4, 5]) + head(6))
    assert flops.attention_spans(batch, "eager") == [9]
    # FlashAttention runs each sequence alone
    assert flops.attention_spans(batch, "flash_attention_2") == [4, 5]
    assert flops.hardware_flops(with_kernel("flash_attention_2"), batch) == 4 * (body(9, [4, 5]) + head(6))
    shared = collate([PAIR], pad_token_id=0, padding_free=True, share_prompt=True)  # a dense mask again
    assert flops.attention_spans(shared, "sdpa") == [7]  # one segment: the pair, its prompt once
    assert flops.hardware_flops(with_kernel("flash_attention_2"), shared) == 4 * (body(7, [7]) + head(6))


def test_gradient_checkpointing_recomputes_the_body_once():
    batch = collate([PAIR], pad_token_id=0)
    extra = flops.hardware_flops(CONFIG, batch, gradient_checkpointing=True) - flops.hardware_flops(CONFIG, batch)
    assert extra == body(10, [5, 5])


def test_another_trainers_head():
    """bench/compare_trl.py's TRL on CPU: the head on every position but the last, 4 passes for the policy."""
    batch = collate([PAIR], pad_token_id=0)
    trl = flops.hardware_flops(CONFIG, batch, head_positions=2 * 4, head_passes=4)
    assert trl == 4 * body(10, [5, 5]) + 5 * head(8)


def test_hardware_flops_against_model_flops():
    model = flops.step_flops(CONFIG, flops.sequence_lengths([PAIR], None))  # sequences of 4 and 5
    assert model == 4 * (body(9, [4, 5]) + head(9))
    # a prompt run once and the head on scored tokens only: less than the recipe's model FLOPs
    assert flops.hardware_flops(CONFIG, collate([PAIR], 0, share_prompt=True)) < model
    # padding adds hardware FLOPs, not model FLOPs: the short pair padded to the long one's width
    both, alone = [PAIR, LONG_PAIR], [[PAIR], [LONG_PAIR]]
    model_both = flops.step_flops(CONFIG, flops.sequence_lengths(both, None))
    assert model_both == sum(flops.step_flops(CONFIG, flops.sequence_lengths(rows, None)) for rows in alone)
    hardware_both = flops.hardware_flops(CONFIG, collate(both, 0))
    assert hardware_both > sum(flops.hardware_flops(CONFIG, collate(rows, 0)) for rows in alone)
    # and the same pairs padding-free (FlashAttention) run exactly each pair's own sequences
    packed = collate(both, 0, padding_free=True)
    assert flops.hardware_flops(with_kernel("flash_attention_2"), packed) < hardware_both
