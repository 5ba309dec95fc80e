"""Activation patching over (iteration, block, position[, head]), batched.

Clean and corrupted queries differ in one token (the head entity, or one relation) so that their answers
differ. An activation of the clean run is copied into the corrupted run at one cell (virtual layer,
position, head) and the readout's logit difference ``logit[clean answer] - logit[corrupted answer]`` is
measured. Normalised: 1 = the clean behaviour is fully restored, 0 = still the corrupted behaviour.

Many cells share one forward pass: the corrupted batch is repeated once per cell along the batch axis
and one hook per virtual layer patches each copy at its own cell.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from looplens.interp._common import (
    HOOKS,
    Queries,
    TokenIds,
    analysis_mode,
    as_token_ids,
    as_tokens,
    check_cache,
    check_choice,
    check_n_iterations,
    check_positive_int,
    layer_table,
    progress_bar,
    readout_logits,
)
from looplens.models import LoopedTransformer
from looplens.models.components import _ACTIVATIONS as _ACT
from looplens.models.components import _has_hooks, block_forward, reuse_weights
from torch import Tensor

PATCH_COLUMNS = {
    "hook": object,
    "layer": "int64",
    "stage": object,
    "iteration": "int64",
    "block": "int64",
    "position": "int64",
    "head": "int64",
    "effect": "float64",
    "metric": "float64",
    "clean_metric": "float64",
    "corrupted_metric": "float64",
    "n_pairs": "int64",
}
PATCH_EXAMPLE_COLUMNS = {
    "hook": object,
    "pair": "int64",
    **{k: v for k, v in PATCH_COLUMNS.items() if k not in ("hook", "n_pairs")},
}
PAIR_COLUMNS = {
    "pair": "int64",
    "hops": "int64",
    "corrupt": object,
    "position": "int64",
    "clean": object,
    "corrupted": object,
    "clean_answer": object,
    "corrupted_answer": object,
    "clean_tokens": object,
    "corrupted_tokens": object,
    "clean_answer_token": "int64",
    "corrupted_answer_token": "int64",
}

Metric = Callable[[Tensor, Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------------
def _follow(tails: np.ndarray, heads: np.ndarray, relations: np.ndarray) -> np.ndarray:
    """Answers of chains (broadcast over leading axes); -1 where a chain leaves the world."""
    current = heads.copy()
    for j in range(relations.shape[-1]):
        ok = current >= 0
        nxt = np.where(ok, tails[np.where(ok, current, 0), relations[..., j]], -1)
        current = nxt
    return current


def make_patching_pairs(
    source: Any,
    n: int = 256,
    *,
    hops: int = 2,
    corrupt: str = "head",
    position: int | None = None,
    split: str | None = None,
    seed: int = 0,
    n_candidates: int = 64,
) -> pd.DataFrame:
    """Clean / corrupted query pairs whose answers differ, from a world or a dataset.

    Args:
        source: a ``data.World`` (random chains are drawn) or a ``data.Dataset`` (``.world``; with
            ``split`` the clean queries are drawn from that split's ``hops``-hop rows).
        n: pairs wanted. Fewer are returned when the source has fewer clean queries, or when no
            corruption with a different answer exists for some of them (those are dropped).
        hops: relations per query.
        corrupt: "head" (replace the head entity) or "relation" (replace relation ``position``).
        position: for corrupt="relation", which relation (1..hops; default 1, which changes the first
            bridge). Ignored for "head" (position 0).
        split: a split name of the dataset (e.g. "test_inferred_ood"), or None for random chains.
        seed: everything random is drawn from ``numpy.random.default_rng(seed)``.
        n_candidates: replacements tried per pair and round (4 rounds).

    Returns:
        One row per pair. Columns: pair (int64), hops (int64), corrupt (str), position (int64, the token
        position that differs), clean, corrupted (query strings "e17 r3 r9"), clean_answer,
        corrupted_answer ("e5"), clean_tokens, corrupted_tokens (tuples of token ids, vocab layout pad 0,
        entities 1..N, relations N+1..), clean_answer_token, corrupted_answer_token (int64). Pass the
        frame straight to :func:`activation_patching`.

    >>> from types import SimpleNamespace
    >>> world = SimpleNamespace(tails=np.array([[1, 2], [2, 0], [0, 1]]))
    >>> pairs = make_patching_pairs(world, 4, hops=2, corrupt="relation", position=2, seed=0)
    >>> bool((pairs.clean_answer != pairs.corrupted_answer).all()), pairs.position.tolist()
    (True, [2, 2, 2, 2])
    """
    world = getattr(source, "world", source)
    tails = getattr(world, "tails", None)
    if tails is None:
        raise ValueError("make_patching_pairs needs a data.World (with .tails) or a data.Dataset (with .world)")
    tails = np.asarray(tails, dtype=np.int64)
    n_entities, n_relations = tails.shape
    n = check_positive_int("n", n)
    hops = check_positive_int("hops", hops)
    check_choice("corrupt", corrupt, ("head", "relation"))
    if corrupt == "relation":
        position = 1 if position is None else position
        if not isinstance(position, int | np.integer) or not 1 <= position <= hops:
            raise ValueError(f"position must be a relation position in 1..{hops} for corrupt='relation', got {position!r}")
    else:
        position = 0
    rng = np.random.default_rng(seed)

    if split is not None:
        if not hasattr(source, "facts"):
            raise ValueError("split= needs a data.Dataset as source")
        facts = source.facts(split)
        rows = np.nonzero(np.asarray(facts.hops) == hops)[0]
        if len(rows) == 0:
            raise ValueError(f"split {split!r} has no {hops}-hop queries")
        rows = rng.choice(rows, size=min(n, len(rows)), replace=False)
        heads = np.asarray(facts.heads)[rows]
        relations = np.asarray(facts.relations)[rows, :hops]
    else:
        heads = rng.integers(0, n_entities, size=n)
        relations = np.empty((n, hops), dtype=np.int64)
        current = heads
        for j in range(hops):  # walk existing edges only (random-tail worlds have missing ones)
            scores = rng.random((n, n_relations))
            scores[tails[current] < 0] = -1.0
            relations[:, j] = scores.argmax(1)
            current = tails[current, relations[:, j]]
            if (current < 0).any():
                raise ValueError("make_patching_pairs: some entity has no outgoing relation")
    answers = _follow(tails, heads, relations)

    chosen = np.full(len(heads), -1, dtype=np.int64)
    new_answers = np.full(len(heads), -1, dtype=np.int64)
    for _ in range(4):
        todo = np.nonzero(chosen < 0)[0]
        if len(todo) == 0:
            break
        if corrupt == "head":
            cand = rng.integers(0, n_entities, size=(len(todo), n_candidates))
            cand_answers = _follow(tails, cand, np.broadcast_to(relations[todo, None], (*cand.shape, hops)))
            ok = cand != heads[todo, None]
        else:
            cand = rng.integers(0, n_relations, size=(len(todo), n_candidates))
            rels = np.repeat(relations[todo, None], n_candidates, axis=1)
            rels[..., position - 1] = cand
            cand_answers = _follow(tails, np.broadcast_to(heads[todo, None], cand.shape), rels)
            ok = cand != relations[todo, position - 1, None]
        ok &= (cand_answers >= 0) & (cand_answers != answers[todo, None])
        found = ok.any(1)
        first = ok.argmax(1)
        chosen[todo[found]] = cand[found, first[found]]
        new_answers[todo[found]] = cand_answers[found, first[found]]
    keep = chosen >= 0
    if not keep.any():
        raise ValueError(f"no corruption of the {corrupt} changes the answer for any of the {len(heads)} queries")
    heads, relations, answers, chosen, new_answers = heads[keep], relations[keep], answers[keep], chosen[keep], new_answers[keep]
    c_heads = chosen if corrupt == "head" else heads
    c_relations = relations.copy()
    if corrupt == "relation":
        c_relations[:, position - 1] = chosen

    def tokens(h: np.ndarray, r: np.ndarray) -> list[tuple[int, ...]]:
        ids = np.concatenate([h[:, None] + 1, r + 1 + n_entities], axis=1)
        return [tuple(int(i) for i in row) for row in ids]

    def text(h: np.ndarray, r: np.ndarray) -> list[str]:
        return [" ".join([f"e{a}"] + [f"r{b}" for b in rs]) for a, rs in zip(h.tolist(), r.tolist())]

    m = len(heads)
    out = pd.DataFrame({
        "pair": np.arange(m), "hops": np.full(m, hops), "corrupt": [corrupt] * m, "position": np.full(m, position),
        "clean": text(heads, relations), "corrupted": text(c_heads, c_relations),
        "clean_answer": [f"e{a}" for a in answers.tolist()], "corrupted_answer": [f"e{a}" for a in new_answers.tolist()],
        "clean_tokens": tokens(heads, relations), "corrupted_tokens": tokens(c_heads, c_relations),
        "clean_answer_token": answers + 1, "corrupted_answer_token": new_answers + 1,
    })
    return out.astype(PAIR_COLUMNS)


def _pairs_tokens(pairs: pd.DataFrame, column: str) -> Tensor:
    seqs = pairs[column].tolist()
    width = max(len(s) for s in seqs)
    out = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s)
    return out


# ---------------------------------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------------------------------
def logit_diff(
    logits: Float[Tensor, "n d_vocab"], clean_answers: Int[Tensor, " n"], corrupted_answers: Int[Tensor, " n"]
) -> Float[Tensor, " n"]:
    """``logit[clean answer] - logit[corrupted answer]`` per row (readout logits)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return (logits[rows, clean_answers] - logits[rows, corrupted_answers]).float()


def _hook_suffix(hook: str) -> tuple[str, str]:
    """(short name, name within a block) of a patchable activation."""
    for short, full in HOOKS.items():
        if hook in (short, full, full.split(".")[-1]):
            return short, full
    raise ValueError(f"unknown hook {hook!r}; patchable activations: {', '.join(HOOKS)} "
                     f"(or their full names {', '.join(HOOKS.values())})")


def activation_patching(
    model: LoopedTransformer,
    clean: Queries | pd.DataFrame,
    corrupted: Queries | None = None,
    clean_answers: TokenIds | None = None,
    corrupted_answers: TokenIds | None = None,
    *,
    hook: str = "resid_pre",
    n_iterations: int | None = None,
    clean_cache: Any = None,
    by_position: bool = True,
    layers: Sequence[int] | None = None,
    iterations: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    metric: str | Metric = "logit_diff",
    per_example: bool = False,
    batch_size: int = 4096,
    progress: bool = True,
) -> pd.DataFrame:
    """Patch one clean activation into the corrupted run per cell; measure the normalised logit difference.

    Args:
        clean: clean queries (ids [batch, pos] or strings), or a :func:`make_patching_pairs` frame (then
            leave corrupted / clean_answers / corrupted_answers out).
        corrupted: corrupted queries, same shape and the same readout (last non-pad) positions as clean.
        clean_answers, corrupted_answers: answer token ids (or "e5" strings). corrupted_answers None: the
            model's own prediction on the corrupted queries.
        hook: "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out" or "z" (one head's output).
        n_iterations: the run's iteration count (default: the clean cache's, else the model's).
        clean_cache: a ``model.run_with_cache(clean, n_iterations=T)`` cache to patch from.
        by_position: patch one position per cell (True) or all positions at once (False; position = -1).
        layers / iterations: restrict to these virtual layers / loop iterations (default: all layers).
        positions: restrict to these positions (default: all). heads: for hook="z", these heads (default all).
        metric: "logit_diff" or a callable ``(readout_logits [n, d_vocab], clean_answers [n],
            corrupted_answers [n]) -> [n]``.
        per_example: one row per (cell, pair), normalised per pair, instead of per cell.
        batch_size: rows per forward pass (cells per pass = batch_size // pairs, at least 1).
        progress: tqdm bar over forward passes.

    Returns:
        Per cell (per_example=False), columns: hook (str), layer (int64 virtual layer), stage, iteration,
        block (int64, as in :func:`interp.logit_lens`), position (int64; -1 = all positions), head (int64;
        -1 = not a head hook), effect (float64, ``(M_patched - M_corrupted) / (M_clean - M_corrupted)`` with
        M the metric's mean over pairs: 1 = clean behaviour restored, 0 = corrupted; NaN when clean and
        corrupted means coincide), metric (float64, M_patched), clean_metric, corrupted_metric (float64),
        n_pairs (int64). per_example=True: a ``pair`` column instead of n_pairs, each value per pair.
    """
    short, suffix = _hook_suffix(hook)
    clean_t, corrupted_t, clean_ans, corrupted_ans = _inputs(model, clean, corrupted, clean_answers, corrupted_answers)
    B, n_pos = clean_t.shape
    T = check_n_iterations(model, n_iterations, clean_cache)
    batch_size = check_positive_int("batch_size", batch_size)
    metric_fn = _metric(metric)
    table = layer_table(model, T)
    cells = _cells(model, T, table, short, by_position, layers, iterations, positions, heads, n_pos)
    names = sorted({f"blocks.{v}.{suffix}" for v in cells["layer"]}, key=lambda s: int(s.split(".")[1]))
    if clean_cache is not None:
        check_cache(clean_cache, names, B)

    with analysis_mode(model), reuse_weights():  # every cell runs the same weights: their fused form once
        readout = model.readout_positions(clean_t)
        if not torch.equal(readout, model.readout_positions(corrupted_t)):
            raise ValueError("clean and corrupted queries must have the same lengths (readout positions) pair by pair")
        rows = torch.arange(B, device=clean_t.device)
        fast = _fast_path_applies(model, short, by_position)
        n_layers = model.cfg.n_prelude + T * model.cfg.n_blocks
        # the fast path reads the resid_pre of every layer from the first patched one, of both runs (keys /
        # values to reuse; the clean one for position-0 patches, see _sweep_suffix)
        every = {f"blocks.{v}.hook_resid_pre" for v in range(int(cells["layer"].min()), n_layers)} if fast else set()
        last = f"blocks.{n_layers - 1}.hook_resid_post"
        if clean_cache is None:
            logits, clean_cache = model.run_with_cache(clean_t, n_iterations=T,
                                                       names_filter=lambda x: x in names or x in every)
            clean_logits = logits[rows, readout]
        elif model.cfg.n_coda == 0 and last in clean_cache:  # the cached last residual read out: no forward pass
            clean_logits = model.readout(clean_cache[last][rows, readout][:, None].to(clean_t.device), T)[:, 0]
        else:
            clean_logits = readout_logits(model, clean_t, T)
        # the corrupted run once: its logits, the loop's input, and the resid_pre of every patched layer to
        # resume from
        starts = every if fast else {f"blocks.{v}.hook_resid_pre" for v in {*cells["layer"], model.cfg.n_prelude}}
        logits, corrupted_cache = model.run_with_cache(corrupted_t, n_iterations=T, names_filter=lambda x: x in starts)
        corrupted_logits = logits[rows, readout]
        if corrupted_ans is None:
            corrupted_ans = corrupted_logits.argmax(-1)
        clean_metric = metric_fn(clean_logits, clean_ans, corrupted_ans).float()
        corrupted_metric = metric_fn(corrupted_logits, clean_ans, corrupted_ans).float()
        clean_acts = {name: clean_cache[name].to(clean_t.device) for name in names}
        if fast:
            clean_resid = ({int(n.split(".")[1]): clean_cache[n].to(clean_t.device) for n in every}
                           if all(n in clean_cache for n in every) else None)
            patched = _sweep_suffix(model, cells, clean_acts, corrupted_t, corrupted_cache, corrupted_metric, T,
                                    metric_fn, clean_ans, corrupted_ans, progress, clean_resid,
                                    clean_metric)  # [cells, B]
        else:
            patched = _sweep(model, cells, clean_acts, corrupted_t, corrupted_cache, T, suffix, by_position,
                             metric_fn, clean_ans, corrupted_ans, batch_size, progress)  # [cells, B]
    return _patch_frame(short, cells, patched.cpu().double(), clean_metric.cpu().double(),
                        corrupted_metric.cpu().double(), per_example)


def _inputs(model: LoopedTransformer, clean: Any, corrupted: Any, clean_answers: Any, corrupted_answers: Any
            ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    if isinstance(clean, pd.DataFrame):
        if corrupted is not None or clean_answers is not None or corrupted_answers is not None:
            raise ValueError("pass either a make_patching_pairs frame, or clean, corrupted and answers; not both")
        missing = [c for c in ("clean_tokens", "corrupted_tokens", "clean_answer_token", "corrupted_answer_token")
                   if c not in clean.columns]
        if missing:
            raise ValueError(f"the pairs frame lacks columns {missing} (build it with make_patching_pairs)")
        if clean.empty:
            raise ValueError("the pairs frame is empty")
        pairs = clean
        clean = _pairs_tokens(pairs, "clean_tokens")
        corrupted = _pairs_tokens(pairs, "corrupted_tokens")
        clean_answers = torch.tensor(pairs["clean_answer_token"].to_numpy(dtype=np.int64))
        corrupted_answers = torch.tensor(pairs["corrupted_answer_token"].to_numpy(dtype=np.int64))
    if corrupted is None or clean_answers is None:
        raise ValueError("activation_patching needs corrupted queries and clean_answers (or a pairs frame)")
    clean_t = as_tokens(model, clean)
    corrupted_t = as_tokens(model, corrupted)
    if clean_t.shape != corrupted_t.shape:
        raise ValueError(f"clean and corrupted must have the same shape; got {tuple(clean_t.shape)} and "
                         f"{tuple(corrupted_t.shape)} (pad both to the same length)")
    B = clean_t.shape[0]
    return (clean_t, corrupted_t, as_token_ids(model, clean_answers, B, "clean_answers"),
            as_token_ids(model, corrupted_answers, B, "corrupted_answers"))


def _metric(metric: str | Metric) -> Metric:
    if callable(metric):
        return metric
    if metric == "logit_diff":
        return logit_diff
    raise ValueError(f"metric must be 'logit_diff' or a callable (logits, clean_answers, corrupted_answers) -> [n]; "
                     f"got {metric!r}")


def _index_list(name: str, values: Sequence[int] | None, limit: int, what: str) -> list[int]:
    if values is None:
        return list(range(limit))
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or not 0 <= v < limit:
            raise ValueError(f"{name}: {v!r} is outside {what} (valid: 0..{limit - 1})")
        out.append(int(v))
    if not out:
        raise ValueError(f"{name} is empty")
    return sorted(set(out))


def _cells(model: LoopedTransformer, T: int, table: pd.DataFrame, short: str, by_position: bool,
           layers: Sequence[int] | None, iterations: Sequence[int] | None, positions: Sequence[int] | None,
           heads: Sequence[int] | None, n_pos: int) -> pd.DataFrame:
    n_layers = len(table)
    if layers is not None and iterations is not None:
        raise ValueError("give layers or iterations, not both")
    if iterations is not None:
        its = _index_list("iterations", iterations, T, f"the run (n_iterations={T})")
        layer_list = table.loc[(table["stage"] == "loop") & table["iteration"].isin(its), "layer"].tolist()
    else:
        layer_list = _index_list("layers", layers, n_layers, f"the run's {n_layers} virtual layers (n_iterations={T})")
    pos_list = _index_list("positions", positions, n_pos, "the sequence") if by_position else [-1]
    if positions is not None and not by_position:
        raise ValueError("positions only applies with by_position=True")
    if short == "z":
        head_list = _index_list("heads", heads, model.cfg.n_heads, "the heads")
    elif heads is not None:
        raise ValueError(f"heads only applies to hook='z', not {short!r}")
    else:
        head_list = [-1]
    grid = np.array(np.meshgrid(layer_list, pos_list, head_list, indexing="ij")).reshape(3, -1)
    cells = pd.DataFrame({"layer": grid[0], "position": grid[1], "head": grid[2]})
    return cells.merge(table, on="layer", how="left")


def _patch_hook(n_copies: int, B: int, copies: Tensor, pos: Tensor, head: Tensor, clean_act: Tensor,
                by_position: bool, is_head: bool) -> Callable:
    def hook(x: Tensor, hook: Any) -> Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        xv = x.view(n_copies, B, *x.shape[1:])
        if by_position and is_head:  # xv [copy, batch, pos, head, d_head]
            xv[copies, :, pos, head] = clean_act[:, pos, head].transpose(0, 1)
        elif by_position:  # xv [copy, batch, pos, d_model]
            xv[copies, :, pos] = clean_act[:, pos].transpose(0, 1)
        elif is_head:
            xv[copies, :, :, head] = clean_act[:, :, head].permute(2, 0, 1, 3)
        else:
            xv[copies] = clean_act
        return x

    return hook


def _sweep(model: LoopedTransformer, cells: pd.DataFrame, clean_acts: dict[str, Tensor], corrupted: Tensor,
           corrupted_cache: Any, T: int, suffix: str, by_position: bool, metric_fn: Metric, clean_ans: Tensor,
           corrupted_ans: Tensor, batch_size: int, progress: bool) -> Tensor:
    """Metric of every patched run, [cells, pairs].

    Cells are grouped by virtual layer v: the corrupted run up to layer v is the same for all of them, so it
    is computed once (``corrupted_cache``: resid_pre of every layer) and each pass runs only layers v..end, for as
    many cells of layer v as fit in ``batch_size`` rows (the corrupted batch repeated once per cell).
    """
    B = corrupted.shape[0]
    per_pass = max(1, batch_size // B)
    device = corrupted.device
    layer, pos, head = (torch.tensor(cells[c].to_numpy(dtype=np.int64), device=device)
                        for c in ("layer", "position", "head"))
    layers = sorted(set(layer.tolist()))
    loop_input = corrupted_cache[f"blocks.{model.cfg.n_prelude}.hook_resid_pre"]  # recomputed by a prelude patch
    out = torch.empty(len(cells), B, device=device)
    bar = progress_bar(len(cells), progress and len(cells) > per_pass, f"patching {suffix}")
    try:
        for v in layers:
            name = f"blocks.{v}.{suffix}"
            of_layer = (layer == v).nonzero()[:, 0]
            start_state = corrupted_cache[f"blocks.{v}.hook_resid_pre"]
            for first in range(0, len(of_layer), per_pass):
                idx = of_layer[first:first + per_pass]
                c = len(idx)
                hook = _patch_hook(c, B, torch.arange(c, device=device), pos[idx], head[idx], clean_acts[name],
                                   by_position, suffix == "attn.hook_z")
                with model.hooks(fwd_hooks=[(name, hook)]):
                    logits = _run_from(model, v, start_state.repeat(c, 1, 1), loop_input.repeat(c, 1, 1),
                                       corrupted.repeat(c, 1), T)
                out[idx] = metric_fn(logits, clean_ans.repeat(c), corrupted_ans.repeat(c)).float().view(c, B)
                bar.update(c)
    finally:
        bar.close()
    return out


def _run_from(model: LoopedTransformer, v: int, state: Float[Tensor, "batch pos d_model"],
              loop_input: Float[Tensor, "batch pos d_model"], tokens: Int[Tensor, "batch pos"], T: int
              ) -> Float[Tensor, "batch d_vocab"]:
    """Readout logits of a run of T iterations resumed at virtual layer v from its resid_pre ``state``: the
    loop driver's ``start_layer`` (prelude or loop), or the readout's (coda). Tested equal to full forward
    passes (and to transformer_lens.patching) for looped, vanilla, injected and prelude/coda models.
    """
    if v >= model.cfg.n_prelude + T * model.cfg.n_blocks:  # resumed inside the coda
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return model.readout(state, T, start_layer=v)[rows, model.readout_positions(tokens)]
    (last,) = collections.deque(model.steps(tokens, T, start_layer=v, state=state, loop_input=loop_input), maxlen=1)
    return last.answer_logits()


def _patch_frame(short: str, cells: pd.DataFrame, patched: Tensor, clean_metric: Tensor, corrupted_metric: Tensor,
                 per_example: bool) -> pd.DataFrame:
    n_cells, B = patched.shape
    if per_example:
        denom = clean_metric - corrupted_metric
        effect = (patched - corrupted_metric) / denom
        effect = torch.where(denom.abs() > 0, effect, torch.full_like(effect, float("nan")))
        out = cells.loc[cells.index.repeat(B)].reset_index(drop=True)
        out.insert(0, "pair", np.tile(np.arange(B), n_cells))
        out.insert(0, "hook", short)
        out["effect"] = effect.reshape(-1).numpy()
        out["metric"] = patched.reshape(-1).numpy()
        out["clean_metric"] = np.tile(clean_metric.numpy(), n_cells)
        out["corrupted_metric"] = np.tile(corrupted_metric.numpy(), n_cells)
        return out[list(PATCH_EXAMPLE_COLUMNS)].astype(PATCH_EXAMPLE_COLUMNS)
    m_clean, m_corr = float(clean_metric.mean()), float(corrupted_metric.mean())
    m = patched.mean(1)
    denom = m_clean - m_corr
    out = cells.copy()
    out.insert(0, "hook", short)
    out["effect"] = ((m - m_corr) / denom).numpy() if denom != 0 else np.nan
    out["metric"] = m.numpy()
    out["clean_metric"] = m_clean
    out["corrupted_metric"] = m_corr
    out["n_pairs"] = B
    return out[list(PATCH_COLUMNS)].astype(PATCH_COLUMNS)


# ---------------------------------------------------------------------------------------------------
# Fast path: resid_pre, one position per cell (issue 16.5)
# ---------------------------------------------------------------------------------------------------
def _fast_path_applies(model: LoopedTransformer, short: str, by_position: bool) -> bool:
    """Whether :func:`_sweep_suffix` computes this sweep: a plain LoopedTransformer (not a wrapper of a
    foreign model, whose blocks may differ), resid_pre by position, no input injection or readout feedback
    (they reach every position through the loop input), no coda (its attention would need every position
    of the last state: resuming there is exact and cheap anyway), and no hook attached by the caller (the
    fast path computes the blocks functionally, so such hooks would not fire)."""
    cfg = model.cfg
    return (type(model) is LoopedTransformer and short == "resid_pre" and by_position
            and cfg.input_injection == "none" and not cfg.feedback and cfg.n_coda == 0
            and not model.carries_state  # hyper-connections / two timescales: more than resid_pre flows on
            and not any(_has_hooks(h) for h in model.hook_dict.values()))


def _block_params(model: LoopedTransformer, v: int) -> Any:
    P = model.cfg.n_prelude
    return model.prelude[v] if v < P else model.core[(v - P) % model.cfg.n_blocks]


def _kv(model: LoopedTransformer, params: Any, resid: Float[Tensor, "batch pos d_model"]
        ) -> Float[Tensor, "batch pos two head d_head"]:
    """Keys and values of one block (its ln1 and W_K / W_V) at every position of ``resid``."""
    cfg, a = model.cfg, params.attn
    x = F.layer_norm(resid, resid.shape[-1:], params.ln1.w, params.ln1.b, cfg.ln_eps)
    W_qkv, b_qkv = a.fused_qkv()
    n_q = cfg.n_heads * cfg.d_head  # the k and v columns follow q's
    return (x @ W_qkv[:, n_q:] + b_qkv[n_q:]).view(*resid.shape[:2], 2, cfg.n_heads, cfg.d_head)


def _readout_block(model: LoopedTransformer, params: Any, resid: Float[Tensor, "batch suffix d_model"],
                   kv_prefix: Float[Tensor, "batch prefix two head d_head"], at: Int[Tensor, " batch"]
                   ) -> Float[Tensor, "batch d_model"]:
    """The last block as ``block_forward(..., kv_prefix=...)``, at each row's readout position only (suffix index ``at``):
    every suffix position still gives keys and values, but queries, attention output and MLP are only
    needed where the answer is read."""
    cfg, a, m = model.cfg, params.attn, params.mlp
    batch, n_suf, d = resid.shape
    p = kv_prefix.shape[1]
    rows = torch.arange(batch, device=resid.device)
    x = F.layer_norm(resid, (d,), params.ln1.w, params.ln1.b, cfg.ln_eps)
    W_qkv, b_qkv = a.fused_qkv()
    n_q = cfg.n_heads * cfg.d_head  # the fused columns: q, then k and v
    kv_new = torch.addmm(b_qkv[n_q:], x.reshape(batch * n_suf, d), W_qkv[:, n_q:])
    kv = torch.cat([kv_prefix, kv_new.view(batch, n_suf, 2, cfg.n_heads, cfg.d_head)], dim=1)  # [batch, key_pos, two, head, d_head]
    q = torch.addmm(b_qkv[:n_q], x[rows, at], W_qkv[:, :n_q])
    q = q.view(batch, cfg.n_heads, 1, cfg.d_head)  # one query per row: [batch, head, 1, d_head]
    mask = (torch.arange(p + n_suf, device=resid.device) <= (p + at)[:, None])[:, None, None]  # causal, per row
    if bool(mask.all()):  # every row read at the last position (no padding): no mask, the faster kernel
        mask = None
    z = F.scaled_dot_product_attention(q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2),
                                       attn_mask=mask, scale=1.0 / cfg.attn_scale)  # [batch, head, 1, d_head]
    out = resid[rows, at] + torch.addmm(a.b_O, z.reshape(batch, -1), a.W_O.reshape(-1, d))
    x = F.layer_norm(out, (d,), params.ln2.w, params.ln2.b, cfg.ln_eps)
    return out + torch.addmm(m.b_out, _ACT[cfg.act_fn](torch.addmm(m.b_in, x, m.W_in)), m.W_out)


def _sweep_suffix(model: LoopedTransformer, cells: pd.DataFrame, clean_acts: dict[str, Tensor], corrupted: Tensor,
                  corrupted_cache: Any, corrupted_metric: Tensor, T: int, metric_fn: Metric, clean_ans: Tensor,
                  corrupted_ans: Tensor, progress: bool, clean_resid: dict[int, Tensor] | None = None,
                  clean_metric: Tensor | None = None) -> Tensor:
    """Metric of every patched run, [cells, pairs], computing only what a one-position resid_pre patch can
    change: layers from the patched one on (as :func:`_sweep`), and there only positions >= the patched
    position p. With a causal mask nothing at positions < p changes, so their keys and values are the
    corrupted run's (computed once per layer).

    A patch at position 0 restores that position's whole input, so from the patched layer on position 0
    *is* the clean run's (it attends to itself only): given ``clean_resid`` (the clean resid_pre of every
    layer from the first patched one) such rows start at position 1, with the clean run's keys and values
    at position 0, and a row read at position 0 gets ``clean_metric``.

    The cells of one position p share the suffix length and those keys / values, so they run as one batch
    that grows layer by layer: the rows of cell (v, p) join at layer v. A row whose patch changes nothing
    (clean and corrupted activation equal there, e.g. at layer 0 behind a corrupted head entity) or whose
    readout position is before p keeps the corrupted metric. Tested equal to one hooked forward per cell
    (tests/test_patching_fast.py).
    """
    device = corrupted.device
    n_layers = model.cfg.n_prelude + T * model.cfg.n_blocks
    readout = model.readout_positions(corrupted)
    first = int(cells["layer"].min())
    resid = {u: corrupted_cache[f"blocks.{u}.hook_resid_pre"] for u in range(first, n_layers)}
    kv = {u: _kv(model, _block_params(model, u), resid[u]) for u in range(first, n_layers)}
    out = corrupted_metric.float().to(device).repeat(len(cells), 1)  # [cells, B]: unchanged rows
    bar = progress_bar(len(cells), progress, "patching resid_pre")
    try:
        for p in sorted(set(cells["position"].tolist())):
            of_p = cells.index[cells["position"] == p]
            cell_at = dict(zip(cells.loc[of_p, "layer"].tolist(), of_p.tolist()))
            reuse = p == 0 and clean_resid is not None and clean_metric is not None
            s = p + 1 if reuse else p  # the first position computed; keys / values before it are given
            if reuse:  # position 0 is the clean run's from the patched layer on: its keys / values
                given = {u: _kv(model, _block_params(model, u), clean_resid[u][:, :1]) for u in range(min(cell_at), n_layers)}
            else:
                given = {u: kv[u][:, :p] for u in range(min(cell_at), n_layers)}
            state = resid[first].new_empty(0, resid[first].shape[1] - s, model.cfg.d_model)
            pair_idx = torch.empty(0, dtype=torch.long, device=device)  # the pair of each row of the batch
            cell_idx = torch.empty(0, dtype=torch.long, device=device)
            for u in range(min(cell_at), n_layers):
                if u in cell_at:  # cell (u, p) joins: the corrupted resid_pre with position p from the clean run
                    patch = clean_acts[f"blocks.{u}.hook_resid_pre"][:, p]
                    changed = (patch != resid[u][:, p]).any(-1)
                    if reuse:
                        at_p = (changed & (readout == p)).nonzero()[:, 0]  # read where patched: the clean readout
                        out[cell_at[u], at_p] = clean_metric.float().to(device)[at_p]
                        sel = (changed & (readout > p)).nonzero()[:, 0]
                        new = resid[u][sel, s:]
                    else:
                        sel = (changed & (readout >= p)).nonzero()[:, 0]
                        new = resid[u][sel, p:].clone()
                        new[:, 0] = patch[sel]
                    state = torch.cat([state, new])
                    pair_idx = torch.cat([pair_idx, sel])
                    cell_idx = torch.cat([cell_idx, torch.full_like(sel, cell_at[u])])
                    bar.update(1)
                if not len(pair_idx):
                    continue
                params = _block_params(model, u)
                if u < n_layers - 1:
                    state = block_forward(params, model.cfg, state, kv_prefix=given[u][pair_idx])
                else:
                    state = _readout_block(model, params, state, given[u][pair_idx], readout[pair_idx] - s)
            if len(pair_idx):
                logits = model.readout(state[:, None], T)[:, 0]
                out[cell_idx, pair_idx] = metric_fn(logits, clean_ans[pair_idx], corrupted_ans[pair_idx]).float()
    finally:
        bar.close()
    return out
