"""Token metrics (entropy, token accuracy, mean logits) from logits, and the logging window's
aggregation across micro-batches and workers, each against a direct computation written here."""

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

from raydpo.data.batching import collate
from raydpo.logprobs import completion_stats
from raydpo.train.metrics import PAIR_METRICS, TOKEN_METRICS, MetricsWindow, token_metrics

ROWS = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 9, 2]},
        {"prompt_ids": [1, 5], "chosen_ids": [7, 7, 7, 2], "rejected_ids": [3, 2]}]


def direct_token_metrics(logits, batch):
    """TRL's definitions, token by token."""
    ids, mask = batch.input_ids, batch.completion_mask
    half = ids.shape[0] // 2
    entropy, tokens, correct, logit_sums, side_tokens = 0.0, 0, 0, [0.0, 0.0], [0, 0]
    for b in range(ids.shape[0]):
        side = 0 if b < half else 1
        for t in range(1, ids.shape[1]):
            if not mask[b, t]:
                continue
            z = logits[b, t - 1].double()
            p = torch.softmax(z, -1)
            entropy += -(p * torch.log(p)).sum().item()
            tokens += 1
            logit_sums[side] += z.mean().item()
            side_tokens[side] += 1
            if side == 0:  # accuracy on chosen tokens only; the first of tied maxima is the prediction
                correct += int(next(v for v in range(len(z)) if z[v] == z.max()) == ids[b, t].item())
    return {"entropy": entropy / tokens, "mean_token_accuracy": correct / side_tokens[0],
            "logits/chosen": logit_sums[0] / side_tokens[0], "logits/rejected": logit_sums[1] / side_tokens[1]}


def ratios(per_token):
    return {name: (s / n).item() for name, (s, n) in per_token.items()}


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_token_metrics_match_definition(chunk_size):
    batch = collate(ROWS, pad_token_id=0)
    torch.manual_seed(0)
    logits = torch.randn(*batch.input_ids.shape, 11)
    # Make the label of chosen row 0's first completion token tie with an earlier token: counts as wrong.
    logits[0, 2, 7] = logits[0, 2, 3] = logits[0, 2].max() + 1.0
    # And chosen row 1's first completion token the argmax outright: counts as right.
    logits[1, 1, 7] = logits[1, 1].max() + 1.0
    stats = completion_stats(logits, batch.input_ids, batch.completion_mask, metrics=True, chunk_size=chunk_size)
    got, want = ratios(token_metrics(stats)), direct_token_metrics(logits, batch)
    assert got == pytest.approx(want, rel=1e-5)


def test_entropy_of_a_peaked_distribution_keeps_float32_precision():
    """Two tied logits of 50 over a vocabulary of 32 near 0: entropy log 2 (the rest adds ~1e-20), and
    sum_v p_v^2 = 1/2 for WPO. Computed through exp(z - lse), lse's rounding (~4e-6 at 50.7) reaches
    every p and the entropy was 7e-5 off; normalised by the exponentials' own sum it is 1.4e-6 off, what
    rounding lse itself to float32 leaves (its spacing at 50.7 is 3.8e-6)."""
    batch = collate([{"prompt_ids": [1, 5], "chosen_ids": [7, 2], "rejected_ids": [8, 2]}], pad_token_id=0)
    torch.manual_seed(2)
    logits = torch.randn(*batch.input_ids.shape, 32) * 0.1
    logits[:, :, 3] = logits[:, :, 7] = 50.0
    stats = completion_stats(logits, batch.input_ids, batch.completion_mask, metrics=True, wpo=True)
    assert (stats.entropy / stats.tokens).tolist() == pytest.approx([math.log(2)] * 2, abs=2e-6)
    # WPO's per-sequence sum of log p_t - log sum_v p_v^2, from float64 softmaxes
    z = logits.double()
    direct = [sum(torch.log_softmax(z[b, t - 1], -1)[batch.input_ids[b, t]].item() - math.log(0.5)
                  for t in range(1, z.shape[1]) if batch.completion_mask[b, t]) for b in range(2)]
    assert stats.wpo.tolist() == pytest.approx(direct, abs=1e-5)


def test_bf16_logits_are_scored_in_float32():
    batch = collate(ROWS, pad_token_id=0)
    torch.manual_seed(1)
    logits = torch.randn(*batch.input_ids.shape, 11).bfloat16()
    stats = completion_stats(logits, batch.input_ids, batch.completion_mask, metrics=True, chunk_size=2)
    assert stats.logps.dtype == torch.float32
    assert ratios(token_metrics(stats)) == pytest.approx(direct_token_metrics(logits.float(), batch), rel=1e-5)


def micro_batch(seed, pairs=2):
    """Random (loss, per-pair, per-token, (tokens, filled, positions) of a [2 * pairs, 8] batch)."""
    g = torch.Generator().manual_seed(seed)
    per_pair = {name: torch.randn(pairs, generator=g) for name in PAIR_METRICS}
    per_token = {name: (torch.rand((), generator=g) * 10, torch.randint(1, 9, (), generator=g).float())
                 for name in TOKEN_METRICS}
    tokens = int(((torch.rand(2 * pairs, 8, generator=g) < 0.7)).sum())
    return torch.rand((), generator=g), per_pair, per_token, (tokens, tokens, 2 * pairs * 8)


def expected_window(workers):
    """TRL: per micro-batch, pair means over all workers' pairs and token ratios of summed (sum, count);
    the logged value is the plain mean over the window's micro-batches."""
    steps = len(workers[0])
    out = {"loss": sum(w[i][0].item() for w in workers for i in range(steps)) / (steps * len(workers))}
    for name in PAIR_METRICS:
        out[name] = sum(torch.cat([w[i][1][name] for w in workers]).mean().item() for i in range(steps)) / steps
    for name in TOKEN_METRICS:
        out[name] = sum(sum(w[i][2][name][0].item() for w in workers) / sum(w[i][2][name][1].item() for w in workers)
                        for i in range(steps)) / steps
    return out


def test_window_one_worker():
    batches = [micro_batch(s) for s in range(3)]
    window = MetricsWindow()
    for b in batches:
        window.add(*b)
    out = window.reduce()
    assert {k: out[k] for k in expected_window([batches])} == pytest.approx(expected_window([batches]), rel=1e-6)
    tokens = sum(b[3][0] for b in batches)
    assert out["num_tokens"] == tokens
    assert out["padding_fraction"] == pytest.approx(1 - tokens / (3 * 4 * 8))
    window.add(*micro_batch(9))
    assert window.reduce()["num_tokens"] == tokens + micro_batch(9)[3][0]  # running total


def _worker(rank, port, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    window = MetricsWindow()
    for step in range(3):
        window.add(*micro_batch(10 * rank + step))
    results[rank] = window.reduce()
    dist.destroy_process_group()


def test_window_two_workers_token_weighted():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, results), nprocs=2)
    workers = [[micro_batch(10 * rank + step) for step in range(3)] for rank in range(2)]
    want = expected_window(workers)
    for rank in range(2):
        got = results[rank]
        assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-6)
        assert got["num_tokens"] == sum(b[3][0] for w in workers for b in w)
    # Token-weighted across workers differs from the mean of the workers' own ratios.
    naive = sum(b[2]["entropy"][0].item() / b[2]["entropy"][1].item() for w in workers for b in w) / 6
    assert not math.isclose(naive, want["entropy"], rel_tol=1e-3)
