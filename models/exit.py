"""Learned exits (Ouro-style): a per-iteration exit gate on a looped model, its exit distribution, the
entropy-regularised objective, and an adaptive forward that exits where the gate's CDF passes a threshold.

Ouro (Zhu et al. 2025, "Scaling Latent Reasoning via Looped Language Models", section 3) gives each
recurrent step t an exit gate ``lambda_t = sigmoid(w . h_t + b)`` read from that step's hidden state, and
turns the gates into a distribution over exit steps (the mass not yet spent goes to the last step T)::

    p(t) = lambda_t * prod_{j<t} (1 - lambda_j)        t < T
    p(T) =            prod_{j<T} (1 - lambda_j)

- Stage I (Ouro trains it jointly with the LM): minimise ``sum_t p(t) L_t - beta H(p)``, the expected
  per-step task loss minus an entropy bonus that keeps p from collapsing onto the last step (Ouro writes
  it as a KL to a uniform prior over steps: the same objective up to the constant log T).
- Stage II (gate only, LM frozen): the gate at step t is trained by binary cross-entropy toward
  "continue" where continuing improves the loss: ``I = max(0, L_t - L_{t+1})``, target continue
  probability ``w = sigmoid(k (I - gamma))`` (Ouro: k = 50, gamma = 0.005), target exit ``1 - w``.
- Inference: exit at the first t whose CDF ``sum_{s<=t} p(s)`` reaches a threshold q.

Here the LM is a trained looped model and stays frozen by default: :func:`train_exit_head` fits only the
gate, with the stage-I objective (``objective="entropy"``, the default) or stage II
(``objective="improvement"``); ``joint=True`` trains the model's weights with the gate on the stage-I
objective as Ouro does. Two departures, both because the LM is given rather than co-trained:

- With a frozen LM, stage I only rearranges exit mass over losses that are fixed: per query the optimum
  is ``p(t) ~ exp(-L_t / beta)``, so mass spreads evenly over every step whose loss is (near) the best
  one, and a CDF threshold lands inside that plateau rather than at its start. In Ouro the LM moves too
  (it learns to make early steps good where the gate exits early).
- Stage II's target for the gate at step t uses the improvement the *next* step would bring
  (``L_t - L_{t+1}``: what exiting at t forgoes); Ouro's text indexes the label at step t with the
  improvement ``L_{t-1} - L_t`` that step t has just made. The gate of the last step is not trained
  (the remaining mass exits there whatever it says).

The gate reads the residual state at each query's readout position, layer-normalised without affine
weights (the state's scale grows over iterations; the gate should see its direction), then one linear
unit: ``lambda_t = sigmoid(w . LN(h_t) + b)``, one ``(w, b)`` shared by all iterations, as in Ouro.

Hook names of :class:`ExitHead` (cached together with the model's own by ``head.run_with_cache(model,
tokens)``): ``loop.{t}.hook_exit_lambda`` [batch], the gate at iteration t (patching it changes the
distribution), and ``hook_exit_prob`` [batch, iteration], p(t).

>>> import torch
>>> exit_distribution(torch.tensor([[0.5, 0.5, 0.5]]))
tensor([[0.5000, 0.2500, 0.2500]])
>>> exit_iterations(torch.tensor([[0.2, 0.5, 0.3]]), threshold=0.6)
tensor([2])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from looplens.models.halting import KLEntropyHalting, KLHalting, LearnedExit
from looplens.models.hooked import host_checks
from looplens.models.looped import AdaptiveOutput
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

__all__ = [
    "ExitHead",
    "ExitTrace",
    "entropy_regularised_loss",
    "exit_distribution",
    "exit_iterations",
    "exit_vs_halting",
    "forward_exit",
    "improvement_loss",
    "train_exit_head",
]

OBJECTIVES = ("entropy", "improvement")


# ---------------------------------------------------------------------------------------------------
# The distribution and the objectives (plain tensor functions)
# ---------------------------------------------------------------------------------------------------
def _check_lambdas(lambdas: Tensor, what: str = "lambdas") -> None:
    if lambdas.ndim < 1 or lambdas.shape[-1] < 1:
        raise ValueError(f"{what} must have an iteration axis last ([..., iteration]), got shape {tuple(lambdas.shape)}")
    if host_checks(lambdas) and lambdas.numel() and bool(((lambdas < 0) | (lambdas > 1) | lambdas.isnan()).any()):
        raise ValueError(f"{what} must be probabilities in [0, 1]")


def exit_distribution(lambdas: Float[Tensor, "*batch iteration"]) -> Float[Tensor, "*batch iteration"]:
    """Ouro's exit distribution from per-step exit gates: ``p(t) = lambda_t prod_{j<t} (1 - lambda_j)``,
    the remaining mass ``prod_{j<T} (1 - lambda_j)`` at the last step (whose own gate is not used).
    Sums to one over the last axis. Computed in probability space (exact when a gate is 0 or 1)."""
    _check_lambdas(lambdas)
    survive = torch.cumprod(1 - lambdas, dim=-1)  # P(not exited after t)
    before = torch.cat([torch.ones_like(survive[..., :1]), survive[..., :-1]], dim=-1)  # P(reached t)
    exit_here = torch.cat([lambdas[..., :-1], torch.ones_like(lambdas[..., -1:])], dim=-1)
    return before * exit_here


def exit_iterations(probs: Float[Tensor, "*batch iteration"], threshold: float = 0.5) -> Int[Tensor, " *batch"]:
    """The 1-based step at which each query exits: the first t whose CDF reaches ``threshold`` (the last
    step if none does before it)."""
    _check_threshold(threshold)
    reached = probs.cumsum(-1) >= threshold
    reached[..., -1] = True  # the remaining mass exits at the last step (whatever float rounding says)
    return reached.int().argmax(-1) + 1


def _entropy(probs: Tensor) -> Tensor:
    # -sum p log p; the clamp keeps the gradient finite where a step has no mass (its term is 0 anyway)
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def _check_losses(probs: Tensor, losses: Tensor, what: str) -> None:
    if probs.shape != losses.shape:
        raise ValueError(f"losses must have the shape of {what} [batch, iteration]={tuple(probs.shape)}, "
                         f"got {tuple(losses.shape)}")


def entropy_regularised_loss(probs: Float[Tensor, "batch iteration"], losses: Float[Tensor, "batch iteration"],
                             beta: float = 0.1) -> Float[Tensor, ""]:
    """Ouro's stage-I objective, averaged over the batch: ``sum_t p(t) L_t - beta H(p)``.

    ``probs``: :func:`exit_distribution` of the gates; ``losses``: each query's task loss if it exited at
    each step. (Ouro's form, the KL of p to a uniform prior, differs by the constant ``beta log T``.)
    """
    _check_losses(probs, losses, "probs")
    _check_beta(beta)
    return ((probs * losses).sum(-1) - beta * _entropy(probs)).mean()


def improvement_loss(lambdas: Float[Tensor, "batch iteration"], losses: Float[Tensor, "batch iteration"],
                     k: float = 50.0, gamma: float = 0.005) -> Float[Tensor, ""]:
    """Ouro's stage-II gate loss, averaged over queries and steps 1..T-1: binary cross-entropy of each
    gate ``lambda_t`` against the target exit probability ``1 - sigmoid(k (I_t - gamma))``, where
    ``I_t = max(0, L_t - L_{t+1})`` (detached) is what continuing past step t gains (module docstring:
    Ouro indexes it one step earlier)."""
    _check_losses(lambdas, losses, "lambdas")
    _check_lambdas(lambdas)
    if lambdas.shape[-1] < 2:
        raise ValueError("improvement_loss needs at least 2 iterations (a step to continue to)")
    if not (isinstance(k, int | float) and k > 0 and isinstance(gamma, int | float) and gamma >= 0):
        raise ValueError(f"k must be > 0 and gamma >= 0, got k={k!r}, gamma={gamma!r}")
    losses = losses.detach()
    gain = (losses[:, :-1] - losses[:, 1:]).clamp_min(0)
    target_exit = 1 - torch.sigmoid(k * (gain - gamma))
    return F.binary_cross_entropy(lambdas[:, :-1].clamp(1e-7, 1 - 1e-7), target_exit)


# ---------------------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------------------
class ExitHooks(nn.Module):
    """Hook points of one iteration of an :class:`ExitHead`."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_exit_lambda = HookPoint()  # [batch], the exit gate lambda_t


@dataclass
class ExitTrace:
    """One run of a looped model with an exit head (:meth:`ExitHead.forward`)."""

    lambdas: Float[Tensor, "batch iteration"]  # gate lambda_t after each iteration
    probs: Float[Tensor, "batch iteration"]  # exit distribution p(t)
    answer_logits: Float[Tensor, "iteration batch d_vocab"]  # readout at each query's answer position


class ExitHead(HookedRootModule):
    """Ouro's exit gate for a looped model: ``lambda_t = sigmoid(w . LN(h_t) + b)`` on the readout state.

    ``max_iterations`` is T, the length of the exit distribution (the step that takes the remaining mass).
    Starts at w = 0, b = 0 (every gate 1/2: p(t) = 2^-t, the rest at T).

    >>> import torch
    >>> from looplens.models import LoopedConfig, LoopedTransformer
    >>> model = LoopedTransformer(LoopedConfig(d_vocab=9, n_ctx=3, d_model=8, n_heads=2, n_blocks=1, seed=0))
    >>> head = ExitHead.for_model(model, max_iterations=3)
    >>> trace, cache = head.run_with_cache(model, torch.tensor([[1, 2, 3]]))
    >>> cache["loop.2.hook_exit_lambda"], cache["hook_exit_prob"]
    (tensor([0.5000]), tensor([[0.5000, 0.2500, 0.2500]]))
    >>> cache["loop.2.hook_state"].shape  # the model's own hooks, same cache
    torch.Size([1, 3, 8])
    """

    def __init__(self, d_model: int, max_iterations: int):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive integer, got {d_model!r}")
        _check_T(max_iterations, "max_iterations")
        self.d_model = d_model
        self.max_iterations = max_iterations
        self.gate = nn.Linear(d_model, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.loop = nn.ModuleList()
        self.hook_exit_prob = HookPoint()  # [batch, iteration], p(t)
        self.history: pd.DataFrame | None = None  # set by train_exit_head: one row per training step
        self.grow_to(max_iterations)

    @classmethod
    def for_model(cls, model: Any, max_iterations: int | None = None) -> ExitHead:
        """A gate sized for ``model`` (its d_model, device), T = ``max_iterations`` (default: the model's
        iteration count)."""
        T = model.cfg.n_iterations if max_iterations is None else max_iterations
        return cls(model.cfg.d_model, T).to(model.W_E.device)

    def grow_to(self, n_iterations: int) -> None:
        """Give the head hook points for iterations 0..n_iterations-1 (a longer run than it was built for)."""
        if len(self.loop) >= n_iterations:
            return
        while len(self.loop) < n_iterations:
            self.loop.append(ExitHooks().to(self.gate.weight.device))
        self.setup()

    def exit_lambda(self, readout_state: Float[Tensor, "batch d_model"], iteration: int) -> Float[Tensor, " batch"]:
        """The gate of 0-based ``iteration`` on the state at each query's readout position (fires
        ``loop.{iteration}.hook_exit_lambda``)."""
        if readout_state.ndim != 2 or readout_state.shape[-1] != self.d_model:
            raise ValueError(f"readout_state must have shape [batch, d_model={self.d_model}], "
                             f"got {tuple(readout_state.shape)}")
        self.grow_to(iteration + 1)
        x = readout_state.to(self.gate.weight.dtype)
        normed = F.layer_norm(x, (self.d_model,))
        return self.loop[iteration].hook_exit_lambda(torch.sigmoid(self.gate(normed)[:, 0]))

    def exit_lambdas(self, readout_states: Float[Tensor, "batch iteration d_model"]) -> Float[Tensor, "batch iteration"]:
        """The gates of iterations 0..T-1 at once from stacked readout states (each iteration's hook fires)."""
        if readout_states.ndim != 3 or readout_states.shape[-1] != self.d_model:
            raise ValueError(f"readout_states must have shape [batch, iteration, d_model={self.d_model}], "
                             f"got {tuple(readout_states.shape)}")
        self.grow_to(readout_states.shape[1])
        x = readout_states.to(self.gate.weight.dtype)
        lam = torch.sigmoid(self.gate(F.layer_norm(x, (self.d_model,)))[..., 0])
        return torch.stack([self.loop[t].hook_exit_lambda(lam[:, t]) for t in range(lam.shape[1])], -1)

    def forward(self, model: Any, tokens: Any, n_iterations: int | None = None, *,
                model_grad: bool = False) -> ExitTrace:
        """Run ``model`` for T iterations (default ``max_iterations``) through its loop driver, gating
        each step: the gates, the exit distribution and the answer logits at every step, in one pass.

        ``model_grad``: let gradients reach the model (joint training); by default the model runs
        without autograd and only the gate is differentiable.
        """
        T = self.max_iterations if n_iterations is None else n_iterations
        _check_T(T, "n_iterations")
        self._check_model(model)
        tokens = model.check_tokens(tokens)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        steps = model.steps(tokens, T)
        grad = model_grad and torch.is_grad_enabled()
        lambdas, answers = [], []
        while True:
            with torch.set_grad_enabled(grad):  # the step (and its readout) computes here, in next()
                step = next(steps, None)
                if step is None:
                    break
                answers.append(step.answer_logits())
                state = step.state[rows, step.positions]
            lambdas.append(self.exit_lambda(state, step.iteration))
        lam = torch.stack(lambdas, dim=-1)
        probs = self.hook_exit_prob(exit_distribution(lam))
        return ExitTrace(lam, probs, torch.stack(answers))

    def run_with_cache(self, model: Any, tokens: Any, n_iterations: int | None = None, *,
                       names_filter: Any = None, **kwargs: Any) -> tuple[ExitTrace, ActivationCache]:
        """Cache the head's hooks *and* the model's in one run: ``cache["loop.{t}.hook_exit_lambda"]``
        beside ``cache["loop.{t}.hook_state"]`` and every ``blocks.{v}...`` name (a
        LoopedActivationCache when the model is a looplens model, so its aliases resolve)."""
        T = self.max_iterations if n_iterations is None else n_iterations
        _check_T(T, "n_iterations")
        self._check_model(model)
        self.grow_to(T)
        if hasattr(model, "prepare"):  # the model's hook points of a run of T iterations must exist to cache them
            model.prepare(T)
        model_cache, model_fwd, _ = model.get_caching_hooks(names_filter, **kwargs)
        head_cache, head_fwd, _ = self.get_caching_hooks(names_filter, **kwargs)
        with model.hooks(fwd_hooks=model_fwd), self.hooks(fwd_hooks=head_fwd):
            trace = self(model, tokens, T)
        cache = {**model_cache, **head_cache}
        if hasattr(model, "at_iterations"):
            from looplens.models.hooked import LoopedActivationCache

            return trace, LoopedActivationCache(cache, model.at_iterations(T))
        return trace, ActivationCache(cache, model)

    def _check_model(self, model: Any) -> None:
        d_model = getattr(getattr(model, "cfg", None), "d_model", None)
        if d_model is None or not hasattr(model, "steps"):
            raise TypeError(f"model must be a looped model with .steps() and .cfg.d_model (a LoopedTransformer "
                            f"or wrap_looped module), got {type(model).__name__}")
        if d_model != self.d_model:
            raise ValueError(f"this exit head reads d_model={self.d_model} states, the model has d_model={d_model}")


# ---------------------------------------------------------------------------------------------------
# Inference: exit where the CDF passes q
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def forward_exit(model: Any, head: ExitHead, tokens: Any, threshold: float = 0.5,
                 max_iterations: int | None = None) -> AdaptiveOutput:
    """Ouro's Q-exit: each query exits at the first step whose exit CDF reaches ``threshold`` (at
    ``max_iterations``, default the head's T, at the latest; p puts the remaining mass there). Unlike
    ``model.forward_adaptive`` (whose rules compare two readouts and so decide from iteration 2 on) a
    query can exit after iteration 1. Batched like forward_adaptive: the batch stops when every query has
    exited; an exited query's logits are frozen. ``halted``: the CDF reached the threshold (False: the
    query ran to the last step without it)."""
    _check_threshold(threshold)
    T = head.max_iterations if max_iterations is None else max_iterations
    _check_T(T, "max_iterations", minimum=1)
    head._check_model(model)
    tokens = model.check_tokens(tokens)
    n = tokens.shape[0]
    rows = torch.arange(n, device=tokens.device)
    active = torch.ones(n, dtype=torch.bool, device=tokens.device)
    halted = torch.zeros_like(active)
    iterations = torch.full((n,), T, dtype=torch.long, device=tokens.device)
    survive = torch.ones(n, device=tokens.device)  # P(not exited yet)
    final = None
    for step in model.steps(tokens, T):
        logits = step.answer_logits().float()
        final = logits if final is None else torch.where(active[:, None], logits, final)
        lam = head.exit_lambda(step.state[rows, step.positions], step.iteration).float()
        survive = survive * (1 - lam)
        stop = active & (1 - survive >= threshold)
        t = step.iteration + 1
        iterations = torch.where(stop, torch.full_like(iterations, t), iterations)
        halted |= stop
        active &= ~stop
        if not bool(active.any()):
            break
    return AdaptiveOutput(logits=final, iterations=iterations, halted=halted)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def _frozen_trajectories(model: Any, tokens: Tensor, answers: Tensor, T: int, batch_size: int, progress: bool
                         ) -> tuple[Float[Tensor, "n iteration d_model"], Float[Tensor, "n iteration"]]:
    """Readout states and answer losses of every query at every step, computed once (the LM is frozen)."""
    states, losses = [], []
    for start in tqdm(range(0, len(tokens), batch_size), desc="exit head: model states", disable=not progress,
                      leave=False):
        tok, ans = tokens[start : start + batch_size], answers[start : start + batch_size]
        rows = torch.arange(tok.shape[0], device=tok.device)
        s, l = [], []
        for step in model.steps(tok, T):
            s.append(step.state[rows, step.positions])
            l.append(F.cross_entropy(step.answer_logits().float(), ans, reduction="none"))
        states.append(torch.stack(s, 1))
        losses.append(torch.stack(l, 1))
    return torch.cat(states), torch.cat(losses)


def _objective(head: ExitHead, lambdas: Tensor, losses: Tensor, objective: str, beta: float, k: float,
               gamma: float) -> Tensor:
    if objective == "entropy":
        return entropy_regularised_loss(head.hook_exit_prob(exit_distribution(lambdas)), losses, beta)
    return improvement_loss(lambdas, losses, k, gamma)


def train_exit_head(
    model: Any,
    tokens: Any,
    answers: Tensor | None = None,
    *,
    objective: str = "entropy",
    beta: float = 0.1,
    k: float = 50.0,
    gamma: float = 0.005,
    n_iterations: int | None = None,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 512,
    joint: bool = False,
    head: ExitHead | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ExitHead:
    """Fit an Ouro exit gate to a trained looped model; returns the :class:`ExitHead` (``head.history``:
    a DataFrame with the objective and the mean expected exit step per training step).

    ``tokens``: query token ids with ``answers`` (one answer id per query), or an encoded split (an
    object with ``.tokens`` and ``.answers``, e.g. ``dataset.encode("train")``). T = ``n_iterations``
    (default: the head's ``max_iterations``, else the model's iteration count), at least 2.

    - ``objective="entropy"`` (default): Ouro's stage-I objective ``sum_t p(t) L_t - beta H(p)``. With
      ``joint=False`` (default) applied to the gate only, the model frozen: its states and per-step
      losses are computed once and the gate trains on them (Ouro trains stage I jointly, so the LM also
      learns to be good where the gate exits; here the losses are fixed and the optimum spreads exit mass
      over every near-best step: see the module docstring). ``joint=True`` trains the model's weights
      (in place, in its current train/eval mode) together with the gate, recomputing every step.
    - ``objective="improvement"``: Ouro's stage II (gate only, always): BCE toward continuing where the
      next step improves the loss by more than ``gamma`` (sharpness ``k``).

    Adam with learning rate ``lr`` on minibatches of ``batch_size`` queries drawn with ``seed``; a tqdm bar
    unless ``progress=False``.
    """
    tokens, answers = _check_data(tokens, answers)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    _check_beta(beta)
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(lr, int | float) and not isinstance(lr, bool) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not isinstance(joint, bool):
        raise ValueError(f"joint must be True or False, got {joint!r}")
    if joint and objective != "entropy":
        raise ValueError("joint=True trains the model with the stage-I objective; objective='improvement' "
                         "(stage II) trains the gate only, by definition")
    if head is None:
        head = ExitHead.for_model(model, n_iterations)
    T = head.max_iterations if n_iterations is None else n_iterations
    _check_T(T, "n_iterations", minimum=2)
    head._check_model(model)
    tokens = model.check_tokens(tokens)
    answers = answers.to(tokens.device)
    if int(answers.min()) < 0 or int(answers.max()) >= model.cfg.d_vocab:
        raise ValueError(f"answers must be token ids in [0, d_vocab={model.cfg.d_vocab})")
    head.max_iterations = T
    head.grow_to(T)

    params = list(head.parameters()) + (list(model.parameters()) if joint else [])
    optim = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = len(tokens)
    was_training = model.training
    if not joint:
        model.eval()  # the frozen LM's trajectories: no dropout
    log = []
    try:
        if not joint:
            states, losses = _frozen_trajectories(model, tokens, answers, T, max(batch_size, 1024), progress)
        for i in tqdm(range(steps), desc=f"exit head ({objective})", disable=not progress, leave=False):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(tokens.device)
            if joint:
                trace = head(model, tokens[idx], T, model_grad=True)
                lam = trace.lambdas
                step_losses = torch.stack([F.cross_entropy(lg.float(), answers[idx], reduction="none")
                                           for lg in trace.answer_logits], 1)
            else:
                lam = head.exit_lambdas(states[idx])
                step_losses = losses[idx]
            loss = _objective(head, lam, step_losses, objective, beta, k, gamma)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            with torch.no_grad():
                mean_exit = (exit_distribution(lam.detach()) * torch.arange(1, T + 1, device=lam.device)).sum(-1)
            log.append({"step": i + 1, "objective": float(loss.detach()), "expected_exit": float(mean_exit.mean())})
    finally:
        model.train(was_training)
        optim.zero_grad(set_to_none=True)
    head.history = pd.DataFrame(log)
    return head


# ---------------------------------------------------------------------------------------------------
# Analysis: the learned exit beside fixed counts and the KL / entropy rules
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def exit_vs_halting(
    model: Any,
    head: ExitHead,
    tokens: Any,
    answers: Tensor | None = None,
    hops: Tensor | None = None,
    *,
    max_iterations: int | None = None,
    threshold: float = 0.5,
    eps: float = 0.01,
    entropy: float = 3.0,
    batch_size: int = 1024,
    progress: bool = True,
) -> pd.DataFrame:
    """Accuracy and mean iterations used, per hop count, for every fixed iteration count 1..N and for
    per-query stopping rules, all capped at N = ``max_iterations`` (default the head's T):

    - ``"fixed"``: every query runs ``iterations`` iterations;
    - ``"KL only"`` / ``"KL+entropy"``: ``model.forward_adaptive`` with KL(p_t || p_t-1) < eps (and
      H(p_t) < ``entropy`` nats), the paper's rules (they decide from iteration 2 on);
    - ``"learned exit"``: :func:`forward_exit`, the gate's CDF reaching ``threshold`` (from iteration 1);
    - ``"learned exit, t >= 2"``: the same gate as a rule, ``forward_adaptive(tokens, LearnedExit(head))``,
      on the KL rules' footing (no exit before iteration 2).

    ``tokens`` / ``answers`` / ``hops`` as in :func:`train_exit_head` (an encoded split carries its
    ``.hops``; without hops every query counts as hop count 0). Columns: hops, method, iterations
    (the fixed count; 0 for the rules), accuracy, mean_iterations, n. Accuracy: argmax over the whole
    vocabulary equals the answer.
    """
    if hops is None and hasattr(tokens, "hops") and not isinstance(tokens, Tensor):
        hops = tokens.hops
    tokens, answers = _check_data(tokens, answers)
    _check_threshold(threshold)
    N = head.max_iterations if max_iterations is None else max_iterations
    _check_T(N, "max_iterations", minimum=1)
    head._check_model(model)
    tokens = model.check_tokens(tokens)
    answers = answers.to(tokens.device)
    if hops is None:
        hops = torch.zeros(len(tokens), dtype=torch.long)
    hops = torch.as_tensor(hops).to(tokens.device)
    if hops.shape != answers.shape:
        raise ValueError(f"hops must have shape [batch]={tuple(answers.shape)}, got {tuple(hops.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    rules = {"KL only": KLHalting(eps=eps), "KL+entropy": KLEntropyHalting(eps=eps, entropy=entropy),
             "learned exit, t >= 2": LearnedExit(head, threshold=threshold)}
    fixed_correct, used, correct = [], {m: [] for m in ["learned exit", *rules]}, {m: [] for m in ["learned exit", *rules]}
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(tokens), batch_size), desc="exit vs halting", disable=not progress,
                          leave=False):
            tok, ans = tokens[start : start + batch_size], answers[start : start + batch_size]
            per_t = torch.stack([step.answer_logits().argmax(-1) == ans for step in model.steps(tok, N)], 1)
            fixed_correct.append(per_t)
            outs = {"learned exit": forward_exit(model, head, tok, threshold, N)}
            outs |= {name: model.forward_adaptive(tok, rule, max_iterations=N) for name, rule in rules.items()}
            for name, out in outs.items():
                used[name].append(out.iterations)
                correct[name].append(out.logits.argmax(-1) == ans)
    finally:
        model.train(was_training)
    fixed = torch.cat(fixed_correct).float().cpu()
    frames = [pd.DataFrame({"hops": hops.cpu().numpy().repeat(N), "method": "fixed",
                            "iterations": torch.arange(1, N + 1).repeat(len(tokens)).numpy(),
                            "correct": fixed.reshape(-1).numpy(),
                            "used": torch.arange(1, N + 1).repeat(len(tokens)).float().numpy()})]
    for name in used:
        frames.append(pd.DataFrame({"hops": hops.cpu().numpy(), "method": name, "iterations": 0,
                                    "correct": torch.cat(correct[name]).float().cpu().numpy(),
                                    "used": torch.cat(used[name]).float().cpu().numpy()}))
    per_query = pd.concat(frames, ignore_index=True)
    table = per_query.groupby(["hops", "method", "iterations"], as_index=False, sort=False).agg(
        accuracy=("correct", "mean"), mean_iterations=("used", "mean"), n=("correct", "size"))
    order = {m: i for i, m in enumerate(["fixed", "KL only", "KL+entropy", "learned exit", "learned exit, t >= 2"])}
    table = table.sort_values(["hops", "method", "iterations"], key=lambda c: c.map(order) if c.name == "method" else c)
    return table.reset_index(drop=True)[["hops", "method", "iterations", "accuracy", "mean_iterations", "n"]]


# ---------------------------------------------------------------------------------------------------
# Argument checks (one-line errors)
# ---------------------------------------------------------------------------------------------------
def _check_T(value: Any, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_threshold(threshold: Any) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a probability in (0, 1], got {threshold!r}")


def _check_beta(beta: Any) -> None:
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not beta >= 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")


def _check_data(tokens: Any, answers: Any) -> tuple[Tensor, Tensor]:
    if answers is None and hasattr(tokens, "tokens") and hasattr(tokens, "answers"):
        tokens, answers = tokens.tokens, tokens.answers
    if answers is None:
        raise ValueError("answers are required (one answer token id per query), or pass an encoded split "
                         "with .tokens and .answers")
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a tensor of token ids (or an encoded split), got {type(tokens).__name__}")
    answers = torch.as_tensor(answers)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if answers.ndim != 1 or answers.shape[0] != tokens.shape[0]:
        raise ValueError(f"answers must have shape [batch]={tokens.shape[0]}, got {tuple(answers.shape)}")
    if answers.shape[0] == 0:
        raise ValueError("no queries: tokens has batch size 0")
    return tokens, answers.long()
