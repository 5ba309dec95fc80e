"""Stage mirroring: does each iteration of a looped model re-enact a layer of its feed-forward twin?

Both models read the same queries. Every residual stream of each run (resid_post of every virtual layer,
optionally the embedding) is compared, for every (looped layer, vanilla layer) pair, by

- **linear CKA** (Kornblith et al. 2019) over the same rows (queries at their readout position, or every
  non-pad position): ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` with X, Y column-centred. 1 = the same
  representation up to rotation and isotropic scale; invariant to the two models' different bases.
- **logit-lens agreement**: the fraction of rows where the two streams, each decoded through its own
  model's final LayerNorm and unembedding, have the same top-1 token.

If loops re-enact stages, looped iteration t should be most similar to vanilla layer ~t (a diagonal).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from looplens.interp._common import (
    Queries,
    analysis_mode,
    as_tokens,
    check_choice,
    check_positive_int,
    chunks,
    decode,
    entity_ids,
    frame,
    layer_label,
    layer_table,
)
from looplens.models import LoopedTransformer
from torch import Tensor

MIRRORING_COLUMNS = {
    "looped_layer": "int64",
    "looped_stage": object,
    "looped_iteration": "int64",
    "looped_block": "int64",
    "vanilla_layer": "int64",
    "vanilla_stage": object,
    "vanilla_iteration": "int64",
    "vanilla_block": "int64",
    "cka": "float64",
    "lens_agreement": "float64",
    "n_rows": "int64",
}


def linear_cka(x: Float[Tensor, "n_x d1"], y: Float[Tensor, "n_y d2"]) -> float:
    """Linear CKA of two representations of the same rows (n_x == n_y; float64; 0 when either is constant).

    >>> x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    >>> q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
    >>> round(linear_cka(x, 3 * x @ q + 1), 6), linear_cka(x, torch.zeros(50, 2))
    (1.0, 0.0)
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: x and y must have the same rows, got {x.shape[0]} and {y.shape[0]}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    denom = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if float(denom) == 0.0:
        return 0.0
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2 / denom)


def _streams(model: LoopedTransformer, tokens: Tensor, T: int, positions: str, embed: bool, batch_size: int,
             progress: bool, candidates: Tensor | None, desc: str) -> tuple[Tensor, Tensor]:
    """(residual streams [layers, rows, d_model], lens top-1 tokens [layers, rows]) of one model's run."""
    n_layers = model.cfg.n_virtual_layers(T)
    names = (["blocks.0.hook_resid_pre"] if embed else []) + [f"blocks.{v}.hook_resid_post" for v in range(n_layers)]
    states, tops = [], []
    readout = model.readout_positions(tokens)
    for sl in chunks(tokens.shape[0], batch_size, progress, desc):
        _, cache = model.run_with_cache(tokens[sl], n_iterations=T, names_filter=lambda x: x in names)
        stack = torch.stack([cache[name] for name in names])  # [layers, batch, pos, d_model]
        if positions == "readout":
            rows = torch.arange(stack.shape[1], device=stack.device)
            picked = stack[:, rows, readout[sl]]
        else:
            valid = torch.arange(tokens.shape[1], device=tokens.device)[None] <= readout[sl, None]
            picked = stack[:, valid]
        logits = decode(model, picked)  # [layers, rows, d_vocab]: LN and unembedding act per row
        if candidates is not None:
            top = candidates[logits[..., candidates].argmax(-1)]
        else:
            top = logits.argmax(-1)
        states.append(picked.float().cpu())
        tops.append(top.cpu())
    return torch.cat(states, 1), torch.cat(tops, 1)


def stage_mirroring(
    looped: LoopedTransformer,
    vanilla: LoopedTransformer,
    tokens: Queries,
    *,
    n_iterations: int | None = None,
    vanilla_iterations: int | None = None,
    positions: str = "readout",
    embed: bool = False,
    entities_only: bool = False,
    batch_size: int = 256,
    progress: bool = True,
) -> pd.DataFrame:
    """Compare every layer of a looped run with every layer of its vanilla twin on the same queries.

    Args:
        looped, vanilla: two models over the same vocabulary (any looplens model, or a wrapped foreign
            one; "vanilla" is usually L' blocks x 1 iteration). Never modified.
        tokens: the queries (ids [batch, pos] or strings; strings are encoded with ``looped.vocab``).
        n_iterations, vanilla_iterations: each run's iteration count (default: each model's own).
        positions: rows compared: "readout" (each query's answer slot) or "all" (every non-pad position).
        embed: also compare the embeddings (layer -1, stage "embed").
        entities_only: lens top-1 over entity tokens only (needs ``looped.vocab``).
        batch_size: queries per forward pass. progress: tqdm bars.

    Returns:
        One row per (looped layer, vanilla layer), sorted by both. Columns: looped_layer,
        looped_iteration, looped_block, vanilla_layer, vanilla_iteration, vanilla_block (int64, as in
        :func:`interp.layer_table`; -1 = the embedding), looped_stage, vanilla_stage (str), cka (float64,
        linear CKA in [0, 1]), lens_agreement (float64, fraction of rows whose logit-lens top-1 tokens
        agree), n_rows (int64, rows compared).

    >>> from looplens.models import LoopedConfig, LoopedTransformer
    >>> cfg = LoopedConfig(d_vocab=9, n_ctx=3, d_model=8, n_heads=2, n_blocks=1, n_iterations=3, seed=0)
    >>> looped = LoopedTransformer(cfg)
    >>> vanilla = LoopedTransformer(cfg.replace(n_blocks=3, n_iterations=1, seed=1))
    >>> df = stage_mirroring(looped, vanilla, torch.randint(1, 9, (16, 3)), progress=False)
    >>> df.shape, df[["looped_layer", "vanilla_layer"]].iloc[-1].tolist()
    ((9, 11), [2, 2])
    """
    if looped.cfg.d_vocab != vanilla.cfg.d_vocab:
        raise ValueError(f"stage_mirroring: the models have different vocabularies (d_vocab {looped.cfg.d_vocab} "
                         f"and {vanilla.cfg.d_vocab}); they must read the same queries")
    check_choice("positions", positions, ("readout", "all"))
    batch_size = check_positive_int("batch_size", batch_size)
    tokens = as_tokens(looped, tokens)
    vanilla.check_tokens(tokens)
    T = looped.cfg.n_iterations if n_iterations is None else check_positive_int("n_iterations", n_iterations)
    Tv = vanilla.cfg.n_iterations if vanilla_iterations is None else check_positive_int("vanilla_iterations",
                                                                                         vanilla_iterations)
    if not torch.equal(looped.readout_positions(tokens), vanilla.readout_positions(tokens.to(vanilla.W_E.device))):
        raise ValueError("stage_mirroring: the models read the answer at different positions (pad_token_id differs)")
    candidates = entity_ids(looped) if entities_only else None
    with analysis_mode(looped), analysis_mode(vanilla):
        xs, x_top = _streams(looped, tokens, T, positions, embed, batch_size, progress, candidates, "mirroring: looped")
        v_tokens = tokens.to(vanilla.W_E.device)
        v_candidates = None if candidates is None else candidates.to(vanilla.W_E.device)
        ys, y_top = _streams(vanilla, v_tokens, Tv, positions, embed, batch_size, progress, v_candidates,
                             "mirroring: vanilla")
    lt, vt = layer_table(looped, T, embed=embed), layer_table(vanilla, Tv, embed=embed)
    cols: dict[str, list[Any]] = {c: [] for c in MIRRORING_COLUMNS}
    for i, lrow in enumerate(lt.itertuples(index=False)):
        for j, vrow in enumerate(vt.itertuples(index=False)):
            for prefix, row in (("looped", lrow), ("vanilla", vrow)):
                for key in ("layer", "stage", "iteration", "block"):
                    cols[f"{prefix}_{key}"].append(getattr(row, key))
            cols["cka"].append(linear_cka(xs[i], ys[j]))
            cols["lens_agreement"].append(float((x_top[i] == y_top[j]).double().mean()))
            cols["n_rows"].append(xs.shape[1])
    return frame(cols, MIRRORING_COLUMNS)


def mirroring_summary(mirroring: pd.DataFrame, value: str = "cka") -> pd.DataFrame:
    """Per looped layer: the vanilla layer it is most similar to (by ``value``), and how clearly.

    Returns one row per looped layer. Columns: looped_layer, looped_iteration, looped_block (int64),
    best_vanilla_layer (int64), best (float64, the value there), runner_up (float64, the next best over
    other vanilla layers; NaN with one vanilla layer), diagonal (float64, the value at vanilla layer ==
    looped layer, NaN where the vanilla run has no such layer).
    """
    _check_frame(mirroring, value)
    rows = []
    for layer, g in mirroring.groupby("looped_layer", sort=True):
        g = g.sort_values(value, ascending=False, kind="stable")
        diag = g.loc[g["vanilla_layer"] == layer, value]
        rows.append({
            "looped_layer": layer, "looped_iteration": g["looped_iteration"].iloc[0],
            "looped_block": g["looped_block"].iloc[0], "best_vanilla_layer": g["vanilla_layer"].iloc[0],
            "best": g[value].iloc[0], "runner_up": g[value].iloc[1] if len(g) > 1 else np.nan,
            "diagonal": diag.iloc[0] if len(diag) else np.nan,
        })
    dtypes = {"looped_layer": "int64", "looped_iteration": "int64", "looped_block": "int64",
              "best_vanilla_layer": "int64", "best": "float64", "runner_up": "float64", "diagonal": "float64"}
    return pd.DataFrame(rows, columns=list(dtypes)).astype(dtypes)


def _check_frame(mirroring: pd.DataFrame, value: str) -> None:
    missing = [c for c in ("looped_layer", "vanilla_layer", "looped_stage", "vanilla_stage") if c not in mirroring]
    if missing:
        raise ValueError(f"expected a stage_mirroring frame; missing columns {missing}")
    check_choice("value", value, ("cka", "lens_agreement"))


def _labels(df: pd.DataFrame, prefix: str) -> tuple[list[int], list[str]]:
    table = df.drop_duplicates(f"{prefix}_layer").sort_values(f"{prefix}_layer")
    labels = [layer_label(s, int(t), int(b)) for s, t, b in
              zip(table[f"{prefix}_stage"], table[f"{prefix}_iteration"], table[f"{prefix}_block"])]
    return table[f"{prefix}_layer"].tolist(), labels


def mirroring_heatmap(mirroring: pd.DataFrame, value: str = "cka") -> go.Figure:
    """Heatmap of a :func:`stage_mirroring` frame: looped layers (rows) x vanilla layers (columns),
    colour = ``value`` ("cka" or "lens_agreement") on the fixed range [0, 1].

    >>> df = pd.DataFrame({"looped_layer": [0, 0, 1, 1], "looped_stage": ["loop"] * 4,
    ...     "looped_iteration": [0, 0, 1, 1], "looped_block": [0] * 4, "vanilla_layer": [0, 1, 0, 1],
    ...     "vanilla_stage": ["loop"] * 4, "vanilla_iteration": [0] * 4, "vanilla_block": [0, 1, 0, 1],
    ...     "cka": [0.9, 0.2, 0.3, 0.8], "lens_agreement": [1.0, 0.0, 0.5, 1.0]})
    >>> fig = mirroring_heatmap(df)
    >>> fig.data[0].type, list(fig.data[0].y), list(fig.data[0].x)
    ('heatmap', ['t0.b0', 't1.b0'], ['t0.b0', 't0.b1'])
    """
    from looplens.interp.plots import SEQUENTIAL_COLORSCALE, UNIT_RANGE

    _check_frame(mirroring, value)
    rows, row_labels = _labels(mirroring, "looped")
    cols, col_labels = _labels(mirroring, "vanilla")
    grid = mirroring.pivot_table(index="looped_layer", columns="vanilla_layer", values=value, aggfunc="mean")
    grid = grid.reindex(index=rows, columns=cols)
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=col_labels, y=row_labels, colorscale=SEQUENTIAL_COLORSCALE,
                               zmin=UNIT_RANGE[0], zmax=UNIT_RANGE[1], colorbar={"title": value},
                               hovertemplate="looped %{y}<br>vanilla %{x}<br>" + value + " %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"Stage mirroring: {'linear CKA' if value == 'cka' else 'logit-lens agreement'}",
                      xaxis_title="vanilla layer", yaxis_title="looped layer (iteration.block)")
    return fig
