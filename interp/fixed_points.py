"""Fixed points of the loop: does the state settle, how fast, and how contractive is one iteration there.

Notation: h_t is the state after iteration t (``loop.{t}.hook_state``, 0-based) and h_{-1} the loop's
input (the embedding, or the prelude's output). One iteration is the map h -> F(h) = iterate(h, t,
injected); at iterations t >= 1 it is the same map for every t (shared weights, and input injection, if
any, applies from t = 1 on).
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from looplens.interp._common import (
    Queries,
    analysis_mode,
    as_tokens,
    check_choice,
    check_positive_int,
    chunks,
    frame,
)
from looplens.models import LoopedTransformer
from torch import Tensor

FIXED_POINT_COLUMNS = {
    "example": "int64",
    "measure": object,
    "iteration": "int64",
    "block": "int64",
    "head": "int64",
    "position": "int64",
    "token": "int64",
    "is_readout": bool,
    "value": "float64",
}
FIXED_POINT_SUMMARY_COLUMNS = {
    "example": "int64",
    "position": "int64",
    "token": "int64",
    "is_readout": bool,
    "n_iterations": "int64",
    "tol": "float64",
    "converged": bool,
    "converged_iteration": "Int64",
    "final_relative_change": "float64",
}
SPECTRAL_COLUMNS = {
    "example": "int64",
    "n_iterations": "int64",
    "spectral_radius": "float64",
    "spectral_norm": "float64",
    "fixed_point_residual": "float64",
    "n_steps": "int64",
}
MEASURES = ("relative_change", "cosine_to_final", "norm", "attention_drift")


def _positions(model: LoopedTransformer, tokens: Tensor, positions: str) -> tuple[Tensor, Tensor]:
    """(rows, positions) of the cells to report: every non-pad position, or the readout position."""
    readout = model.readout_positions(tokens)
    if positions == "readout":
        return torch.arange(tokens.shape[0], device=tokens.device), readout
    valid = torch.arange(tokens.shape[1], device=tokens.device)[None] <= readout[:, None]
    return valid.nonzero(as_tuple=True)


def fixed_points(
    model: LoopedTransformer,
    tokens: Queries,
    *,
    n_iterations: int = 64,
    positions: str = "all",
    per_block: bool = True,
    attention: bool = True,
    batch_size: int = 128,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the loop ``n_iterations`` times and measure how the state moves, per iteration and position.

    Measures (column ``measure``; ``block`` -1 = the whole iteration's state h_t):
        relative_change, block -1: ``|h_t - h_{t-1}| / |h_{t-1}|`` for t = 0..T-1 (norms over d_model, at
            one position; h_{-1} is the loop's input).
        relative_change, block l: the same for resid_post of core block l, iteration t against t-1
            (t >= 1).
        cosine_to_final, block -1: ``cos(h_t, h_{T-1})``.
        norm, block -1: ``|h_t|``.
        attention_drift, block l, head h: total variation distance ``0.5 * sum_k |A_t[q, k] - A_{t-1}[q, k]|``
            between the attention of query position q at iterations t and t-1 (t >= 1), in [0, 1].

    Args:
        n_iterations: how far to run (default 64). positions: "all" (non-pad) or "readout".
        per_block, attention: also record the per-block changes / the attention drift.
        batch_size: queries per forward pass. progress: tqdm bar over batches.

    Returns:
        One row per measurement. Columns: example (int64), measure (str), iteration (int64, 0-based t),
        block (int64, -1 for the state), head (int64, -1 unless attention_drift), position (int64), token
        (int64), is_readout (bool), value (float64). See :func:`fixed_point_summary` for convergence.
    """
    tokens = as_tokens(model, tokens)
    T = check_positive_int("n_iterations", n_iterations)
    check_choice("positions", positions, ("readout", "all"))
    batch_size = check_positive_int("batch_size", batch_size)
    parts: list[pd.DataFrame] = []
    with analysis_mode(model):
        for sl in chunks(tokens.shape[0], batch_size, progress, "fixed points"):
            parts.append(_fixed_point_chunk(model, tokens[sl], sl.start, T, positions, per_block, attention))
    if not parts:
        return frame({c: [] for c in FIXED_POINT_COLUMNS}, FIXED_POINT_COLUMNS)
    out = pd.concat(parts, ignore_index=True)
    order = {m: i for i, m in enumerate(MEASURES)}
    out = out.sort_values(["example", "measure", "block", "head", "iteration", "position"], kind="stable",
                          key=lambda c: c.map(order) if c.name == "measure" else c)
    return out.reset_index(drop=True).astype(FIXED_POINT_COLUMNS)


def _fixed_point_chunk(model: LoopedTransformer, tok: Tensor, offset: int, T: int, positions: str, per_block: bool,
                       attention: bool) -> pd.DataFrame:
    L, P = model.cfg.n_blocks, model.cfg.n_prelude
    rows, pos = _positions(model, tok, positions)
    prev: dict[str, Tensor] = {}
    records: list[tuple[str, int, int, Tensor]] = []  # (measure, t, block, values [m] or [m, head])

    def on_resid(x: Tensor, hook: Any) -> None:
        t, l = divmod(int(hook.name.split(".")[1]) - P, L)
        if f"resid{l}" in prev:
            records.append(("relative_change", t, l, _rel_change(x, prev[f"resid{l}"])[rows, pos]))
        prev[f"resid{l}"] = x

    def on_pattern(x: Tensor, hook: Any) -> None:  # x: [batch, head, q_pos, k_pos]
        t, l = divmod(int(hook.name.split(".")[1]) - P, L)
        if f"pattern{l}" in prev:
            tv = 0.5 * (x - prev[f"pattern{l}"]).abs().sum(-1)  # [batch, head, q_pos]
            records.append(("attention_drift", t, l, tv[rows, :, pos]))
        prev[f"pattern{l}"] = x

    hooks = []
    for t in range(T):
        for l in range(L):
            v = model.virtual_layer(t, l)
            if per_block:
                hooks.append((f"blocks.{v}.hook_resid_post", on_resid))
            if attention:
                hooks.append((f"blocks.{v}.attn.hook_pattern", on_pattern))
    states = []
    with model.hooks(fwd_hooks=hooks):
        previous = None
        for step in model.steps(tok, T):
            before = step.loop_input if previous is None else previous  # h_{-1} is the loop's input
            records.append(("relative_change", step.iteration, -1, _rel_change(step.state, before)[rows, pos]))
            records.append(("norm", step.iteration, -1, step.state.norm(dim=-1)[rows, pos]))
            states.append(step.state[rows, pos])
            previous = step.state
    for t, s in enumerate(states):
        records.append(("cosine_to_final", t, -1, torch.nn.functional.cosine_similarity(s, states[-1], dim=-1)))
    is_readout = pos == model.readout_positions(tok)[rows]
    return _records_frame(records, (rows + offset).cpu().numpy(), pos.cpu().numpy(), tok[rows, pos].cpu().numpy(),
                          is_readout.cpu().numpy())


def _rel_change(new: Float[Tensor, "batch pos d_model"], old: Float[Tensor, "batch pos d_model"]
                ) -> Float[Tensor, "batch pos"]:
    return (new - old).norm(dim=-1) / old.norm(dim=-1)


def _records_frame(records: list[tuple[str, int, int, Tensor]], example: np.ndarray, position: np.ndarray,
                   token: np.ndarray, is_readout: np.ndarray) -> pd.DataFrame:
    cols: dict[str, list[np.ndarray]] = {c: [] for c in FIXED_POINT_COLUMNS}
    m = len(example)
    for measure, t, block, values in records:
        values = values.double().cpu()
        n_heads = values.shape[1] if values.ndim == 2 else 1
        head = np.repeat(np.arange(n_heads), m) if values.ndim == 2 else np.full(m, -1)
        k = m * n_heads
        cols["example"].append(np.tile(example, n_heads))
        cols["measure"].append(np.full(k, measure, dtype=object))
        cols["iteration"].append(np.full(k, t))
        cols["block"].append(np.full(k, block))
        cols["head"].append(head)
        cols["position"].append(np.tile(position, n_heads))
        cols["token"].append(np.tile(token, n_heads))
        cols["is_readout"].append(np.tile(is_readout, n_heads))
        cols["value"].append((values.T if values.ndim == 2 else values).reshape(-1).numpy())
    return frame({c: np.concatenate(v) for c, v in cols.items()}, FIXED_POINT_COLUMNS)


def fixed_point_summary(fixed: pd.DataFrame, tol: float | int = 1e-3) -> pd.DataFrame:
    """Per (example, position): the iteration from which the state's relative change stays below ``tol``.

    converged_iteration is the first t with relative_change(h_t) < tol at t and at every later iteration
    of the run (the change may dip below tol once and rise again: that is not convergence).

    Returns one row per (example, position). Columns: example, position, token (int64), is_readout
    (bool), n_iterations (int64, iterations run), tol (float64), converged (bool), converged_iteration
    (Int64, <NA> when not converged), final_relative_change (float64, at the last iteration).
    """
    if "measure" not in fixed.columns:
        raise ValueError("fixed_point_summary needs a fixed_points frame")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    df = fixed[(fixed["measure"] == "relative_change") & (fixed["block"] == -1)]
    keys = ["example", "position"]
    last_above = df["iteration"].where(df["value"] >= tol, -1).groupby([df[k] for k in keys]).max()
    info = df.groupby(keys).agg(token=("token", "first"), is_readout=("is_readout", "first"),
                                last=("iteration", "max"))
    final = df.sort_values("iteration").groupby(keys)["value"].last()
    out = info.join(last_above.rename("last_above")).join(final.rename("final_relative_change")).reset_index()
    out["n_iterations"] = out["last"] + 1
    out["tol"] = float(tol)
    out["converged"] = out["last_above"] < out["last"]
    out["converged_iteration"] = (out["last_above"] + 1).where(out["converged"]).astype("float64").astype("Int64")
    return out[list(FIXED_POINT_SUMMARY_COLUMNS)].astype(FIXED_POINT_SUMMARY_COLUMNS)


def _per_example_norm(x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, " batch"]:
    return x.flatten(1).norm(dim=-1)


def spectral_radius(
    model: LoopedTransformer,
    tokens: Queries,
    *,
    n_iterations: int = 64,
    n_steps: int = 100,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Local contraction of one loop iteration at the state reached after ``n_iterations`` iterations.

    J is the Jacobian of h -> F(h) (one more iteration, with the same injected input) at h_{T-1}, over the
    query's non-pad positions (padding cannot affect them: the mask is causal). Per query:
    spectral_radius ~ max |eigenvalue of J|, by power iteration with Jacobian-vector products and
    Gelfand's formula: the geometric mean of the growth factors ``|J v_k|`` over
    the second half of ``n_steps`` (exact for a dominant real eigenvalue and for a dominant complex pair,
    where plain power iteration oscillates). spectral_norm = largest singular value of J (power iteration
    on J^T J), an upper bound on the radius; < 1 means F is a contraction
    near h. A radius < 1 at a point where F(h) ~ h makes it a locally attracting fixed point.

    Returns one row per query. Columns: example (int64), n_iterations (int64), spectral_radius,
    spectral_norm (float64), fixed_point_residual (float64, ``|F(h) - h| / |h|`` over the query's
    positions: ~0 at a fixed point), n_steps (int64).
    """
    tokens = as_tokens(model, tokens)
    T = check_positive_int("n_iterations", n_iterations)
    n_steps = check_positive_int("n_steps", n_steps)
    batch_size = check_positive_int("batch_size", batch_size)
    gen = torch.Generator().manual_seed(seed)
    parts = []
    with analysis_mode(model):
        for sl in chunks(tokens.shape[0], batch_size, progress, "spectral radius"):
            tok = tokens[sl]
            (last,) = collections.deque(model.steps(tok, T), maxlen=1)
            state = last.state
            mask = (torch.arange(tok.shape[1], device=tok.device)[None] <= model.readout_positions(tok)[:, None])
            mask = mask[..., None].to(state.dtype)
            # SDPA has no forward-mode AD: a hook on the pattern selects the explicit attention path
            force = [(f"blocks.{model.virtual_layer(T, l)}.attn.hook_pattern", _identity) for l in range(model.cfg.n_blocks)]
            force += [(f"loop.{T}.fast.{s}.blocks.{l}.attn.hook_pattern", _identity)  # two-timescale loops' fast steps
                      for s in range(getattr(model.cfg, "slow_period", 0))
                      for l in range(getattr(model.cfg, "n_fast_blocks", None) or 0)]
            with model.hooks(fwd_hooks=force), torch.enable_grad():
                radius, norm, residual = _contraction(functools.partial(_one_more_iteration, model, tok, T, last.loop_input),
                                                      state, mask, n_steps, gen)
            parts.append(pd.DataFrame({
                "example": np.arange(sl.start, sl.stop), "n_iterations": T, "spectral_radius": radius,
                "spectral_norm": norm, "fixed_point_residual": residual, "n_steps": n_steps}))
    if not parts:
        return frame({c: [] for c in SPECTRAL_COLUMNS}, SPECTRAL_COLUMNS)
    return pd.concat(parts, ignore_index=True).astype(SPECTRAL_COLUMNS)


def _one_more_iteration(model: LoopedTransformer, tokens: Tensor, T: int, loop_input: Tensor | None,
                        h: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
    """F(h): iteration T (0-based) of the loop from state h, as the driver runs it (injection included)."""
    return next(model.steps(tokens, T + 1, start=T, state=h, loop_input=loop_input)).state


def _identity(x: Tensor, hook: Any) -> Tensor:
    return x


def _contraction(f: Any, h: Float[Tensor, "batch pos d_model"], mask: Float[Tensor, "batch pos 1"], n_steps: int,
                 gen: torch.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Power iterations with J v and J^T u from one autograd graph of F at h.

    J^T u is a vector-Jacobian product; J v is the "double-vjp" trick: g(u) = J^T u is linear in u, so
    the vjp of g with cotangent v is J v. (torch.func.jvp measured ~50x slower per product here, and
    forward-mode AD does not support SDPA.)
    """
    b = h.shape[0]
    h = h.detach().requires_grad_(True)
    fh = f(h)
    u0 = torch.zeros_like(fh, requires_grad=True)
    (jt_u0,) = torch.autograd.grad(fh, h, u0, create_graph=True)  # J^T u0, a linear function of u0

    def jv(v: Tensor) -> Tensor:
        return torch.autograd.grad(jt_u0, u0, v, retain_graph=True)[0] * mask

    def jtv(u: Tensor) -> Tensor:
        return torch.autograd.grad(fh, h, u, retain_graph=True)[0] * mask

    def unit(x: Tensor) -> Tensor:
        x = x * mask
        return x / _per_example_norm(x).clamp_min(1e-30)[:, None, None]

    v = unit(torch.randn(h.shape, generator=gen).to(h.device, h.dtype))
    logs = []
    for _ in range(n_steps):
        w = jv(v)
        growth = _per_example_norm(w)
        logs.append(growth.clamp_min(1e-30).log())
        v = unit(w)
    radius = torch.stack(logs[n_steps // 2:]).mean(0).exp()

    u = unit(torch.randn(h.shape, generator=gen).to(h.device, h.dtype))
    sigma2 = torch.zeros(b, device=h.device)
    for _ in range(n_steps):
        w = jtv(jv(u))
        sigma2 = _per_example_norm(w)
        u = unit(w)
    with torch.no_grad():
        residual = _per_example_norm((fh - h) * mask) / _per_example_norm(h * mask)
    return (radius.detach().double().cpu().numpy(), sigma2.detach().sqrt().double().cpu().numpy(),
            residual.double().cpu().numpy())


