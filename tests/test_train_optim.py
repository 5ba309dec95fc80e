"""Optimisation pieces and samplers: OrthoGrad, Grokfast, StableMax, LR schedule, weight-decay groups,
batch composition and the recurrence distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from looplens.models import LoopedConfig, LoopedTransformer
from looplens.models.train.config import OptimConfig, RecurrenceConfig
from looplens.models.train.optim import (
    Grokfast,
    answer_loss,
    lr_at,
    make_optimizer,
    orthogonalize_gradients,
    parameter_group,
    stablemax_log_probs,
)
from looplens.models.train.sampling import BatchSampler, IterationSampler

PAPER_DYNAMIC = {2: 0.238, 3: 0.195, 4: 0.195, 5: 0.156, 6: 0.104, 7: 0.060, 8: 0.051}


def test_orthograd_removes_the_parallel_component():
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
    g = torch.randn(6, 5, generator=gen) + 0.7 * w.detach()  # a clear parallel component
    w.grad = g.clone()
    zero = torch.nn.Parameter(torch.zeros(4))
    zero.grad = torch.ones(4)
    orthogonalize_gradients([w, zero])
    assert abs(float((w.grad * w.detach()).sum())) < 1e-4 * float(g.norm() * w.detach().norm())
    assert float((g * w.detach()).sum()) > 1.0  # the test input had a parallel component to remove
    torch.testing.assert_close(w.grad.norm(), g.norm())  # rescaled to the original norm
    # what is left is g's orthogonal part, up to that rescaling
    perp = g - (g * w.detach()).sum() / (w.detach() ** 2).sum() * w.detach()
    torch.testing.assert_close(w.grad / w.grad.norm(), perp / perp.norm())
    torch.testing.assert_close(zero.grad, torch.ones(4))  # a zero weight has no direction to remove


def test_grokfast_filter_matches_the_ema_formula():
    p = torch.nn.Parameter(torch.zeros(3))
    model = torch.nn.Module()
    model.p = p
    gf = Grokfast(alpha=0.5, lamb=2.0)
    grads = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 1.0, 0.0])]
    p.grad = grads[0].clone()
    gf.filter(model)
    torch.testing.assert_close(p.grad, grads[0] + 2.0 * grads[0])  # ema starts at the first gradient
    p.grad = grads[1].clone()
    gf.filter(model)
    ema = 0.5 * grads[0] + 0.5 * grads[1]
    torch.testing.assert_close(p.grad, grads[1] + 2.0 * ema)
    state = gf.state_dict()
    other = Grokfast(alpha=0.5, lamb=2.0)
    other.load_state_dict(state, "cpu")
    torch.testing.assert_close(other.ema["p"], ema)


def test_stablemax_definition_and_loss():
    x = torch.tensor([[2.0, -1.0, 0.0, -3.0]])
    s = torch.tensor([[3.0, 0.5, 1.0, 0.25]])
    torch.testing.assert_close(stablemax_log_probs(x), (s / s.sum()).log())
    targets = torch.tensor([0])
    torch.testing.assert_close(answer_loss(x, targets, "stablemax"), -(s[0, 0] / s.sum()).log())
    torch.testing.assert_close(answer_loss(x, targets, "softmax", 0.1), F.cross_entropy(x, targets, label_smoothing=0.1))
    smooth = answer_loss(x, targets, "stablemax", 0.1)
    logp = (s / s.sum()).log()[0]
    torch.testing.assert_close(smooth, 0.9 * -logp[0] - 0.1 * logp.mean())


def test_lr_schedules():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(10 + 50, cfg, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(10 + 100, cfg, 100) == pytest.approx(0.1)
    assert lr_at(10 + 500, cfg, 100) == pytest.approx(0.1)
    const = OptimConfig(lr=2.0, warmup_steps=0)
    assert {lr_at(s, const, None) for s in (0, 5, 10_000)} == {2.0}


def test_weight_decay_groups():
    model = LoopedTransformer(LoopedConfig(d_vocab=20, n_ctx=4, d_model=16, n_heads=2, n_blocks=2, n_iterations=2, seed=0))
    groups = {name: parameter_group(name) for name, _ in model.named_parameters()}
    assert groups["embed.W_E"] == "embeddings" and groups["pos_embed.W_pos"] == "embeddings"
    assert groups["core.0.ln1.w"] == "norms" and groups["ln_final.params.b"] == "norms"
    assert groups["core.1.attn.b_Q"] == "biases" and groups["unembed.b_U"] == "biases"
    assert groups["core.1.mlp.W_out"] == "weights"
    opt = make_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (groups[name] == "weights"), name
    everything = make_optimizer(model, OptimConfig(weight_decay=0.1, no_decay=[]))
    assert len(everything.param_groups) == 1
    assert sum(p.numel() for p in everything.param_groups[0]["params"]) == sum(p.numel() for p in model.parameters())


def test_batch_sampler_atomic_share_and_epochs():
    hops = np.array([1] * 10 + [2] * 30 + [3] * 60)
    s = BatchSampler(hops, batch_size=20, atomic_share=0.25, seed=0, max_hops=2)
    seen = [s.next_batch() for _ in range(6)]
    for rows in seen:
        assert (hops[rows] == 1).sum() == 5 and (hops[rows] == 2).sum() == 15 and (hops[rows] <= 2).all()
    composed = np.concatenate([r[hops[r] == 2] for r in seen[:2]])
    assert sorted(composed.tolist()) == list(range(10, 40))  # one epoch = every composed row once
    assert s.epoch == pytest.approx(3.0)
    natural = BatchSampler(hops, batch_size=25, atomic_share=None, seed=0)
    rows = np.concatenate([natural.next_batch() for _ in range(4)])
    assert sorted(rows.tolist()) == list(range(100))


def test_batch_sampler_state_round_trip():
    hops = np.array([1] * 7 + [2] * 13)
    a = BatchSampler(hops, batch_size=6, atomic_share=0.5, seed=3)
    for _ in range(5):
        a.next_batch()
    b = BatchSampler(hops, batch_size=6, atomic_share=0.5, seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        np.testing.assert_array_equal(a.next_batch(), b.next_batch())


def _chi_square(draws: np.ndarray, probs: dict[int, float]) -> float:
    n = len(draws)
    return sum((np.sum(draws == r) - n * p) ** 2 / (n * p) for r, p in probs.items())


def test_dynamic_recurrence_matches_clipped_poisson():
    sampler = IterationSampler(RecurrenceConfig(mode="poisson", mean=4.0, min=2, max=8), fixed=4, seed=0)
    exact = sampler.probabilities()
    for r, p in PAPER_DYNAMIC.items():  # the paper's numbers, to its 3 decimals
        assert exact[r] == pytest.approx(p, abs=0.0015)
    draws = np.array([sampler.sample() for _ in range(20_000)])
    assert set(np.unique(draws)) == set(PAPER_DYNAMIC)
    # 6 degrees of freedom: P(chi2 > 22.46) = 0.001
    assert _chi_square(draws, exact) < 22.46
    assert draws.mean() == pytest.approx(4.08, abs=0.05)
    # and it fails for a different distribution (the check can fail)
    shifted = IterationSampler(RecurrenceConfig(mode="poisson", mean=4.5, min=2, max=8), fixed=4, seed=0)
    assert _chi_square(np.array([shifted.sample() for _ in range(20_000)]), exact) > 22.46


def test_uniform_and_lognormal_recurrence():
    uni = IterationSampler(RecurrenceConfig(mode="uniform", min=3, max=6), fixed=4, seed=1)
    draws = np.array([uni.sample() for _ in range(8000)])
    assert _chi_square(draws, uni.probabilities()) < 16.27  # 3 dof, p = 0.001
    logn = IterationSampler(RecurrenceConfig(mode="poisson-lognormal", mean=4.0, sigma=0.5, min=1, max=32),
                            fixed=4, seed=2)
    draws = np.array([logn.sample() for _ in range(8000)])
    assert draws.min() >= 1 and draws.max() <= 32
    assert draws.mean() == pytest.approx(5.0, abs=0.15)  # E[Poisson(e^tau)] + 1 = mean + 1
    fixed = IterationSampler(RecurrenceConfig(mode="fixed"), fixed=7, seed=0)
    assert {fixed.sample() for _ in range(10)} == {7}


def test_iteration_sampler_state_round_trip():
    a = IterationSampler(RecurrenceConfig(mode="poisson"), fixed=4, seed=5)
    [a.sample() for _ in range(17)]
    b = IterationSampler(RecurrenceConfig(mode="poisson"), fixed=4, seed=6)
    b.load_state_dict(a.state_dict())
    assert [a.sample() for _ in range(50)] == [b.sample() for _ in range(50)]
    assert not math.isnan(a.probabilities()[2])
