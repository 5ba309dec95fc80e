"""Logit lens over (iteration, block, position): what each residual stream decodes to.

Every residual stream of a run (the embedding, then resid_post of every virtual layer) is put through
the model's own final LayerNorm and unembedding, and scored against one or more target tokens per query
(the answer, the chain's bridge entities, or the model's own prediction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from looplens.interp._common import (
    Queries,
    TokenIds,
    analysis_mode,
    as_token_ids,
    as_tokens,
    check_cache,
    check_choice,
    check_n_iterations,
    check_positive_int,
    chunks,
    decode,
    distribution_stats,
    entity_ids,
    frame,
    layer_table,
    restrict,
    target_stats,
    to_candidate_index,
    token_strings,
)
from looplens.models import LoopedTransformer
from torch import Tensor

LENS_COLUMNS = {
    "example": "int64",
    "target": object,
    "target_token": "int64",
    "target_str": object,
    "layer": "int64",
    "stage": object,
    "iteration": "int64",
    "block": "int64",
    "position": "int64",
    "token": "int64",
    "token_str": object,
    "is_readout": bool,
    "rank": "int64",
    "prob": "float64",
    "logit": "float64",
    "margin": "float64",
    "entropy": "float64",
    "top_token": "int64",
    "top_str": object,
    "top_prob": "float64",
}

Targets = TokenIds | Mapping[str, TokenIds] | None


def hop_targets(
    answers: TokenIds, bridges: Tensor | np.ndarray | Sequence[Sequence[int]] | Sequence[Sequence[str]] | None = None
) -> dict[str, Any]:
    """The chain's entities as lens targets: ``{"bridge_1": ..., "bridge_{k-1}": ..., "answer": ...}``.

    ``bridges`` is [n, max_hops - 1] token ids, -1 (or 0) padded, as in ``EncodedSplit.bridges`` (or entity
    strings such as "e5"); ``answers`` one id (or string) per query.

    >>> hop_targets(torch.tensor([7, 8]), torch.tensor([[3], [-1]]))
    {'bridge_1': tensor([ 3, -1]), 'answer': tensor([7, 8])}
    """
    out: dict[str, Any] = {}
    if bridges is not None:
        b = bridges if isinstance(bridges, Tensor) else np.asarray(bridges)
        if b.ndim != 2:
            raise ValueError(f"bridges must be [n, max_hops - 1], got shape {tuple(b.shape)}")
        for i in range(b.shape[1]):
            column = b[:, i]
            out[f"bridge_{i + 1}"] = column.tolist() if isinstance(column, np.ndarray) and column.dtype.kind in "US" \
                else torch.as_tensor(column).long()
    out["answer"] = answers
    return out


def _normalise_targets(model: LoopedTransformer, targets: Targets, n: int) -> dict[str, Tensor] | None:
    if targets is None:
        return None
    if isinstance(targets, Mapping):
        if not targets:
            raise ValueError("targets: the mapping is empty")
        return {str(name): as_token_ids(model, ids, n, f"targets[{name!r}]") for name, ids in targets.items()}
    if isinstance(targets, Tensor | np.ndarray) and np.ndim(targets) == 2:
        t = torch.as_tensor(np.asarray(targets) if isinstance(targets, np.ndarray) else targets)
        return {f"target_{j}": as_token_ids(model, t[:, j], n, f"targets[:, {j}]") for j in range(t.shape[1])}
    return {"target": as_token_ids(model, targets, n, "targets")}


def logit_lens(
    model: LoopedTransformer,
    tokens: Queries,
    targets: Targets = None,
    *,
    n_iterations: int | None = None,
    cache: Any = None,
    positions: str = "readout",
    entities_only: bool = False,
    batch_size: int = 256,
    progress: bool = True,
) -> pd.DataFrame:
    """Decode every residual stream of a run through the final LayerNorm and unembedding.

    Args:
        model: a LoopedTransformer (looped or vanilla; never modified).
        tokens: token ids [batch, pos] (right-padded) or query strings ("e17 r3 r9", needs model.vocab).
        targets: what to score. None: the model's own prediction (top-1 at the last layer, readout
            position), named "prediction". One id per query ([batch] tensor, list of ids or of "e5"
            strings): named "target". A [batch, k] tensor: "target_0".. A mapping name -> ids, e.g.
            ``hop_targets(answers, bridges)``. Ids < 0 or equal to the pad id mean "no target here"
            (those rows are left out).
        n_iterations: the run's iteration count (default: the cache's, else the model's).
        cache: a ``model.run_with_cache(tokens, n_iterations=T)`` cache to decode instead of running.
        positions: "readout" (each query's last non-pad token) or "all" (every non-pad position).
        entities_only: rank, normalise and take the entropy over entity tokens only (needs model.vocab):
            relation and pad tokens are never answers.
        batch_size: queries decoded at once (memory: (layers + 1) x batch_size x positions x d_vocab).
        progress: tqdm bar over batches.

    Returns:
        One row per (example, target, layer, position), in that order. Columns:
        example (int64, row of ``tokens``), target (str name), target_token (int64), target_str (str),
        layer (int64 virtual layer; -1 = the embedding), stage ("embed" / "prelude" / "loop" / "coda"),
        iteration (int64, 0-based loop iteration; -1 before the loop, n_iterations after it), block
        (int64, core block within the iteration; -1 for the embedding), position (int64), token (int64,
        the input token there), token_str (str), is_readout (bool), rank (int64, 0 = top-1), prob
        (float64), logit (float64), margin (float64, target logit minus the best other token's logit; > 0
        iff top-1), entropy (float64, nats), top_token (int64, the decoded top-1), top_str (str), top_prob
        (float64). Layer l's row decodes resid_post of virtual layer l.

    >>> from looplens.models import LoopedConfig, LoopedTransformer
    >>> m = LoopedTransformer(LoopedConfig(d_vocab=9, n_ctx=3, d_model=8, n_heads=2, n_blocks=2, seed=0))
    >>> df = logit_lens(m, torch.tensor([[1, 5, 6]]), torch.tensor([2]), n_iterations=3, progress=False)
    >>> len(df), df.layer.tolist()   # the embedding (-1), then 3 iterations x 2 blocks
    (7, [-1, 0, 1, 2, 3, 4, 5])
    """
    tokens = as_tokens(model, tokens)
    n = tokens.shape[0]
    T = check_n_iterations(model, n_iterations, cache)
    check_choice("positions", positions, ("readout", "all"))
    batch_size = check_positive_int("batch_size", batch_size)
    target_ids = _normalise_targets(model, targets, n)
    candidates = entity_ids(model) if entities_only else None
    if target_ids is not None:
        for name, ids in target_ids.items():
            to_candidate_index(_valid(model, ids), candidates, f"targets[{name!r}]")
    n_layers = model.cfg.n_virtual_layers(T)
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{v}.hook_resid_post" for v in range(n_layers)]
    if cache is not None:
        check_cache(cache, names, n)
    layers = layer_table(model, T, embed=True)

    parts: list[dict[str, np.ndarray]] = []
    with analysis_mode(model):
        readout = model.readout_positions(tokens)
        for sl in chunks(n, batch_size, progress, "logit lens"):
            if cache is None:
                _, chunk_cache = model.run_with_cache(tokens[sl], n_iterations=T, names_filter=lambda x: x in names)
                stack = torch.stack([chunk_cache[name] for name in names])
            else:
                stack = torch.stack([cache[name][sl] for name in names]).to(tokens.device)
            parts.extend(_decode_chunk(model, stack, tokens[sl], readout[sl], sl.start, positions, candidates,
                                       target_ids and {k: v[sl] for k, v in target_ids.items()}))
    return _assemble(model, parts, layers, tokens)


def _valid(model: LoopedTransformer, ids: Tensor) -> Tensor:
    """-1 where a target is missing (negative or the pad id), else the id."""
    pad = model.cfg.pad_token_id
    missing = ids < 0 if pad is None else (ids < 0) | (ids == pad)
    return torch.where(missing, torch.full_like(ids, -1), ids)


def _decode_chunk(
    model: LoopedTransformer,
    stack: Tensor,
    tokens: Int[Tensor, "batch pos"],
    readout: Int[Tensor, " batch"],
    offset: int,
    positions: str,
    candidates: Tensor | None,
    target_ids: dict[str, Tensor] | None,
) -> list[dict[str, np.ndarray]]:
    """Lens rows of one chunk. stack: [layers + 1, batch, pos, d_model]."""
    n_layers1, b, n_pos, d = stack.shape
    if positions == "readout":
        bi = torch.arange(b, device=tokens.device)
        pi = readout
    else:
        valid = torch.arange(n_pos, device=tokens.device)[None] <= readout[:, None]
        bi, pi = valid.nonzero(as_tuple=True)
    m = len(bi)
    logits = decode(model, stack[:, bi, pi].reshape(-1, 1, d))[:, 0]  # [(layers + 1) * m, d_vocab]
    logits = restrict(logits, candidates)
    dist = distribution_stats(logits)
    top_token = dist["top_index"] if candidates is None else candidates[dist["top_index"]]
    if target_ids is None:  # the model's own prediction: top-1 at the last layer, readout position
        last = top_token.view(n_layers1, m)[-1]
        pred = torch.full((b,), -1, dtype=torch.long, device=tokens.device)
        at_readout = pi == readout[bi]
        pred[bi[at_readout]] = last[at_readout]
        target_ids = {"prediction": pred}
    layer_index = np.repeat(np.arange(n_layers1), m)
    ex = np.tile((bi + offset).cpu().numpy(), n_layers1)
    pos = np.tile(pi.cpu().numpy(), n_layers1)
    out = []
    for name, ids in target_ids.items():
        ids = _valid(model, ids)
        row_target = ids[bi].repeat(n_layers1)
        keep = row_target >= 0
        if not bool(keep.any()):
            continue
        stats = target_stats(logits[keep], {k: v[keep] for k, v in dist.items()},
                             to_candidate_index(row_target[keep], candidates, f"targets[{name!r}]"))
        keep_np = keep.cpu().numpy()
        out.append({
            "example": ex[keep_np], "target": np.full(int(keep_np.sum()), name, dtype=object),
            "target_token": row_target[keep].cpu().numpy(), "layer_index": layer_index[keep_np],
            "position": pos[keep_np], "is_readout": (pi == readout[bi]).repeat(n_layers1)[keep].cpu().numpy(),
            "top_token": top_token[keep].cpu().numpy(), "top_prob": dist["top_prob"][keep].cpu().numpy(),
            "entropy": dist["entropy"][keep].cpu().numpy(),
            **{k: v.cpu().numpy() for k, v in stats.items()},
        })
    return out


def _assemble(model: LoopedTransformer, parts: list[dict[str, np.ndarray]], layers: pd.DataFrame,
              tokens: Tensor) -> pd.DataFrame:
    if not parts:
        return frame({c: [] for c in LENS_COLUMNS}, LENS_COLUMNS)
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    # rows come target-major within each chunk; a stable sort by example gives (example, target, layer, pos)
    target_order = {name: i for i, name in enumerate(dict.fromkeys(cols["target"]))}
    order = np.lexsort((cols["position"], cols["layer_index"],
                        np.array([target_order[t] for t in cols["target"]]), cols["example"]))
    cols = {k: v[order] for k, v in cols.items()}
    li = cols.pop("layer_index")
    token = tokens.cpu().numpy()[cols["example"], cols["position"]]
    cols.update(
        layer=layers["layer"].to_numpy()[li], stage=layers["stage"].to_numpy()[li],
        iteration=layers["iteration"].to_numpy()[li], block=layers["block"].to_numpy()[li],
        token=token, token_str=token_strings(model, token), target_str=token_strings(model, cols["target_token"]),
        top_str=token_strings(model, cols["top_token"]),
    )
    return frame(cols, LENS_COLUMNS)
