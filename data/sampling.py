"""Seeded random streams and sampling without replacement.

Every random decision draws from its own named stream, ``rng_for(seed, "purpose")``, so adding a new
decision never changes the others (e.g. the world of a seed is the same for both tasks).
"""

from __future__ import annotations

import zlib

import numpy as np

# Above this population size a full permutation (int64, 8 bytes each) costs too much memory; sample
# with replacement, drop duplicates, top up instead.
_PERMUTATION_LIMIT = 4_000_000


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """An independent generator for one purpose under one seed (crc32 of the name picks the stream).

    >>> bool(rng_for(0, "world").integers(1000) == rng_for(0, "world").integers(1000))
    True
    """
    return np.random.default_rng([int(seed), zlib.crc32(purpose.encode())])


def sample_without_replacement(rng: np.random.Generator, population: int, size: int) -> np.ndarray:
    """``size`` distinct integers from ``range(population)`` in random order (a uniform ordered sample).

    Like ``rng.choice(population, size, replace=False)`` but never allocates the whole population
    when it is huge and the sample small.
    """
    population, size = int(population), int(size)
    if size > population:
        raise ValueError(f"cannot sample {size} distinct items from {population}")
    if population <= _PERMUTATION_LIMIT or size * 4 > population:
        return rng.permutation(population)[:size].astype(np.int64)
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < size:
        draw = rng.integers(0, population, size=int((size - len(chosen)) * 1.1) + 16)
        merged = np.concatenate([chosen, draw])
        _, first = np.unique(merged, return_index=True)
        chosen = merged[np.sort(first)]  # keep draw order: the result stays a random ordering
    return chosen[:size]


def sample_rows(rng: np.random.Generator, n: int, cap: int) -> np.ndarray:
    """Indices of a random sample of ``min(n, cap)`` of ``n`` rows, sorted (so order stays canonical)."""
    return np.sort(sample_without_replacement(rng, n, min(n, cap)))
