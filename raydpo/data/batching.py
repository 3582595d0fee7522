"""Per-worker batches: a deterministic order per epoch, and padding into model inputs.

Pure functions of (rows, seed, epoch): a restarted worker rebuilds exactly the same batches, so a
resumed run neither repeats nor skips one.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from raydpo.data.images import image_inputs, num_images
from raydpo.loss_weights import ld_weights

PADDED = "padded"  # [2B, T]: every prompt+chosen sequence, then every prompt+rejected one (`collate`)
SHARED_PROMPT = "shared_prompt"  # [B, S]: one prompt+chosen+rejected sequence per pair (`collate_shared_prompt`)
PADDING_FREE = "padding_free"  # [1, S]: every sequence of the micro-batch end to end, no padding (`collate_padding_free`)


@dataclass
class Batch:
    """One micro-batch of B pairs as model inputs, built on the CPU (`collate`), moved with `.to(device)`.

    Whatever the layout, the log-probs are read per side, [2B, L] with chosen rows first:
    `completion_mask` marks the scored tokens of `scored_ids` (input_ids itself in the padded layout).
    """

    layout: str  # PADDED, SHARED_PROMPT or PADDING_FREE
    input_ids: torch.Tensor  # what the model reads: [2B, T] padded, [B, S] shared_prompt, [1, S] padding_free
    attention_mask: Optional[torch.Tensor]  # [2B, T] padded; [B, 1, S, S] boolean (shared prompt); None (padding-free)
    completion_mask: torch.Tensor  # [2B, L]: 1 on completion tokens, aligned with scored_ids
    num_tokens: int  # tokens as TRL counts them (chosen and rejected sequences' non-pad tokens: prompts twice)
    num_filled: int  # positions of input_ids that hold a token
    # The gathered layouts (shared_prompt, padding_free): the model reads input_ids once and the LM head runs
    # only on the hidden states that predict a scored token, gathered into the per-side layout.
    position_ids: Optional[torch.Tensor] = None  # restart per sequence (rejected: after the shared prompt)
    gather_index: Optional[torch.Tensor] = None  # [2B, L - 1] flat positions predicting each side token
    side_input_ids: Optional[torch.Tensor] = None  # [2B, L] each side's tokens, one leading slot
    images: Dict[str, torch.Tensor] = field(default_factory=dict)  # padded: the image processor's forward inputs
    ref_logps: Optional[torch.Tensor] = None  # [2B] float64 precomputed reference log-probs, chosen first
    logp_weights: Optional[torch.Tensor] = None  # LD-DPO token weights, aligned with completion_mask
    # padding_free: each sequence's (or shared-prompt pair's) (start, end, blocked (query, key) ranges) in the
    # row, so that sdpa attends within each alone (raydpo/segment_attention.py, which also makes other
    # kernels' dense mask of them)
    segments: Optional[Tuple] = None

    @property
    def scored_ids(self) -> torch.Tensor:
        """[2B, L] the tokens completion_mask marks, per side (chosen rows first)."""
        return self.input_ids if self.layout == PADDED else self.side_input_ids

    @property
    def gathered(self) -> bool:
        """The model's hidden states are gathered per side (shared_prompt, padding_free)."""
        return self.layout != PADDED

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(
            self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)
                     if isinstance(getattr(self, f.name), torch.Tensor)},
            images={name: value.to(device) for name, value in self.images.items()})


def micro_batches_per_epoch(num_rows: int, world_size: int, batch_size: int, accumulation: int) -> int:
    """Micro-batches each worker runs per epoch: enough for its largest shard, rounded up to whole
    optimizer steps (the extra slots repeat rows of the shard rather than drop any)."""
    largest_shard = math.ceil(num_rows / world_size)
    batches = math.ceil(largest_shard / batch_size)
    return math.ceil(batches / accumulation) * accumulation


GROUP_SPAN = 50  # batches per length-sorted group: wide enough to match lengths, narrow enough to stay random


def epoch_order(shard_size: int, num_batches: int, batch_size: int, seed: int, epoch: int,
                lengths: Optional[Sequence[int]] = None) -> List[List[int]]:
    """Row indices of each micro-batch for one epoch: a seeded shuffle, wrapped around to fill the
    last batches (like torch's DistributedSampler pads by repeating rows).

    With `lengths` (group_by_length), each run of GROUP_SPAN batches of the shuffle is sorted by
    length before it is cut into batches, and the batches are then shuffled: rows of similar length
    share a batch, so little compute goes to padding (transformers' LengthGroupedSampler idea)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(shard_size, generator=generator).tolist()
    needed = num_batches * batch_size
    order = (order * math.ceil(needed / shard_size))[:needed]
    if lengths is not None:
        span = GROUP_SPAN * batch_size
        order = [i for start in range(0, needed, span)
                 for i in sorted(order[start:start + span], key=lambda i: -lengths[i])]
    batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]
    if lengths is not None:
        batches = [batches[i] for i in torch.randperm(num_batches, generator=generator).tolist()]
    return batches


def truncate(tokens: list, max_length: Optional[int], truncation_mode: str) -> list:
    """TRL's per-sequence truncation: keep_start drops from the right, keep_end from the left."""
    if max_length is None or len(tokens) <= max_length:
        return tokens
    return tokens[:max_length] if truncation_mode == "keep_start" else tokens[-max_length:]


def collate(rows: Sequence[dict], pad_token_id: int, max_length: Optional[int] = None,
            truncation_mode: str = "keep_start", share_prompt: bool = False, image_processor=None,
            ld_alpha: Optional[float] = None, padding_free: bool = False) -> Batch:
    """Pad prompt+chosen and prompt+rejected into one [2B, T] batch (chosen first), right-padded,
    each sequence truncated on its own.

    completion_mask is 1 on completion tokens only: prompt and padding never enter the log-probs.
    Rows with ref_chosen_logps / ref_rejected_logps add `ref_logps` [2B] (chosen first).
    share_prompt: the shared-prompt layout of `collate_shared_prompt` when the batch allows it.
    Rows with images add the image processor's outputs to `images` (images.image_inputs).
    ld_alpha: LD-DPO's token weights (`loss_weights.ld_weights`), which policy and reference both read.
    padding_free: `collate_padding_free`'s one row, no padding (with share_prompt, each pair's prompt once).
    """
    if padding_free:
        share = share_prompt and can_share_prompt(rows, max_length, truncation_mode)
        return weighted(collate_padding_free(rows, pad_token_id, max_length, truncation_mode, share), ld_alpha)
    if share_prompt and can_share_prompt(rows, max_length, truncation_mode):
        return weighted(collate_shared_prompt(rows, pad_token_id, max_length), ld_alpha)
    # e.g. Qwen2.5-VL's mm_token_type_ids: the processor's types for a vision prompt, 0 for text
    types_key = next((row["token_types_key"] for row in rows if row.get("token_types_key")), None)
    sequences, completion_masks, token_types = [], [], []
    for side in ("chosen_ids", "rejected_ids"):
        for row in rows:
            prompt, completion = list(row["prompt_ids"]), list(row[side])
            sequences.append(truncate(prompt + completion, max_length, truncation_mode))
            completion_masks.append(truncate([0] * len(prompt) + [1] * len(completion), max_length, truncation_mode))
            if types_key:
                types = row.get("prompt_token_types")  # a list, or an array from Ray Data
                types = [0] * len(prompt) if types is None or len(types) == 0 else list(types)
                token_types.append(truncate(types + [0] * len(completion), max_length, truncation_mode))
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(sequences, completion_masks)):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
        completion_mask[i, : len(seq)] = torch.tensor(mask, dtype=torch.long)
    images = image_inputs(rows, image_processor)
    if types_key:  # passed to the forward like the pixel values
        types = torch.zeros_like(input_ids)
        for i, values in enumerate(token_types):
            types[i, :len(values)] = torch.tensor(values, dtype=torch.long)
        images[types_key] = types
    tokens = int(attention_mask.sum())
    batch = Batch(PADDED, input_ids, attention_mask, completion_mask, num_tokens=tokens, num_filled=tokens,
                  images=images, ref_logps=_reference_column(rows))
    return weighted(batch, ld_alpha)


def weighted(batch: Batch, ld_alpha: Optional[float]) -> Batch:
    """The batch with LD-DPO's token weights for ld_alpha (None: unweighted, the batch itself)."""
    if ld_alpha is None:
        return batch
    # the policy and the reference both read them from the batch, so they weight tokens alike
    return dataclasses.replace(batch, logp_weights=ld_weights(batch.completion_mask, ld_alpha))


def _reference_column(rows: Sequence[dict]) -> Optional[torch.Tensor]:
    """Precomputed reference log-probs (raydpo.reference.precompute) ride along, chosen first like the rows."""
    if rows and all(row.get("ref_chosen_logps") is not None and row.get("ref_rejected_logps") is not None
                    for row in rows):
        return torch.tensor([float(row["ref_chosen_logps"]) for row in rows]
                            + [float(row["ref_rejected_logps"]) for row in rows], dtype=torch.float64)
    return None


def scored_chosen_tokens(batch: Batch) -> int:
    """The chosen completions' scored tokens (as the log-probs count them: a completion token with a
    predictor, so not position 0): what sft averages over."""
    return int(batch.completion_mask.chunk(2)[0][:, 1:].sum())


def token_counts(batch: Batch) -> tuple:
    """(tokens as TRL counts them: the chosen and rejected sequences' non-pad tokens, so prompts twice;
    positions the batch fills with tokens; positions in all)."""
    return batch.num_tokens, batch.num_filled, batch.input_ids.numel()


def can_share_prompt(rows: Sequence[dict], max_length: Optional[int], truncation_mode: str) -> bool:
    """Every row has a prompt and no image, and truncation leaves chosen and rejected the same whole prompt."""
    if not rows or any(len(row["prompt_ids"]) == 0 or num_images(row) for row in rows):
        return False
    if truncation_mode == "keep_start" or max_length is None:
        return all(max_length is None or len(row["prompt_ids"]) < max_length for row in rows)
    return all(len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= max_length
               for row in rows)


@dataclass
class SharedPromptPair:
    """One pair as the shared-prompt layouts lay it out: prompt, chosen, rejected in one sequence, the
    completions cut to what max_length leaves after the prompt (TRL's keep_start, per sequence)."""
    prompt: List[int]
    chosen: List[int]
    rejected: List[int]

    @classmethod
    def of(cls, row: dict, max_length: Optional[int]) -> "SharedPromptPair":
        prompt = list(row["prompt_ids"])
        room = None if max_length is None else max_length - len(prompt)
        return cls(prompt, list(row["chosen_ids"])[:room], list(row["rejected_ids"])[:room])

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.chosen) + len(self.rejected)

    def tokens(self) -> List[int]:
        return self.prompt + self.chosen + self.rejected

    def positions(self) -> List[int]:
        """Rejected positions restart where chosen ones started: each completion sits after the prompt."""
        p, c, r = len(self.prompt), len(self.chosen), len(self.rejected)
        return list(range(p + c)) + list(range(p, p + r))

    def predictors(self, start: int) -> tuple:
        """For a pair whose first token sits at flat position `start`: the positions whose hidden states
        predict each chosen and each rejected token. Chosen token j sits at p + j and is predicted from
        p + j - 1; rejected token j sits at p + c + j and is predicted from p + c + j - 1, except the
        first, predicted from the last prompt token (p - 1), as in its own prompt+rejected sequence."""
        p, c, r = len(self.prompt), len(self.chosen), len(self.rejected)
        chosen = list(range(start + p - 1, start + p + c - 1))
        rejected = [start + p - 1] + list(range(start + p + c, start + p + c + r - 1))
        return chosen, rejected


def collate_shared_prompt(rows: Sequence[dict], pad_token_id: int, max_length: Optional[int] = None) -> Batch:
    """One sequence per pair, prompt + chosen + rejected, so the prompt is computed once, not twice.

    The attention mask [B, 1, S, S] is causal except that rejected tokens do not see chosen ones, and
    rejected positions restart where chosen ones started, so every token sees exactly what it would
    in its own prompt+completion sequence (TRL's layout, keep_start truncation per sequence).

    The log-probs are read in a per-side layout [2B, L] (chosen rows first, like `collate`):
    `gather_index` picks, for each scored completion token, the flat [B * S] position whose hidden
    state predicts it (the first chosen and the first rejected token are both predicted by the last
    prompt token); `side_input_ids` / `completion_mask` [2B, L + 1] are those tokens with one
    leading slot, shaped like `collate`'s input_ids / completion_mask so the same code scores them.
    """
    pairs = [SharedPromptPair.of(row, max_length) for row in rows]
    length = max(pair.length for pair in pairs)
    sides = max(max(len(pair.chosen), len(pair.rejected)) for pair in pairs)
    n = len(pairs)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    attention = torch.zeros((n, 1, length, length), dtype=torch.bool)
    gather_index = torch.zeros((2 * n, sides), dtype=torch.long)
    side_input_ids = torch.full((2 * n, sides + 1), pad_token_id, dtype=torch.long)
    side_completion_mask = torch.zeros((2 * n, sides + 1), dtype=torch.long)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for i, pair in enumerate(pairs):
        p, c, end = len(pair.prompt), len(pair.chosen), pair.length
        input_ids[i, :end] = torch.tensor(pair.tokens(), dtype=torch.long)
        position_ids[i, :end] = torch.tensor(pair.positions(), dtype=torch.long)
        mask = causal.clone()
        mask[:, end:] = False  # padding is never attended to
        mask[p + c:, p:p + c] = False  # rejected tokens (and padding) do not see chosen ones
        mask[end:, 0] = True  # padding queries see one token, so their softmax stays finite
        attention[i, 0] = mask
        chosen_from, rejected_from = pair.predictors(start=i * length)
        gather_index[i, :c] = torch.tensor(chosen_from, dtype=torch.long)
        gather_index[n + i, :len(pair.rejected)] = torch.tensor(rejected_from, dtype=torch.long)
        for side, tokens in ((i, pair.chosen), (n + i, pair.rejected)):
            side_input_ids[side, 1:1 + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            side_completion_mask[side, 1:1 + len(tokens)] = 1
    return Batch(SHARED_PROMPT, input_ids, attention, side_completion_mask,
                 num_tokens=sum(len(pair.prompt) + pair.length for pair in pairs),
                 num_filled=sum(pair.length for pair in pairs),
                 position_ids=position_ids, gather_index=gather_index, side_input_ids=side_input_ids,
                 ref_logps=_reference_column(rows))


def collate_padding_free(rows: Sequence[dict], pad_token_id: int, max_length: Optional[int] = None,
                         truncation_mode: str = "keep_start", share_prompt: bool = False) -> Batch:
    """Every pair of the micro-batch end to end in one row [1, S]: no pad token in what the model reads.

    Each pair is its prompt+chosen and prompt+rejected sequences (truncated as `collate` truncates
    them), or with share_prompt one prompt+chosen+rejected sequence (as `collate_shared_prompt`).
    Position ids restart per sequence, and no token sees another sequence: every token sees exactly
    what it sees in the padded layout. `segments` describes that structure per sequence (or pair), and
    the attention mask is None: raydpo's sdpa attends within each segment; without share_prompt any
    other kernel gets transformers' own form from the position ids (a block-causal mask for eager, a
    block mask for flex_attention, variable-length sequences for FlashAttention); with share_prompt,
    eager gets the dense [1, 1, S, S] mask the segments describe (segment_attention.dense_mask). Log-probs are read like the
    shared-prompt layout's (gather_index into the flat hidden states, the per-side layout).
    Images are not supported here (DPOTrainer refuses padding_free for vision rows).
    """
    if any(num_images(row) for row in rows):
        raise ValueError("padding_free does not lay out rows with images; set padding_free=False")
    tokens, positions, spans = [], [], []  # spans: (start, end, [(masked query range, key range)])
    sides = {"chosen_ids": [], "rejected_ids": []}  # per side and row: (side tokens, side mask, predictor positions)
    for row in rows:
        prompt = list(row["prompt_ids"])
        start = len(tokens)
        if share_prompt:  # one sequence: prompt, chosen, rejected; rejected skips chosen
            pair = SharedPromptPair.of(row, max_length)
            p, c, end = len(pair.prompt), len(pair.chosen), start + pair.length
            tokens += pair.tokens()
            positions += pair.positions()
            spans.append((start, end, [((start + p + c, end), (start + p, start + p + c))]))
            chosen_from, rejected_from = pair.predictors(start)
            sides["chosen_ids"].append(([pad_token_id] + pair.chosen, [0] + [1] * c, chosen_from))
            sides["rejected_ids"].append(([pad_token_id] + pair.rejected, [0] + [1] * len(pair.rejected),
                                          rejected_from))
            continue
        for side in ("chosen_ids", "rejected_ids"):  # two sequences, as `collate` truncates them
            completion = list(row[side])
            sequence = truncate(prompt + completion, max_length, truncation_mode)
            mask = truncate([0] * len(prompt) + [1] * len(completion), max_length, truncation_mode)
            offset = len(tokens)
            tokens += sequence
            positions += list(range(len(sequence)))
            spans.append((offset, offset + len(sequence), []))
            # The side starts one slot before its first scored position k (t >= 1: position 0 has no
            # predictor); the slot keeps its mask value, so the mask counts what `collate`'s does.
            k = next((t for t in range(1, len(sequence)) if mask[t]), max(len(sequence), 1))
            sides[side].append((sequence[k - 1:], mask[k - 1:], [offset + t - 1 for t in range(k, len(sequence))]))
    length = len(tokens)
    ordered = sides["chosen_ids"] + sides["rejected_ids"]  # chosen rows first, as in `collate`
    width = max(len(side_tokens) for side_tokens, _, _ in ordered)
    side_input_ids = torch.full((len(ordered), width), pad_token_id, dtype=torch.long)
    side_completion_mask = torch.zeros((len(ordered), width), dtype=torch.long)
    gather_index = torch.zeros((len(ordered), max(width - 1, 1)), dtype=torch.long)
    for i, (side_tokens, side_mask, predictors) in enumerate(ordered):
        side_input_ids[i, :len(side_tokens)] = torch.tensor(side_tokens, dtype=torch.long)
        side_completion_mask[i, :len(side_mask)] = torch.tensor(side_mask, dtype=torch.long)
        gather_index[i, :len(predictors)] = torch.tensor(predictors, dtype=torch.long)
    # TRL's count: each chosen and rejected sequence's tokens, so a shared prompt twice
    num_tokens = length + (sum(len(row["prompt_ids"]) for row in rows) if share_prompt else 0)
    # No dense mask: the segments describe the row, and logprobs gives each kernel its form of them
    # (raydpo's sdpa reads them; any other kernel gets segment_attention.dense_mask, or, with two
    # sequences per pair, the mask transformers builds from the position ids).
    return Batch(PADDING_FREE, torch.tensor([tokens], dtype=torch.long), None, side_completion_mask,
                 num_tokens=num_tokens, num_filled=length, position_ids=torch.tensor([positions], dtype=torch.long),
                 gather_index=gather_index, side_input_ids=side_input_ids, ref_logps=_reference_column(rows),
                 segments=tuple((start, end, tuple(blocked)) for start, end, blocked in spans))


def padding_free_lengths(rows: Sequence[dict], max_length: Optional[int] = None, truncation_mode: str = "keep_start",
                         share_prompt: bool = False) -> List[int]:
    """Each pair's tokens in `collate_padding_free`'s row of these rows: its two truncated sequences, or
    with share_prompt (where `collate` shares the rows' prompts) its prompt, chosen and rejected once."""
    if share_prompt and can_share_prompt(rows, max_length, truncation_mode):
        return [SharedPromptPair.of(row, max_length).length for row in rows]
    return [sum(len(truncate(list(row["prompt_ids"]) + list(row[side]), max_length, truncation_mode))
                for side in ("chosen_ids", "rejected_ids")) for row in rows]


def pieces_needed(lengths: Sequence[int], max_tokens: int) -> int:
    """How many contiguous pieces hold pairs of these lengths with at most max_tokens each (a pair longer
    than that is a piece alone)."""
    pieces, filled = 0, None
    for length in lengths:
        if filled is None or filled + length > max_tokens:
            pieces, filled = pieces + 1, length
        else:
            filled += length
    return pieces


def cut_pairs(lengths: Sequence[int], pieces: int, max_tokens: int) -> List[range]:
    """Exactly `pieces` contiguous, non-empty ranges of pair indices, in order, each within max_tokens (or
    one pair longer than it), for any `pieces` from `pieces_needed(lengths, max_tokens)` to len(lengths):
    pieces fill up to the budget, and close early only where the pairs left are as many as the pieces left."""
    if not pieces_needed(lengths, max_tokens) <= pieces <= len(lengths):
        raise ValueError(f"{len(lengths)} pairs cannot be cut into {pieces} pieces of at most {max_tokens} tokens")
    cuts, start, filled = [], 0, 0
    for i, length in enumerate(lengths):
        pieces_after = pieces - len(cuts) - 1  # pieces still to start after the current one
        if i > start and pieces_after and (filled + length > max_tokens or len(lengths) - i == pieces_after):
            cuts.append(range(start, i))
            start, filled = i, 0
        filled += length
    return cuts + [range(start, len(lengths))]
