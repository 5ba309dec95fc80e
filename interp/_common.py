"""Shared plumbing for the analyses: inputs, layer labels, model-state safety, decoding, progress bars.

Nothing here is an analysis; every public function in interp/ is built from these pieces so that all
of them accept the same inputs (token tensors or query strings), label layers the same way and leave
the model exactly as they found it.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from looplens.models import LoopedTransformer
from torch import Tensor
from tqdm import tqdm

# What callers may pass wherever a batch of queries is expected.
Queries = Tensor | np.ndarray | str | Sequence[str] | pd.Series
# What callers may pass wherever one target token per query is expected.
TokenIds = Tensor | np.ndarray | Sequence[int] | Sequence[str] | pd.Series

# TransformerLens-style short names of the activations the analyses patch or read, per virtual layer.
HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "z": "attn.hook_z",
}


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------
def as_tokens(model: LoopedTransformer, queries: Queries) -> Int[Tensor, "batch pos"]:
    """Token ids [batch, pos] on the model's device from a tensor, an array or query strings."""
    if isinstance(queries, pd.Series):
        queries = queries.tolist()
    if isinstance(queries, np.ndarray):
        queries = torch.from_numpy(queries)
    if isinstance(queries, str) or (
        isinstance(queries, Sequence) and not isinstance(queries, Tensor) and all(isinstance(q, str) for q in queries)
    ):
        if model.vocab is None:
            raise ValueError("query strings need model.vocab (a data.Vocab): set model.vocab = dataset.vocab, "
                             "or pass token ids")
        queries = model.to_tokens(queries)
    if isinstance(queries, Sequence) and not isinstance(queries, Tensor):
        queries = torch.as_tensor(queries)
    return model.check_tokens(queries)


def as_token_ids(model: LoopedTransformer, ids: TokenIds | None, n: int, what: str) -> Int[Tensor, " n"] | None:
    """One token id per query ([n], long, on the model's device); strings ("e5") go through model.vocab."""
    if ids is None:
        return None
    if isinstance(ids, pd.Series) or (isinstance(ids, np.ndarray) and ids.dtype.kind in "USO"):
        ids = ids.tolist()
    if isinstance(ids, str):
        ids = [ids]
    if isinstance(ids, Sequence) and len(ids) and all(isinstance(x, str) for x in ids):
        if model.vocab is None:
            raise ValueError(f"{what} given as strings need model.vocab: pass token ids instead")
        ids = [model.vocab.token_id(x) for x in ids]
    out = torch.as_tensor(np.asarray(ids) if not isinstance(ids, Tensor) else ids)
    if out.dtype.is_floating_point or out.dtype == torch.bool:
        raise TypeError(f"{what} must be integer token ids, got dtype {out.dtype}")
    out = out.long().reshape(-1) if out.ndim == 0 else out.long()
    if out.ndim != 1 or out.shape[0] != n:
        raise ValueError(f"{what} must hold one token id per query ({n}), got shape {tuple(out.shape)}")
    if out.numel() and int(out.max()) >= model.cfg.d_vocab:
        raise ValueError(f"{what}: token id {int(out.max())} is outside the vocabulary (d_vocab={model.cfg.d_vocab})")
    return out.to(model.W_E.device)


def check_n_iterations(model: LoopedTransformer, n_iterations: int | None, cache: Any = None) -> int:
    """The run's iteration count: the argument, else the cache's, else the model's default."""
    cached = getattr(getattr(cache, "model", None), "n_iterations", None) if cache is not None else None
    if n_iterations is None:
        return int(cached) if cached is not None else model.cfg.n_iterations
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int | np.integer) or n_iterations < 1:
        raise ValueError(f"n_iterations must be a positive integer, got {n_iterations!r}")
    if cached is not None and int(cached) != int(n_iterations):
        raise ValueError(f"n_iterations={n_iterations} but the cache holds a run of {cached} iterations")
    return int(n_iterations)


def check_cache(cache: Any, names: Sequence[str], batch: int) -> None:
    """Clear errors when a user-supplied cache lacks an activation or belongs to another batch."""
    for name in names:
        if name not in cache:
            raise ValueError(f"the cache has no {name!r}: build it with model.run_with_cache(tokens, n_iterations=T) "
                             "(without a names_filter that drops it)")
    got = cache[names[0]].shape[0]
    if got != batch:
        raise ValueError(f"the cache holds {got} queries but {batch} tokens rows were given")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------------
# Layer labels
# ---------------------------------------------------------------------------------------------------
def layer_table(model: LoopedTransformer, n_iterations: int, embed: bool = False) -> pd.DataFrame:
    """One row per virtual layer of a run: layer, stage, iteration, block (and the embedding as layer -1).

    stage is "embed" (layer -1: token + position embedding, i.e. resid_pre of layer 0), "prelude",
    "loop" or "coda". iteration is the 0-based loop iteration; -1 before the loop (embed, prelude) and
    ``n_iterations`` after it (coda). block is the core block within an iteration (the layer itself for a
    vanilla model, which is one iteration of several blocks), the prelude/coda index, or -1 for the embed.

    >>> from looplens.models import LoopedConfig, LoopedTransformer
    >>> m = LoopedTransformer(LoopedConfig(d_vocab=9, n_ctx=3, d_model=8, n_heads=2, n_blocks=2, n_iterations=2))
    >>> layer_table(m, 2, embed=True)[["layer", "iteration", "block"]].values.tolist()
    [[-1, -1, -1], [0, 0, 0], [1, 0, 1], [2, 1, 0], [3, 1, 1]]
    """
    rows = [("embed", -1, -1, -1)] if embed else []
    for v in range(model.cfg.n_virtual_layers(n_iterations)):
        stage, t, index = model.iteration_block(v, n_iterations)
        iteration = t if stage == "loop" else (-1 if stage == "prelude" else n_iterations)
        rows.append((stage, v, iteration, index))
    frame = pd.DataFrame(rows, columns=["stage", "layer", "iteration", "block"])
    return frame.astype({"stage": object, "layer": "int64", "iteration": "int64", "block": "int64"})


def layer_label(stage: str, iteration: int, block: int) -> str:
    """Short axis label of a virtual layer: "embed", "pre0", "t3.b1", "coda0"."""
    if stage == "embed":
        return "embed"
    if stage == "prelude":
        return f"pre{block}"
    if stage == "coda":
        return f"coda{block}"
    return f"t{iteration}.b{block}"


def token_strings(model: LoopedTransformer, ids: np.ndarray) -> np.ndarray:
    """Token strings for an array of ids (the id as text when the model has no vocab; "" for id < 0)."""
    ids = np.asarray(ids, dtype=np.int64)
    vocab = getattr(model, "vocab", None)
    if vocab is not None:
        table = np.asarray(list(vocab.tokens), dtype=object)
    else:
        table = np.asarray([str(i) for i in range(model.cfg.d_vocab)], dtype=object)
    out = np.full(ids.shape, "", dtype=object)
    ok = (ids >= 0) & (ids < len(table))
    out[ok] = table[ids[ok]]
    return out


def entity_ids(model: LoopedTransformer) -> Int[Tensor, " n_entities"]:
    """Token ids of the entities (needs model.vocab; the layout is pad 0, entities 1..N)."""
    vocab = getattr(model, "vocab", None)
    if vocab is None:
        raise ValueError("entities_only=True needs model.vocab (a data.Vocab) to know which tokens are entities")
    return torch.arange(1, 1 + int(vocab.n_entities), device=model.W_E.device)


# ---------------------------------------------------------------------------------------------------
# Model state
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def analysis_mode(model: LoopedTransformer) -> Iterator[None]:
    """Eval mode and no grad for the duration; train/eval state and default iteration count restored
    afterwards, also on error. Hooks are added only through ``model.hooks()``, which removes them on exit.
    (The loop driver binds each virtual layer it runs to its weights, so no binding needs restoring.)"""
    was_training = model.training
    n_iterations = model.cfg.n_iterations
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        model.cfg.n_iterations = n_iterations


def decode(model: LoopedTransformer, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
    """Logit lens: the model's own final LayerNorm and unembedding applied to any residual stream."""
    return model.unembed(model.ln_final(resid))


# ---------------------------------------------------------------------------------------------------
# Distribution statistics of one target per row
# ---------------------------------------------------------------------------------------------------
def distribution_stats(logits: Float[Tensor, "n vocab"]) -> dict[str, Tensor]:
    """Target-independent statistics of each row's softmax: log-partition, entropy (nats), top-2."""
    logits = logits.float()
    lse = logits.logsumexp(-1)
    logprobs = logits - lse[:, None]
    top = logits.topk(min(2, logits.shape[-1]), dim=-1)
    return {
        "lse": lse,
        "entropy": -(logprobs.exp() * logprobs).nan_to_num().sum(-1),
        "top_values": top.values,
        "top_index": top.indices[:, 0],
        "top_prob": (top.values[:, 0] - lse).exp(),
    }


def target_stats(
    logits: Float[Tensor, "n vocab"], dist: dict[str, Tensor], target_index: Int[Tensor, " n"]
) -> dict[str, Tensor]:
    """rank (0 = top-1: the number of tokens with a strictly larger logit), prob, logit and margin (the
    target's logit minus the largest logit of any other token) of one target token per row."""
    logits = logits.float()
    safe = target_index.clamp(min=0)
    target_logit = logits.gather(-1, safe[:, None])[:, 0]
    top_values = dist["top_values"]
    if top_values.shape[-1] > 1:
        best_other = torch.where(dist["top_index"] == safe, top_values[:, 1], top_values[:, 0])
    else:
        best_other = torch.full_like(target_logit, float("-inf"))
    return {
        "rank": (logits > target_logit[:, None]).sum(-1),
        "prob": (target_logit - dist["lse"]).exp(),
        "logit": target_logit,
        "margin": target_logit - best_other,
    }


def restrict(
    logits: Float[Tensor, "n vocab"], candidates: Int[Tensor, " k"] | None
) -> Float[Tensor, "n k"]:
    return logits if candidates is None else logits[:, candidates]


def to_candidate_index(
    targets: Int[Tensor, " n"], candidates: Int[Tensor, " k"] | None, what: str
) -> Int[Tensor, " n"]:
    """Index of each target token within the candidate set (identity without one)."""
    if candidates is None:
        return targets
    size = max(int(candidates.max()), int(targets.max()) if targets.numel() else 0) + 1
    lookup = torch.full((size,), -1, dtype=torch.long, device=targets.device)
    lookup[candidates] = torch.arange(len(candidates), device=targets.device)
    index = lookup[targets.clamp(min=0)]
    bad = (index < 0) & (targets >= 0)
    if bool(bad.any()):
        raise ValueError(f"{what}: token {int(targets[bad][0])} is not an entity, but entities_only=True ranks "
                         "entities only")
    return index


# ---------------------------------------------------------------------------------------------------
# Batching and progress
# ---------------------------------------------------------------------------------------------------
def chunks(n: int, size: int, progress: bool, desc: str) -> Iterator[slice]:
    """Slices of ``range(n)`` of at most ``size``, with a tqdm bar (stderr) when progress is on and
    there is more than one chunk."""
    starts = range(0, n, size)
    bar = tqdm(starts, desc=desc, disable=not progress or len(starts) <= 1, leave=False)
    for start in bar:
        yield slice(start, min(start + size, n))


def progress_bar(total: int, progress: bool, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def frame(columns: dict[str, Any], dtypes: dict[str, Any]) -> pd.DataFrame:
    """A DataFrame with exactly the pinned column order and dtypes."""
    out = pd.DataFrame({name: columns[name] for name in dtypes})
    return out.astype(dtypes)


def readout_logits(model: LoopedTransformer, tokens: Int[Tensor, "batch pos"], n_iterations: int
                   ) -> Float[Tensor, "batch d_vocab"]:
    """One run of the loop driver, decoding only each query's readout position (the whole sequence only
    when a coda mixes positions). Hooks attached through ``model.hooks()`` fire exactly as in ``model(tokens)``.
    """
    (last,) = collections.deque(model.steps(tokens, n_iterations), maxlen=1)
    return last.answer_logits()
