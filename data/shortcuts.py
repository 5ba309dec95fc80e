"""How far the relation suffix alone predicts the answer (a shortcut a model could learn instead of
following the chain).

In a random-tail world relations are many-to-one, so the last relation(s) narrow the answer down; in a
permutation world every relation is a bijection, so with uniformly drawn heads the answer is uniform
whatever the suffix (PAPER.md, section 6).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from looplens.data.sampling import rng_for
from looplens.data.vocab import Vocab


def shortcut_rate(world_or_dataset: Any, rows: Any, suffix_len: int = 1) -> dict:
    """Accuracy of the best suffix-only predictor on ``rows``, with baselines.

    ``rows``: a DataFrame with ``query`` and ``answer`` columns (``Dataset.rows(split)``) or an
    :class:`~data.storage.EncodedSplit`. The predictor answers each suffix (the last ``suffix_len``
    relations; queries with fewer relations use all of theirs) with its most frequent answer in ``rows``.
    It is fitted on the rows it is scored on, so with few rows per suffix it looks better than it is:
    ``chance`` is the same predictor's accuracy after shuffling the answers across rows (seeded), the
    score a suffix with no information gets; ``uniform`` is 1 / n_entities.

    Returns ``{"accuracy", "chance", "uniform", "shortcut", "n_suffixes", "n_rows", "suffix_len"}``,
    where ``shortcut = accuracy - chance``.
    """
    if suffix_len < 1:
        raise ValueError(f"shortcut_rate: suffix_len must be >= 1, got {suffix_len}")
    world = getattr(world_or_dataset, "world", world_or_dataset)
    vocab = Vocab.for_world(world)
    if isinstance(rows, pd.DataFrame):
        if not {"query", "answer"} <= set(rows.columns):
            raise ValueError("shortcut_rate: rows need 'query' and 'answer' columns")
        tokens, lengths = vocab.encode_batch(rows["query"].tolist())
        tokens, lengths = tokens.numpy(), lengths.numpy()
        answers = vocab.ids_of(rows["answer"].tolist(), kind="entity")
    else:  # EncodedSplit
        tokens, lengths, answers = rows.tokens.numpy(), rows.lengths.numpy(), rows.answers.numpy()
    n = len(answers)
    if n == 0:
        raise ValueError("shortcut_rate: no rows")
    # suffix[i, j] = j-th of the last suffix_len tokens of row i, or -1 where the query has no relation there
    cols = lengths[:, None] - suffix_len + np.arange(suffix_len)[None, :]
    suffix = np.where(cols >= 1, tokens[np.arange(n)[:, None], np.clip(cols, 0, None)], -1)
    _, key = np.unique(suffix, axis=0, return_inverse=True)
    key = key.ravel()
    accuracy = _majority_accuracy(key, answers)
    chance = _majority_accuracy(key, rng_for(0, "shortcut_rate/shuffle").permutation(answers))
    return {
        "accuracy": accuracy,
        "chance": chance,
        "uniform": 1.0 / world.n_entities,
        "shortcut": accuracy - chance,
        "n_suffixes": int(key.max()) + 1,
        "n_rows": int(n),
        "suffix_len": int(suffix_len),
    }


def _majority_accuracy(key: np.ndarray, answers: np.ndarray) -> float:
    """Share of rows whose answer is the most frequent answer among rows with the same key."""
    pairs = key.astype(np.int64) * (int(answers.max()) + 1) + answers
    uniq, counts = np.unique(pairs, return_counts=True)
    best = np.zeros(int(key.max()) + 1, dtype=np.int64)
    np.maximum.at(best, uniq // (int(answers.max()) + 1), counts)
    return float(best.sum() / len(answers))
