"""Adaptive halting rules: decide per sample, after each iteration, whether the answer has settled.

A rule is called by :meth:`models.LoopedTransformer.forward_adaptive` after every iteration t >= 2
(1-based) with the readout log-probabilities and the readout residual state of iterations t and t-1,
and returns a bool tensor [batch]: True where the sample should stop *at t*.

The paper's rule (section "Adaptive halting") is :class:`KLEntropyHalting`: KL(p_t || p_{t-1}) < eps
AND H(p_t) < h, with eps = 0.01 and h = 3.0 nats; KL alone stops too early (the distribution can be
flat and stable during the first iterations).

>>> import torch
>>> rule = KLEntropyHalting(eps=0.01, entropy=3.0)
>>> p = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).log()
>>> bool(rule(iteration=2, logprobs=p, prev_logprobs=p, state=None, prev_state=None))
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def kl_divergence(logprobs: Tensor, prev_logprobs: Tensor) -> Tensor:
    """KL(p_t || p_{t-1}) per sample, in nats."""
    return (logprobs.exp() * (logprobs - prev_logprobs)).sum(-1)


def entropy(logprobs: Tensor) -> Tensor:
    """H(p) per sample, in nats."""
    return -(logprobs.exp() * logprobs).sum(-1)


@dataclass(frozen=True)
class HaltingRule:
    """Base class. ``min_iterations``: never halt before this (1-based) iteration."""

    min_iterations: int = 2

    def decide(self, logprobs: Tensor, prev_logprobs: Tensor, state: Tensor | None, prev_state: Tensor | None) -> Tensor:
        raise NotImplementedError

    def __call__(self, *, iteration: int, logprobs: Tensor, prev_logprobs: Tensor,
                 state: Tensor | None, prev_state: Tensor | None) -> Tensor:
        if iteration < self.min_iterations:
            return torch.zeros(logprobs.shape[0], dtype=torch.bool, device=logprobs.device)
        return self.decide(logprobs, prev_logprobs, state, prev_state)

    @property
    def name(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class KLHalting(HaltingRule):
    """Stop when KL(p_t || p_{t-1}) < eps."""

    eps: float = 0.01

    def decide(self, logprobs, prev_logprobs, state, prev_state):
        return kl_divergence(logprobs, prev_logprobs) < self.eps

    @property
    def name(self) -> str:
        return f"kl<{self.eps:g}"


@dataclass(frozen=True)
class EntropyHalting(HaltingRule):
    """Stop when H(p_t) < entropy (nats)."""

    entropy: float = 3.0

    def decide(self, logprobs, prev_logprobs, state, prev_state):
        return entropy(logprobs) < self.entropy

    @property
    def name(self) -> str:
        return f"H<{self.entropy:g}"


@dataclass(frozen=True)
class KLEntropyHalting(HaltingRule):
    """The paper's rule: KL(p_t || p_{t-1}) < eps AND H(p_t) < entropy."""

    eps: float = 0.01
    entropy: float = 3.0

    def decide(self, logprobs, prev_logprobs, state, prev_state):
        return (kl_divergence(logprobs, prev_logprobs) < self.eps) & (entropy(logprobs) < self.entropy)

    @property
    def name(self) -> str:
        return f"kl<{self.eps:g}&H<{self.entropy:g}"


@dataclass(frozen=True)
class LatentChangeHalting(HaltingRule):
    """Stop when the readout state's relative change |h_t - h_{t-1}| / |h_{t-1}| < tol (Huginn)."""

    tol: float = 0.01

    def decide(self, logprobs, prev_logprobs, state, prev_state):
        change = (state - prev_state).norm(dim=-1) / prev_state.norm(dim=-1).clamp_min(1e-12)
        return change < self.tol

    @property
    def name(self) -> str:
        return f"latent<{self.tol:g}"


def make_halting_rule(kind: str, *, eps: float = 0.01, entropy: float = 3.0, tol: float = 0.01,
                      min_iterations: int = 2) -> HaltingRule:
    """Build a rule by name: "kl", "entropy", "kl+entropy" or "latent"."""
    if kind == "kl":
        return KLHalting(min_iterations=min_iterations, eps=eps)
    if kind == "entropy":
        return EntropyHalting(min_iterations=min_iterations, entropy=entropy)
    if kind in ("kl+entropy", "kl_entropy"):
        return KLEntropyHalting(min_iterations=min_iterations, eps=eps, entropy=entropy)
    if kind == "latent":
        return LatentChangeHalting(min_iterations=min_iterations, tol=tol)
    raise ValueError(f"halting rule must be one of 'kl', 'entropy', 'kl+entropy', 'latent'; got {kind!r}")
