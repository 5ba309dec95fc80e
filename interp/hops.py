"""Hop locator: where (iteration, block, position) each hop of a k-hop query is resolved.

A k-hop query ``e r_1 .. r_k`` visits bridge entities b_1 .. b_{k-1} and ends at the answer. Hop i's
target is b_i (i < k) or the answer (i = k). Under the logit lens, hop i is *resolved at position p from
layer v* when its target is the top-1 token at (v, p) and at every later virtual layer at p, i.e. at
(v', p) for all v <= v' <= the run's last layer (the embedding counts as layer -1). The hop's resolution
point is the earliest such layer over all positions (ties: the smallest position). A hop that is not
top-1 at the last layer of any position is never resolved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from looplens.interp._common import Queries, TokenIds, as_token_ids, as_tokens, check_choice
from looplens.interp.lens import hop_targets, logit_lens
from looplens.models import LoopedTransformer
from torch import Tensor

HOP_COLUMNS = {
    "example": "int64",
    "hops": "int64",
    "hop": "int64",
    "target": object,
    "target_token": "int64",
    "resolved": bool,
    "layer": "Int64",
    "stage": object,
    "iteration": "Int64",
    "block": "Int64",
    "position": "Int64",
    "depth_fraction": "float64",
    "final_rank": "int64",
}

HOP_SUMMARY_COLUMNS = {
    "hops": "int64",
    "hop": "int64",
    "target": object,
    "n": "int64",
    "n_resolved": "int64",
    "fraction_resolved": "float64",
    "fraction_never": "float64",
    "iteration_mean": "float64",
    "iteration_median": "float64",
    "layer_mean": "float64",
    "depth_fraction_mean": "float64",
}

HOP_DISTRIBUTION_COLUMNS = {
    "hops": "int64",
    "hop": "int64",
    "target": object,
    "resolved": bool,
    "iteration": "Int64",
    "count": "int64",
    "fraction": "float64",
}

_LENS_NEEDED = ("example", "target", "target_token", "layer", "stage", "iteration", "block", "position",
                "is_readout", "rank")


def locate_hops(
    model: LoopedTransformer,
    tokens: Queries,
    answers: TokenIds,
    bridges: Tensor | np.ndarray | Sequence[Sequence[int]] | None = None,
    *,
    n_iterations: int | None = None,
    cache: Any = None,
    positions: str = "all",
    entities_only: bool = False,
    batch_size: int = 256,
    progress: bool = True,
) -> pd.DataFrame:
    """Where each hop of each query is resolved (see the module docstring for the exact rule).

    Args:
        tokens: k-hop queries ``e r_1 .. r_k`` (ids or strings); k is read as the readout position.
        answers: answer token id per query. bridges: [n, max_hops - 1] bridge token ids, -1/0 padded
            (``EncodedSplit.bridges``); None locates the answer only.
        positions: "all" (search every non-pad position) or "readout" (only the answer slot).
        Other arguments as in :func:`interp.logit_lens`.

    Returns:
        One row per (example, hop), see :func:`resolve_hops` for the columns.
    """
    check_choice("positions", positions, ("readout", "all"))
    tokens = as_tokens(model, tokens)
    answers_t = as_token_ids(model, answers, tokens.shape[0], "answers")
    lens = logit_lens(model, tokens, hop_targets(answers_t, bridges), n_iterations=n_iterations, cache=cache,
                      positions=positions, entities_only=entities_only, batch_size=batch_size, progress=progress)
    return resolve_hops(lens)


def resolve_hops(lens: pd.DataFrame) -> pd.DataFrame:
    """Resolution point of each hop from a logit-lens frame (:func:`interp.logit_lens` with hop targets).

    Targets named "bridge_i" are hop i; "answer" is hop k, where k (column ``hops``) is the query's readout
    position. The frame must hold every layer (embedding to last) of each (example, target, position).

    Returns:
        One row per (example, hop), sorted. Columns: example (int64), hops (int64, k), hop (int64,
        1..k), target (str), target_token (int64), resolved (bool), layer / iteration / block / position
        (nullable Int64, <NA> when never resolved; the resolution point), stage (str or None),
        depth_fraction (float64, (layer + 1) / number of virtual layers: 0 = at the embedding, 1 = only
        at the last layer; comparable across looped and vanilla models), final_rank (int64, the target's
        best rank over positions at the last layer).
    """
    missing = [c for c in _LENS_NEEDED if c not in lens.columns]
    if missing:
        raise ValueError(f"resolve_hops needs a logit_lens frame; missing columns {missing}")
    if lens.empty:
        return pd.DataFrame({c: pd.Series(dtype=d) for c, d in HOP_COLUMNS.items()})
    df = lens[list(_LENS_NEEDED)]
    hops = df[df["is_readout"]].groupby("example")["position"].max().rename("hops")
    layers = np.sort(df["layer"].unique())
    last_layer = layers[-1]
    n_virtual = int(last_layer) + 1
    counts = df.groupby(["example", "target", "position"])["layer"].nunique()
    if bool((counts != len(layers)).any()) or not np.array_equal(layers, np.arange(layers[0], layers[-1] + 1)):
        raise ValueError("resolve_hops: every (example, target, position) needs all layers of the run")
    keys = ["example", "target", "position"]
    # last layer at which the target is not top-1 (below the first layer when it always is)
    miss = df["layer"].where(df["rank"] > 0, layers[0] - 1)
    last_miss = miss.groupby([df[k] for k in keys]).max()
    final = df[df["layer"] == last_layer].set_index(keys)["rank"]
    cells = pd.DataFrame({"last_miss": last_miss, "final_rank": final}).reset_index()
    resolved = cells["last_miss"] < last_layer
    nxt = np.searchsorted(layers, cells["last_miss"].to_numpy(), side="right")
    cells["layer"] = np.where(resolved, layers[np.minimum(nxt, len(layers) - 1)], np.iinfo(np.int64).max)
    cells = cells.sort_values(["example", "target", "layer", "position"], kind="stable")
    best = cells.groupby(["example", "target"], sort=False).head(1).set_index(["example", "target"])
    best_rank = cells.groupby(["example", "target"])["final_rank"].min()
    out = best[["position", "layer"]].join(best_rank.rename("final_rank")).reset_index()
    out["resolved"] = out["layer"] != np.iinfo(np.int64).max
    ident = df.drop_duplicates(["example", "target"]).set_index(["example", "target"])["target_token"]
    out = out.join(ident, on=["example", "target"]).join(hops, on="example")
    if out["hops"].isna().any():
        raise ValueError("resolve_hops: the lens frame has no readout rows for some example")
    out["hops"] = out["hops"].astype("int64")
    out["hop"] = _hop_number(out["target"], out["hops"])
    res = out["resolved"].to_numpy()
    out["layer"] = out["layer"].where(res)
    where = df.drop_duplicates("layer").set_index("layer")[["stage", "iteration", "block"]]
    out = out.join(where, on="layer")
    for col in ("layer", "position", "iteration", "block"):
        out[col] = out[col].where(res).astype("float64").astype("Int64")
    out["stage"] = out["stage"].where(res, None).astype(object)
    out["depth_fraction"] = (out["layer"].astype("float64") + 1) / n_virtual
    out = out.sort_values(["example", "hop"], kind="stable").reset_index(drop=True)
    return out[list(HOP_COLUMNS)].astype(HOP_COLUMNS)


def _hop_number(target: pd.Series, hops: pd.Series) -> np.ndarray:
    out = np.empty(len(target), dtype=np.int64)
    for i, (name, k) in enumerate(zip(target.to_numpy(), hops.to_numpy())):
        if name == "answer":
            out[i] = k
        elif isinstance(name, str) and name.startswith("bridge_") and name[7:].isdigit():
            out[i] = int(name[7:])
        else:
            raise ValueError(f"resolve_hops: target {name!r} is neither 'answer' nor 'bridge_<i>' (use hop_targets)")
    return out


def summarize_hops(located: pd.DataFrame) -> pd.DataFrame:
    """Per (hops, hop) over a dataset: how often and how early each hop is resolved.

    Returns one row per (hops, hop). Columns: hops, hop (int64), target (str), n (int64 queries),
    n_resolved (int64), fraction_resolved, fraction_never (float64), iteration_mean, iteration_median,
    layer_mean, depth_fraction_mean (float64, over resolved queries; NaN when none is).
    """
    _check_located(located)
    rows = []
    for (k, hop), g in located.groupby(["hops", "hop"], sort=True):
        r = g[g["resolved"]]
        n, nr = len(g), len(r)
        it = r["iteration"].astype(float)
        rows.append({
            "hops": k, "hop": hop, "target": g["target"].iloc[0], "n": n, "n_resolved": nr,
            "fraction_resolved": nr / n, "fraction_never": 1 - nr / n,
            "iteration_mean": it.mean() if nr else np.nan, "iteration_median": it.median() if nr else np.nan,
            "layer_mean": r["layer"].astype(float).mean() if nr else np.nan,
            "depth_fraction_mean": r["depth_fraction"].mean() if nr else np.nan,
        })
    return pd.DataFrame(rows, columns=list(HOP_SUMMARY_COLUMNS)).astype(HOP_SUMMARY_COLUMNS)


def hop_resolution_distribution(located: pd.DataFrame) -> pd.DataFrame:
    """Distribution of the resolving iteration per (hops, hop), never-resolved included.

    Returns one row per (hops, hop, resolving iteration) plus one row with resolved=False for queries never
    resolved. Columns: hops, hop (int64), target (str), resolved (bool), iteration (Int64, <NA> for the
    never-resolved row; -1 = before the loop), count (int64), fraction (float64, of the (hops, hop) group).
    """
    _check_located(located)
    rows = []
    for (k, hop), g in located.groupby(["hops", "hop"], sort=True):
        n = len(g)
        for it, c in g.loc[g["resolved"], "iteration"].astype("int64").value_counts().sort_index().items():
            rows.append((k, hop, g["target"].iloc[0], True, it, c, c / n))
        never = int((~g["resolved"]).sum())
        if never:
            rows.append((k, hop, g["target"].iloc[0], False, pd.NA, never, never / n))
    return pd.DataFrame(rows, columns=list(HOP_DISTRIBUTION_COLUMNS)).astype(HOP_DISTRIBUTION_COLUMNS)


def _check_located(located: pd.DataFrame) -> None:
    missing = [c for c in ("hops", "hop", "target", "resolved", "iteration", "layer") if c not in located.columns]
    if missing:
        raise ValueError(f"expected a locate_hops / resolve_hops frame; missing columns {missing}")
