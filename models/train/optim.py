"""Optimisation pieces: AdamW parameter groups, the LR schedule, Grokfast, OrthoGrad, StableMax.

Each is a small function or class with its own unit test; the trainer composes them per step as::

    loss.backward()
    grokfast.filter(model)        # optional: g <- g + lambda * EMA(g)
    orthogonalize_gradients(...)  # optional: remove the gradient component parallel to each weight
    clip_grad_norm_(...)          # optional
    optimizer.step()              # AdamW, LR from lr_at(step)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from looplens.models.train.config import OptimConfig
from torch import Tensor, nn


def parameter_group(name: str) -> str:
    """Which weight-decay group a parameter belongs to: "embeddings", "norms", "biases" or "weights".

    >>> [parameter_group(n) for n in ("embed.W_E", "core.0.ln1.w", "core.0.attn.b_Q", "core.0.mlp.W_in")]
    ['embeddings', 'norms', 'biases', 'weights']
    """
    parts = name.split(".")
    leaf = parts[-1]
    if leaf in ("W_E", "W_pos"):
        return "embeddings"
    if any(p.startswith("ln") for p in parts[:-1]) and leaf in ("w", "b", "weight", "bias"):
        return "norms"
    if leaf.startswith("b_") or leaf == "bias":
        return "biases"
    return "weights"


def make_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with two parameter groups: decayed weights, and the ``cfg.no_decay`` groups at decay 0.

    The groups keep ``model.named_parameters()`` order, so a state_dict saved by one process loads into
    the optimizer of another (exact resume).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if parameter_group(name) in cfg.no_decay else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)


def lr_at(step: int, cfg: OptimConfig, decay_steps: int | None) -> float:
    """Learning rate for optimizer step ``step`` (0-based, counted from the start of the schedule).

    Linear warm-up over ``warmup_steps`` (step 0 gets lr / warmup_steps, not 0), then constant, or a
    linear / cosine decay to ``min_lr_ratio * lr`` over ``decay_steps`` steps, flat afterwards.

    >>> from looplens.models.train.config import OptimConfig
    >>> c = OptimConfig(lr=1.0, warmup_steps=4, schedule="linear", min_lr_ratio=0.0)
    >>> [round(lr_at(s, c, decay_steps=4), 3) for s in range(10)]
    [0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    horizon = max(int(decay_steps or 1), 1)
    progress = min((step - cfg.warmup_steps) / horizon, 1.0)
    if cfg.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * factor)


class Grokfast:
    """Grokfast-EMA (Lee et al. 2024, "Grokfast: Accelerated Grokking by Amplifying Slow Gradients").

    After backward: ``ema <- alpha * ema + (1 - alpha) * g`` then ``g <- g + lambda * ema``, per
    parameter. The EMA is training state: it is saved in the resumable state so resume is exact.
    """

    def __init__(self, alpha: float, lamb: float):
        self.alpha = alpha
        self.lamb = lamb
        self.ema: dict[str, Tensor] = {}

    @torch.no_grad()
    def filter(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if param.grad is None:
                continue
            if name not in self.ema:
                self.ema[name] = param.grad.detach().clone()  # as the reference: start at the first gradient
            else:
                self.ema[name].mul_(self.alpha).add_(param.grad, alpha=1.0 - self.alpha)
            param.grad.add_(self.ema[name], alpha=self.lamb)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.ema.items()}

    def load_state_dict(self, state: dict[str, Tensor], device: torch.device | str) -> None:
        self.ema = {k: v.to(device) for k, v in state.items()}


@torch.no_grad()
def orthogonalize_gradients(params: list[nn.Parameter], eps: float = 1e-30) -> None:
    """⊥Grad (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability"): per weight tensor w with
    gradient g, replace g by g_perp = g - (<w, g> / <w, w>) w, rescaled to ||g||.

    Removing the component along w stops the updates that only scale the weights up (the "naive loss
    minimisation" direction that drives softmax towards collapse). Weights that are all zero are left
    alone (no direction to remove).
    """
    for w in params:
        g = w.grad
        if g is None:
            continue
        wf, gf = w.detach().reshape(-1).float(), g.reshape(-1).float()
        ww = torch.dot(wf, wf)
        if float(ww) <= eps:
            continue
        g_perp = gf - (torch.dot(wf, gf) / ww) * wf
        norm_perp = g_perp.norm()
        if float(norm_perp) > eps:
            g_perp = g_perp * (gf.norm() / norm_perp)
        g.copy_(g_perp.view_as(g).to(g.dtype))


def stablemax_log_probs(logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, "batch d_vocab"]:
    """log StableMax(x): s(x) = x + 1 for x >= 0, 1 / (1 - x) otherwise; p_i = s(x_i) / sum_j s(x_j).

    Prieto et al. 2025: softmax's exponential lets the loss keep falling by scaling logits up until
    float round-off zeroes the gradient ("softmax collapse"); s grows only linearly. Computed in float64
    as in their reference code.
    """
    x = logits.double()
    s = torch.where(x >= 0, x + 1.0, 1.0 / (1.0 - torch.clamp(x, max=0.0)))
    return (s.log() - s.sum(-1, keepdim=True).log()).float()


def answer_loss(
    answer_logits: Float[Tensor, "batch d_vocab"],
    targets: Int[Tensor, " batch"],
    kind: str = "softmax",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of the answers under softmax or StableMax, with label smoothing; ``reduction`` "mean"
    (a scalar) or "none" (one loss per answer)."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if kind == "softmax":
        return F.cross_entropy(answer_logits.float(), targets, label_smoothing=label_smoothing, reduction=reduction)
    logp = stablemax_log_probs(answer_logits)
    nll = -logp.gather(-1, targets[:, None]).squeeze(-1)
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    return nll.mean() if reduction == "mean" else nll
