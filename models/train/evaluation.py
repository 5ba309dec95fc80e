"""Batched evaluation: accuracy and loss per (split, hops, iteration count), and adaptive halting.

One :class:`EvalSet` holds every evaluation query of a dataset, sorted by length and cut into
chunks of one query length each (trimmed of right padding), so an evaluation is a handful of forward
passes whatever the number of splits and hop counts, and no position is computed for padding: a block
costs in proportion to the positions it runs, so a 2-token atomic query padded to a 3-token chunk cost
50% more (tiny-composition: 1,000 of its 4,533 queries). For several iteration counts the loop runs once to the largest and
reads out at each requested count on the way (same numbers as separate runs: iteration t's state
does not depend on how many iterations follow).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from looplens.models.components import reuse_weights
from looplens.models.halting import HaltingRule
from torch import Tensor

# metrics.csv rows use iterations = 0 for an adaptive-halting evaluation (see docs/training.md)
HALTING_ITERATIONS = 0


@dataclass
class EvalSet:
    """Evaluation queries of several splits, grouped by (split, hops), sorted by length.

    tokens [n, width], answers [n], group [n] (index into ``groups``), chunks: (start, stop, width).
    """

    tokens: Int[Tensor, "n pos"]
    answers: Int[Tensor, " n"]
    group: Int[Tensor, " n"]
    groups: list[tuple[str, int]]
    chunks: list[tuple[int, int, int]]

    @classmethod
    def build(cls, splits: dict, batch_size: int, device: torch.device | str = "cpu",
              max_hops: int | None = None, hops: list[int] | None = None) -> EvalSet:
        """``splits``: name -> data.EncodedSplit. Rows with more than ``max_hops`` hops (or hops not in
        ``hops``) are dropped."""
        names = list(splits)
        width = max((int(s.tokens.shape[1]) for s in splits.values()), default=1)
        tokens, answers, lengths, keys = [], [], [], []
        for name in names:
            enc = splits[name]
            keep = torch.ones(len(enc), dtype=torch.bool)
            if max_hops is not None:
                keep &= enc.hops <= max_hops
            if hops is not None:
                keep &= torch.isin(enc.hops, torch.as_tensor(hops, dtype=enc.hops.dtype))
            tok = enc.tokens[keep]
            tokens.append(F.pad(tok, (0, width - tok.shape[1]), value=0))
            answers.append(enc.answers[keep])
            lengths.append(enc.lengths[keep])
            keys.extend((name, int(h)) for h in enc.hops[keep].tolist())
        if not keys:
            raise ValueError("no evaluation queries left (check eval.splits / eval.max_hops / --hops)")
        groups = sorted(set(keys), key=lambda g: (names.index(g[0]), g[1]))
        index = {g: i for i, g in enumerate(groups)}
        tokens_all = torch.cat(tokens)
        lengths_all = torch.cat(lengths)
        order = torch.argsort(lengths_all, stable=True)
        group = torch.tensor([index[k] for k in keys], dtype=torch.long)[order]
        lengths_sorted = lengths_all[order]
        chunks = _chunks(lengths_sorted, batch_size)
        return cls(tokens_all[order].to(device), torch.cat(answers)[order].to(device), group.to(device),
                   groups, chunks)

    def __len__(self) -> int:
        return len(self.answers)

    def counts(self) -> Tensor:
        return torch.bincount(self.group, minlength=len(self.groups))


def _chunks(lengths: Int[Tensor, " n"], batch_size: int) -> list[tuple[int, int, int]]:
    """(start, stop, width) of each chunk of length-sorted queries: at most ``batch_size`` rows, and a new
    chunk wherever the length grows, unless the chunk so far is small (< batch_size / 16 rows: padding
    those few rows costs less than one more forward pass would).

    >>> _chunks(torch.tensor([2, 2, 2, 3, 3, 3, 3, 3]), 4)
    [(0, 3, 2), (3, 7, 3), (7, 8, 3)]
    >>> _chunks(torch.tensor([1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]), 64)
    [(0, 18, 3)]
    """
    small = max(1, batch_size // 16)
    chunks: list[tuple[int, int, int]] = []
    start, n = 0, len(lengths)
    values = lengths.tolist()
    for i in range(1, n + 1):
        if i == n or i - start == batch_size or (values[i] != values[i - 1] and i - start >= small):
            chunks.append((start, i, int(values[i - 1])))
            start = i
    return chunks


def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def readout_per_iteration(model, tokens: Int[Tensor, "batch pos"], iterations: list[int]) -> dict[int, Float[Tensor, "batch d_vocab"]]:
    """Readout logits [batch, d_vocab] after each of ``iterations`` (one pass up to the largest)."""
    wanted = sorted(set(iterations))
    if model.cfg.n_coda:  # the coda's virtual layers move with the iteration count: one run per count
        return {t: model.predict(tokens, n_iterations=t).float() for t in wanted}
    out = {}
    with reuse_weights():  # every iteration runs the same weights: fused once
        for step in model.steps(tokens, wanted[-1]):  # the model's loop driver: one pass up to the largest
            if step.iteration + 1 in wanted:
                out[step.iteration + 1] = step.answer_logits().float()
    return out


@torch.no_grad()
def evaluate_set(model, evalset: EvalSet, iterations: list[int], bf16: bool = False,
                 halting: HaltingRule | None = None, halting_max_iterations: int = 16) -> list[dict]:
    """Accuracy, mean loss and n per (split, hops) at each iteration count (and for ``halting``).

    Returns tidy rows: split, hops, iterations (0 for halting), accuracy, loss, n, mean_iterations.
    The model is put in eval mode for the call and restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = evalset.tokens.device
    n_groups = len(evalset.groups)
    keys = sorted(set(iterations)) + ([HALTING_ITERATIONS] if halting is not None else [])
    correct = {k: torch.zeros(n_groups, dtype=torch.float64, device=device) for k in keys}
    loss = {k: torch.zeros(n_groups, dtype=torch.float64, device=device) for k in keys}
    used = torch.zeros(n_groups, dtype=torch.float64, device=device)
    try:
        with _autocast(device, bf16):
            for start, stop, width in evalset.chunks:
                tokens = evalset.tokens[start:stop, :width]
                answers = evalset.answers[start:stop]
                group = evalset.group[start:stop]
                logits = readout_per_iteration(model, tokens, iterations) if iterations else {}
                if halting is not None:
                    out = model.forward_adaptive(tokens, halting, max_iterations=halting_max_iterations)
                    logits[HALTING_ITERATIONS] = out.logits.float()
                    used.index_add_(0, group, out.iterations.double())
                for k, lg in logits.items():
                    correct[k].index_add_(0, group, (lg.argmax(-1) == answers).double())
                    loss[k].index_add_(0, group, F.cross_entropy(lg, answers, reduction="none").double())
    finally:
        model.train(was_training)
    n = evalset.counts().double()
    rows = []
    for k in keys:
        acc, mean_loss = (correct[k] / n).tolist(), (loss[k] / n).tolist()
        mean_used = (used / n).tolist() if k == HALTING_ITERATIONS else None
        for g, (split, hops) in enumerate(evalset.groups):
            rows.append({"split": split, "hops": hops, "iterations": k, "accuracy": acc[g], "loss": mean_loss[g],
                         "n": int(n[g]), "mean_iterations": float(k) if mean_used is None else mean_used[g]})
    return rows


def split_accuracy(rows: list[dict], split: str, iterations: int, hops: int | None = None) -> float | None:
    """n-weighted accuracy of ``split`` (optionally one hop count) among evaluation rows; None if absent."""
    hits = [r for r in rows if r["split"] == split and r["iterations"] == iterations
            and (hops is None or r["hops"] == hops)]
    total = sum(r["n"] for r in hits)
    if total == 0:
        return None
    return sum(r["accuracy"] * r["n"] for r in hits) / total


def parse_range(text: str, what: str) -> list[int]:
    """``"1:32"`` -> [1..32] (inclusive), ``"1,2,4"`` -> [1, 2, 4], ``"8"`` -> [8].

    >>> parse_range("2:5", "--hops"), parse_range("1,4,16", "--iterations")
    ([2, 3, 4, 5], [1, 4, 16])
    """
    try:
        out: list[int] = []
        for part in str(text).split(","):
            part = part.strip()
            if ":" in part:
                lo, hi = (int(x) for x in part.split(":"))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected N, A:B (inclusive) or a comma list of integers") from None
    if not out or min(out) < 1:
        raise ValueError(f"{what} {text!r}: values must be positive integers")
    return sorted(set(out))

