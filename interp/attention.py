"""Attention per iteration: which source positions each query position reads, per block and head."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from looplens.interp._common import (
    Queries,
    analysis_mode,
    as_tokens,
    check_cache,
    check_choice,
    check_n_iterations,
    check_positive_int,
    chunks,
    frame,
    layer_table,
    token_strings,
)
from looplens.models import LoopedTransformer

ATTENTION_COLUMNS = {
    "example": "int64",
    "layer": "int64",
    "stage": object,
    "iteration": "int64",
    "block": "int64",
    "head": "int64",
    "query_position": "int64",
    "key_position": "int64",
    "query_token": "int64",
    "key_token": "int64",
    "key_str": object,
    "weight": "float64",
}


def attention_by_iteration(
    model: LoopedTransformer,
    tokens: Queries,
    *,
    n_iterations: int | None = None,
    cache: Any = None,
    queries: str = "readout",
    batch_size: int = 256,
    progress: bool = True,
) -> pd.DataFrame:
    """Attention weights of every virtual layer and head (``blocks.{v}.attn.hook_pattern``).

    Args:
        queries: "readout" (the query position is each query's readout position) or "all" (every non-pad
            position).
        cache: a ``model.run_with_cache(tokens, n_iterations=T)`` cache to read instead of running.

    Returns:
        One row per (example, layer, head, query_position, key_position) with key_position <=
        query_position (the mask is causal). Columns: example (int64), layer, stage, iteration, block (as in
        :func:`interp.logit_lens`), head, query_position, key_position, query_token, key_token (int64),
        key_str (str), weight (float64, the attention probability; sums to 1 over key_position).
    """
    tokens = as_tokens(model, tokens)
    n = tokens.shape[0]
    T = check_n_iterations(model, n_iterations, cache)
    check_choice("queries", queries, ("readout", "all"))
    batch_size = check_positive_int("batch_size", batch_size)
    table = layer_table(model, T)
    names = [f"blocks.{v}.attn.hook_pattern" for v in table["layer"]]
    if cache is not None:
        check_cache(cache, names, n)
    parts = []
    with analysis_mode(model):
        readout = model.readout_positions(tokens)
        for sl in chunks(n, batch_size, progress, "attention"):
            if cache is None:
                _, c = model.run_with_cache(tokens[sl], n_iterations=T, names_filter=lambda x: x in names)
                stack = torch.stack([c[name] for name in names])
            else:
                stack = torch.stack([cache[name][sl] for name in names])
            # stack: [layer, batch, head, q_pos, k_pos]
            n_layers, b, n_heads, n_pos, _ = stack.shape
            r = readout[sl].to(stack.device)
            qpos = torch.arange(n_pos, device=stack.device)
            valid_q = qpos[None] == r[:, None] if queries == "readout" else qpos[None] <= r[:, None]
            bi, qi = valid_q.nonzero(as_tuple=True)
            w = stack[:, bi, :, qi, :].double().cpu().numpy()  # [m, layer, head, k_pos] (advanced index first)
            bi, qi = bi.cpu().numpy(), qi.cpu().numpy()
            mi, li, hi, ki = np.meshgrid(np.arange(len(bi)), np.arange(n_layers), np.arange(n_heads),
                                         np.arange(n_pos), indexing="ij")
            keep = (ki <= qi[mi]).reshape(-1)
            mi, li, hi, ki = (a.reshape(-1)[keep] for a in (mi, li, hi, ki))
            tok = tokens[sl].cpu().numpy()
            parts.append({
                "example": bi[mi] + sl.start, "layer_index": li, "head": hi, "query_position": qi[mi],
                "key_position": ki, "query_token": tok[bi[mi], qi[mi]], "key_token": tok[bi[mi], ki],
                "weight": w.reshape(-1)[keep],
            })
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((cols["key_position"], cols["query_position"], cols["head"], cols["layer_index"],
                        cols["example"]))
    cols = {k: v[order] for k, v in cols.items()}
    li = cols.pop("layer_index")
    for c in ("layer", "stage", "iteration", "block"):
        cols[c] = table[c].to_numpy()[li]
    cols["key_str"] = token_strings(model, cols["key_token"])
    return frame(cols, ATTENTION_COLUMNS)
