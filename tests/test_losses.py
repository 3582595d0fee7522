"""Every loss type and option against an independent computation written here from the formula
(plain Python floats, per pair), plus the log-prob inputs the options need (LD-DPO, WPO)."""

import math

import pytest
import torch

from raydpo import DPOConfig
from raydpo.data.batching import collate
from raydpo.logprobs import completion_logps, completion_stats, pair_logps
from raydpo.loss_weights import ld_weights
from raydpo.losses import LOSSES, PairLogps, dpo_loss

# Four pairs: summed log-probs of policy and reference, and completion lengths (chosen, rejected).
CHOSEN = [-12.0, -30.5, -7.25, -20.0]
REJECTED = [-14.0, -28.0, -9.5, -20.0]
REF_CHOSEN = [-13.0, -29.0, -8.0, -21.5]
REF_REJECTED = [-13.5, -29.5, -8.75, -19.0]
CHOSEN_TOKENS = [3.0, 7.0, 2.0, 5.0]
REJECTED_TOKENS = [4.0, 6.0, 2.0, 3.0]


def sig(v):
    return 1 / (1 + math.exp(-v))


def logsig(v):
    return -math.log1p(math.exp(-v)) if v >= 0 else v - math.log1p(math.exp(v))


def f_prime(u, kind, alpha):
    """f'(t) at t = exp(u), u a log-ratio (f-DPO, Table 1)."""
    t = math.exp(u)
    if kind == "reverse_kl" or (kind == "alpha_divergence" and alpha == 1.0):  # the limit alpha -> 1
        return math.log(t)
    if kind == "forward_kl":
        return 1 - 1 / t
    if kind == "js_divergence":
        return math.log(2 * t / (t + 1))
    return (t ** (alpha - 1) - 1) / (alpha - 1)


def expected(name, cfg):
    """Per-pair loss values [B] from the formulas."""
    b, eps = cfg.beta, cfg.label_smoothing
    lc = [c - r for c, r in zip(CHOSEN, REF_CHOSEN)]  # chosen log-ratios
    lr = [c - r for c, r in zip(REJECTED, REF_REJECTED)]
    sc = [f_prime(u, cfg.f_divergence_type, cfg.f_alpha_divergence_coef) for u in lc]
    sr = [f_prime(u, cfg.f_divergence_type, cfg.f_alpha_divergence_coef) for u in lr]
    d = [c - r for c, r in zip(sc, sr)]
    norm = [c / nc - r / nr for c, r, nc, nr in zip(sc, sr, CHOSEN_TOKENS, REJECTED_TOKENS)]
    cdpo = lambda z: -(1 - eps) * logsig(z) - eps * logsig(-z)  # noqa: E731
    if name == "sigmoid":
        return [-logsig(b * x) for x in d]
    if name == "hinge":
        return [max(0.0, 1 - b * x) for x in d]
    if name == "ipo":
        return [(x - 1 / (2 * b)) ** 2 for x in norm]
    if name == "exo_pair":
        return [sig(b * x) * (logsig(b * x) - math.log(1 - eps)) + sig(-b * x) * (logsig(-b * x) - math.log(eps))
                for x in d]
    if name == "nca_pair":
        return [-logsig(b * c) - 0.5 * logsig(-b * c) - 0.5 * logsig(-b * r) for c, r in zip(lc, lr)]
    if name == "robust":
        return [(-(1 - eps) * logsig(b * x) + eps * logsig(-b * x)) / (1 - 2 * eps) for x in d]
    if name == "bco_pair":
        return [-logsig(b * c) - logsig(-b * r) for c, r in zip(lc, lr)]
    if name == "sppo_hard":
        return [(c - 1 / (2 * b)) ** 2 + (r + 1 / (2 * b)) ** 2 for c, r in zip(lc, lr)]
    if name == "aot":
        policy = sorted(c - r for c, r in zip(CHOSEN, REJECTED))
        reference = sorted(c - r for c, r in zip(REF_CHOSEN, REF_REJECTED))
        return [cdpo(b * (p - q)) for p, q in zip(policy, reference)]
    if name == "aot_unpaired":
        return [cdpo(b * (c - r)) for c, r in zip(sorted(lc), sorted(lr))]
    if name == "apo_zero":
        return [1 - sig(b * c) + sig(b * r) for c, r in zip(lc, lr)]
    if name == "apo_down":
        return [sig(b * c) + 1 - sig(b * (c - r)) for c, r in zip(lc, lr)]
    if name == "discopop":
        mix = [sig(b * x / cfg.discopop_tau) for x in d]
        return [-logsig(b * x) * (1 - m) + math.exp(-b * x) * m for x, m in zip(d, mix)]
    if name == "sft":  # mean NLL over every chosen completion token of the batch
        return [-sum(CHOSEN) / sum(CHOSEN_TOKENS)] * len(CHOSEN)
    if name == "sigmoid_norm":
        return [-logsig(b * x) for x in norm]
    raise AssertionError(name)


def pair_inputs():
    t = lambda values: torch.tensor(values, dtype=torch.float64, requires_grad=True)  # noqa: E731
    chosen = t(CHOSEN)
    return PairLogps(chosen=chosen, rejected=t(REJECTED), ref_chosen=t(REF_CHOSEN), ref_rejected=t(REF_REJECTED),
                     chosen_tokens=torch.tensor(CHOSEN_TOKENS, dtype=torch.float64),
                     rejected_tokens=torch.tensor(REJECTED_TOKENS, dtype=torch.float64),
                     sft_logps=chosen, sft_tokens=torch.tensor(CHOSEN_TOKENS, dtype=torch.float64))


def check(name, **options):
    cfg = DPOConfig(loss_type=name, beta=options.pop("beta", 0.5), **options)
    x = pair_inputs()
    per_pair = LOSSES[name](x, cfg)
    torch.testing.assert_close(per_pair, torch.tensor(expected(name, cfg), dtype=torch.float64),
                               rtol=1e-6, atol=1e-9)
    loss = dpo_loss(x, cfg)
    assert loss.item() == pytest.approx(sum(expected(name, cfg)) / len(CHOSEN), rel=1e-6)
    loss.backward()
    grads = [g for g in (x.chosen.grad, x.rejected.grad) if g is not None]  # sft ignores the rejected side
    assert grads and all(torch.isfinite(g).all() for g in grads), name
    assert any(g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_matches_formula(name):
    options = {"label_smoothing": 0.1} if name in ("exo_pair", "robust", "aot", "aot_unpaired") else {}
    check(name, **options)


def test_every_trl_loss_is_registered():
    assert set(LOSSES) == {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                           "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}


@pytest.mark.parametrize("name", ["aot", "aot_unpaired", "robust"])
def test_label_smoothing_zero(name):
    check(name, label_smoothing=0.0)


def test_label_smoothing_does_not_enter_sigmoid():
    x = pair_inputs()
    smooth = LOSSES["sigmoid"](x, DPOConfig(label_smoothing=0.3))
    torch.testing.assert_close(smooth, LOSSES["sigmoid"](x, DPOConfig()))


@pytest.mark.parametrize("kind, alpha", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                                         ("alpha_divergence", 0.3), ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"])
def test_f_divergence(name, kind, alpha):
    options = {"label_smoothing": 0.1} if name in ("exo_pair", "robust") else {}
    check(name, f_divergence_type=kind, f_alpha_divergence_coef=alpha, **options)


def test_discopop_tau():
    check("discopop", discopop_tau=0.5)


def test_mpo_is_the_weighted_sum_of_its_parts():
    cfg = DPOConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.5)
    x = pair_inputs()
    parts = sum(w * sum(expected(n, cfg)) / len(CHOSEN) for n, w in zip(cfg.loss_types, cfg.weights))
    assert dpo_loss(x, cfg).item() == pytest.approx(parts, rel=1e-9)
    single = [dpo_loss(x, DPOConfig(loss_type=n, beta=0.5)) for n in cfg.loss_types]
    assert dpo_loss(x, cfg).item() == pytest.approx(sum(w * s.item() for w, s in zip(cfg.weights, single)))


def test_wpo_weights_each_pair():
    cfg = DPOConfig(loss_type=["sigmoid", "sft"], use_weighting=True, beta=0.5)
    x = pair_inputs()
    weights = [0.5, 0.25, 1.0, 0.75]
    x.weights = torch.tensor(weights, dtype=torch.float64)
    want = sum(sum(v * w for v, w in zip(expected(n, cfg), weights)) / len(CHOSEN) for n in cfg.loss_types)
    loss = dpo_loss(x, cfg)
    assert loss.item() == pytest.approx(want, rel=1e-9)
    loss.backward()
    assert torch.isfinite(x.chosen.grad).all()


# --- the inputs the options need, from logits ---

ROWS = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 9, 2]},
        {"prompt_ids": [1, 5], "chosen_ids": [7, 7, 7, 2], "rejected_ids": [3, 2]},
        {"prompt_ids": [1], "chosen_ids": [4, 4, 2], "rejected_ids": [10, 10, 2]}]


def batch_and_logits(seed=0, vocab=11):
    batch = collate(ROWS, pad_token_id=0)
    torch.manual_seed(seed)
    return batch, torch.randn(*batch.input_ids.shape, vocab, dtype=torch.float64)


def token_logps(logits, input_ids, completion_mask):
    """Per sequence, the list of log p(x_t | x_<t) over completion tokens, in order."""
    out = []
    for b in range(input_ids.shape[0]):
        out.append([torch.log_softmax(logits[b, t - 1], -1)[input_ids[b, t]].item()
                    for t in range(1, input_ids.shape[1]) if completion_mask[b, t]])
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ld_alpha_weights_the_longer_tail(alpha):
    batch, logits = batch_and_logits()
    per_token = token_logps(logits, batch.input_ids, batch.completion_mask)
    pairs = len(ROWS)
    want = []
    for side in (0, 1):
        for i in range(pairs):
            tokens = per_token[side * pairs + i]
            shared = min(len(per_token[i]), len(per_token[pairs + i]))
            want.append(sum(tokens[:shared]) + alpha * sum(tokens[shared:]))
    weights = ld_weights(batch.completion_mask, alpha)
    got = completion_logps(logits, batch.input_ids, batch.completion_mask, chunk_size=2, weights=weights)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-9)


def test_wpo_weights_from_logits():
    batch, logits = batch_and_logits(seed=1)
    stats = completion_stats(logits, batch.input_ids, batch.completion_mask, wpo=True, chunk_size=3)
    x = pair_logps(stats, stats.logps.detach(), batch.completion_mask, use_weighting=True)
    seq = []
    for b in range(batch.input_ids.shape[0]):
        terms = []
        for t in range(1, batch.input_ids.shape[1]):
            if batch.completion_mask[b, t]:
                p = torch.softmax(logits[b, t - 1], -1)
                terms.append(math.log(p[batch.input_ids[b, t]].item()) - math.log((p ** 2).sum().item()))
        seq.append(math.exp(sum(terms) / len(terms)))
    pairs = len(ROWS)
    want = [seq[i] * seq[pairs + i] for i in range(pairs)]
    torch.testing.assert_close(x.weights, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    assert not x.weights.requires_grad


def test_pair_inputs_for_sft_and_length_normalized_losses():
    batch, logits = batch_and_logits()
    logits.requires_grad_(True)
    stats = completion_stats(logits, batch.input_ids, batch.completion_mask, metrics=True)
    x = pair_logps(stats, stats.logps.detach(), batch.completion_mask)
    assert x.chosen_tokens.tolist() == [2, 4, 3] and x.rejected_tokens.tolist() == [4, 2, 3]
    per_token = token_logps(logits.detach(), batch.input_ids, batch.completion_mask)
    chosen_tokens = [t for seq in per_token[:len(ROWS)] for t in seq]
    sft = LOSSES["sft"](x, DPOConfig(loss_type="sft"))
    assert sft[0].item() == pytest.approx(-sum(chosen_tokens) / len(chosen_tokens), rel=1e-9)


def test_chunked_gradient_equals_plain_log_softmax():
    batch, logits = batch_and_logits(seed=2)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.25, -1.0], dtype=torch.float64)
    a = logits.clone().requires_grad_(True)
    (completion_logps(a, batch.input_ids, batch.completion_mask, chunk_size=2) * weights).sum().backward()
    b = logits.clone().requires_grad_(True)
    plain = torch.log_softmax(b[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    ((plain * batch.completion_mask[:, 1:]).sum(1) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


# --- refused combinations: ValueError at construction, naming the fields ---

@pytest.mark.parametrize("options, named", [
    ({"loss_type": "nope"}, ["loss_type", "sigmoid_norm", "apo_zero"]),  # the message lists the valid types
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, ["loss_weights", "loss_type"]),
    ({"loss_type": "exo_pair"}, ["label_smoothing", "exo_pair"]),
    ({"loss_type": "robust", "label_smoothing": 0.5}, ["label_smoothing", "robust"]),
    ({"loss_type": ["sigmoid", "aot"], "use_weighting": True}, ["use_weighting", "aot"]),
    ({"loss_type": "aot_unpaired", "use_weighting": True}, ["use_weighting", "aot_unpaired"]),
    ({"loss_type": ["sigmoid", "bco_pair"], "f_divergence_type": "js_divergence"}, ["f_divergence_type", "bco_pair"]),
    ({"f_divergence_type": "tv"}, ["f_divergence_type"]),
    ({"ld_alpha": 1.5}, ["ld_alpha"]),
    ({"discopop_tau": 0.0}, ["discopop_tau"]),
    ({"sync_ref_model": True, "precompute_ref_log_probs": True}, ["sync_ref_model", "precompute_ref_log_probs"]),
    ({"ref_model_mixup_alpha": 1.5}, ["ref_model_mixup_alpha"]),
    ({"ref_model_sync_steps": 0}, ["ref_model_sync_steps"]),
])
def test_refused_combinations(options, named):
    with pytest.raises(ValueError) as error:
        DPOConfig(**options)
    for field in named:
        assert field in str(error.value)


def test_accepted_combinations():
    DPOConfig(loss_type="robust", label_smoothing=0.49)
    DPOConfig(loss_type="exo_pair", label_smoothing=1e-3)
    DPOConfig(loss_type=["sigmoid", "sft", "discopop"], f_divergence_type="alpha_divergence", use_weighting=True,
              ld_alpha=0.0)
    cfg = DPOConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    assert cfg.weights == [0.8, 0.2, 1.0] and DPOConfig().weights == [1.0]
