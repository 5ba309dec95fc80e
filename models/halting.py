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

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


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


@dataclass(frozen=True, init=False)
class LearnedExit(HaltingRule):
    """A trained exit gate as a rule (Ouro's Q-exit, models/exit.py): stop at the first iteration whose
    exit CDF ``1 - prod_{j<=t} (1 - lambda_j)`` reaches ``threshold``, lambda_j being ``head``'s gate
    (an :class:`looplens.models.exit.ExitHead`) on the readout state after iteration j.

    The CDF needs every gate from iteration 1, so the rule keeps each query's survival product between
    calls: it restarts at iteration 2 (forward_adaptive's first call, which also passes iteration 1's
    state) and must then see every iteration in order. forward_adaptive decides from iteration 2 on, so
    an exit the gate places at iteration 1 happens at 2 here; :func:`looplens.models.exit.forward_exit`
    can exit at 1.
    """

    head: nn.Module | None = None
    threshold: float = 0.5
    _memo: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __init__(self, head: nn.Module, threshold: float = 0.5, min_iterations: int = 2):
        # head first (LearnedExit(head, threshold=q)); the base class's fields come first in a dataclass
        for name, value in (("head", head), ("threshold", threshold), ("min_iterations", min_iterations),
                            ("_memo", {})):
            object.__setattr__(self, name, value)
        if isinstance(min_iterations, bool) or not isinstance(min_iterations, int) or min_iterations < 2:
            raise ValueError(f"min_iterations must be an integer >= 2 (forward_adaptive decides from iteration 2), "
                             f"got {min_iterations!r}")
        if not hasattr(self.head, "exit_lambda"):
            raise ValueError(f"LearnedExit needs an ExitHead as head, got {type(self.head).__name__}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float) \
                or not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be a probability in (0, 1], got {self.threshold!r}")

    def __call__(self, *, iteration: int, logprobs: Tensor, prev_logprobs: Tensor,
                 state: Tensor | None, prev_state: Tensor | None) -> Tensor:
        if state is None or prev_state is None:
            raise ValueError("LearnedExit reads the readout state: call it with state and prev_state")
        memo = self._memo
        if iteration == 2:  # a new run: iteration 1's gate from prev_state
            memo["survive"] = 1 - self.head.exit_lambda(prev_state, 0).float()
        elif memo.get("iteration") != iteration - 1 or memo["survive"].shape[0] != state.shape[0]:
            raise ValueError(f"LearnedExit must see every iteration in order from 2 (it keeps the exit CDF); "
                             f"called at iteration {iteration} after {memo.get('iteration')}")
        memo["survive"] = memo["survive"] * (1 - self.head.exit_lambda(state, iteration - 1).float())
        memo["iteration"] = iteration
        stop = 1 - memo["survive"] >= self.threshold
        if iteration < self.min_iterations:
            return torch.zeros_like(stop)
        return stop

    @property
    def name(self) -> str:
        return f"exit-cdf>={self.threshold:g}"


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
