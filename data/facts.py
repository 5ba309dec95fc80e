"""`Facts`: a table of k-hop facts as index arrays (the in-memory form of one split).

Entities and relations are world indices here (not vocab ids); rows of different hop counts share one
table by padding ``relations`` and ``bridges`` with -1. Generation, storage, import and the tests all
speak this form; strings appear only when a split is written to disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from jaxtyping import Int

PAD = -1
# relations / bridges matrices are int32: the depth train split is ~600k rows x 40 columns, padded
MATRIX_DTYPE = np.int32


@dataclass(eq=False)
class Facts:
    """Rows ``heads[i] relations[i, :hops[i]] -> answers[i]`` with bridges ``bridges[i, :hops[i]-1]``.

    A bridge of -1 inside ``hops - 1`` means "unknown" (only in imported data whose world lacks an edge).
    """

    heads: Int[np.ndarray, " n"]
    relations: Int[np.ndarray, "n width"]
    hops: Int[np.ndarray, " n"]
    answers: Int[np.ndarray, " n"]
    bridges: Int[np.ndarray, "n width_minus_1"]

    def __post_init__(self) -> None:
        self.relations = np.asarray(self.relations, dtype=MATRIX_DTYPE)
        self.bridges = np.asarray(self.bridges, dtype=MATRIX_DTYPE)
        if self.bridges.ndim != 2 or self.relations.ndim != 2:
            raise ValueError("Facts: relations and bridges must be 2-d")

    def __len__(self) -> int:
        return len(self.heads)

    @property
    def width(self) -> int:
        return self.relations.shape[1]

    @classmethod
    def empty(cls, width: int = 1) -> Facts:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, np.zeros((0, width), np.int64), z, z, np.zeros((0, max(width - 1, 0)), np.int64))

    @classmethod
    def from_chains(cls, world, heads: np.ndarray, relations: np.ndarray) -> Facts:  # noqa: ANN001 - World
        """Facts of fixed length k = relations.shape[1], answers and bridges followed through ``world``."""
        heads = np.asarray(heads, dtype=np.int64)
        relations = np.asarray(relations, dtype=np.int64)
        answers, bridges = world.follow(heads, relations)
        hops = np.full(len(heads), relations.shape[1], dtype=np.int64)
        return cls(heads, relations, hops, answers, bridges)

    @classmethod
    def atomic(cls, world) -> Facts:  # noqa: ANN001 - World
        """Every atomic fact of the world (hops = 1), sorted by head then relation."""
        heads, relations, tails = world.facts()
        return cls(heads, relations[:, None], np.ones(len(heads), np.int64), tails, np.zeros((len(heads), 0), np.int64))

    def take(self, index: np.ndarray) -> Facts:
        return Facts(self.heads[index], self.relations[index], self.hops[index], self.answers[index], self.bridges[index])

    def padded(self, width: int) -> Facts:
        """The same rows with relations padded to ``width`` columns (bridges to ``width - 1``)."""
        if width < self.width:
            raise ValueError(f"cannot pad facts of width {self.width} to {width}")
        if width == self.width:
            return self
        rel = np.full((len(self), width), PAD, MATRIX_DTYPE)
        rel[:, : self.width] = self.relations
        br = np.full((len(self), max(width - 1, 0)), PAD, MATRIX_DTYPE)
        br[:, : self.bridges.shape[1]] = self.bridges
        return Facts(self.heads, rel, self.hops, self.answers, br)

    @classmethod
    def concat(cls, parts: Sequence[Facts]) -> Facts:
        """Rows of all parts in order (one allocation; narrower parts padded with -1)."""
        parts = list(parts)
        if not parts:
            return cls.empty()
        width = max(p.width for p in parts)
        n = sum(len(p) for p in parts)
        out = cls(np.empty(n, np.int64), np.full((n, width), PAD, MATRIX_DTYPE), np.empty(n, np.int64),
                  np.empty(n, np.int64), np.full((n, max(width - 1, 0)), PAD, MATRIX_DTYPE))
        at = 0
        for p in parts:
            rows = slice(at, at + len(p))
            out.heads[rows], out.hops[rows], out.answers[rows] = p.heads, p.hops, p.answers
            out.relations[rows, : p.width] = p.relations
            out.bridges[rows, : p.bridges.shape[1]] = p.bridges
            at += len(p)
        return out

    def sort_order(self) -> np.ndarray:
        """Canonical row order: by hops, then head, then the relations left to right."""
        keys = [self.relations[:, j] for j in range(self.width - 1, -1, -1)] + [self.heads, self.hops]
        return np.lexsort(keys)

    def sorted(self) -> Facts:
        return self.take(self.sort_order())

    def query_keys(self, width: int | None = None) -> np.ndarray:
        """One hashable/sortable value per row identifying its query (head + relations), for set tests.

        Compare keys of two tables with the same ``width`` (e.g. ``max`` of both widths).
        """
        width = width or self.width
        if width < self.width:
            if (self.relations[:, width:] != PAD).any():
                raise ValueError(f"query_keys: rows have more than {width} relations")
            f = Facts(self.heads, self.relations[:, :width], self.hops, self.answers, self.bridges[:, : max(width - 1, 0)])
        else:
            f = self.padded(width)
        table = np.ascontiguousarray(np.column_stack([f.heads, f.relations.astype(np.int64)]))
        return table.view(np.dtype((np.void, table.dtype.itemsize * table.shape[1]))).ravel()
