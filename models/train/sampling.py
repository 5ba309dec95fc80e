"""Random choices made during training, each from its own seeded generator whose state is saved.

- :class:`BatchSampler`: which training rows form each batch (epochs of shuffled rows; an optional
  share of every batch drawn from atomic facts).
- :class:`IterationSampler`: the recurrence R of each batch (fixed, Poisson, uniform, Poisson-lognormal).

Both keep a numpy PCG64 generator; ``state_dict()`` / ``load_state_dict()`` make a resumed run draw
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch
from looplens.models.train.config import RecurrenceConfig


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array (a batch's row indices, hop counts) as a tensor on ``device``. On a GPU the copy goes from
    pinned memory without blocking: a copy from pageable memory would make the host wait for the device at
    every step (issue 16.3)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def generator(seed: int, tag: str) -> np.random.Generator:
    """An independent PCG64 stream for (seed, tag), stable across machines and Python versions."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(tag.encode())])))


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return rng.bit_generator.state


def _set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state


class _Cycler:
    """Endless epochs over ``rows``: each epoch a fresh permutation; draws may straddle two epochs."""

    def __init__(self, rows: np.ndarray, rng: np.random.Generator):
        self.rows = rows
        self.rng = rng
        self.perm = rng.permutation(len(rows))
        self.pos = 0
        self.epochs = 0

    def take(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            if self.pos == len(self.perm):
                self.perm = self.rng.permutation(len(self.rows))
                self.pos = 0
                self.epochs += 1
            k = min(n, len(self.perm) - self.pos)
            out.append(self.perm[self.pos : self.pos + k])
            self.pos += k
            n -= k
        return self.rows[np.concatenate(out)] if out else self.rows[:0]

    @property
    def progress(self) -> float:
        """Epochs completed, with the current one as a fraction."""
        return self.epochs + self.pos / max(len(self.perm), 1)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state(self.rng), "perm": torch.from_numpy(self.perm.copy()), "pos": self.pos,
                "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _set_rng_state(self.rng, state["rng"])
        self.perm = state["perm"].numpy().copy()
        if len(self.perm) != len(self.rows):
            raise ValueError("saved batch sampler does not match the training rows (dataset changed?)")
        self.pos = int(state["pos"])
        self.epochs = int(state["epochs"])


class BatchSampler:
    """Row indices of the training split for each batch.

    ``hops`` is the split's hop count per row. Rows with 2 <= hops <= ``max_hops`` are the composed
    pool; hops == 1 rows are the atomic facts. With ``atomic_share`` None, batches are drawn from both
    pools together (plain epochs over all rows); otherwise ``round(atomic_share * batch_size)`` rows of
    every batch come from the atomic facts and the rest from the composed pool, each cycling through
    its own epochs. ``epoch`` counts passes over the composed pool (over all rows when not split).

    >>> s = BatchSampler(np.array([1, 1, 2, 2, 2, 2]), batch_size=4, atomic_share=0.5, seed=0)
    >>> sorted(int(h) for h in np.array([1, 1, 2, 2, 2, 2])[s.next_batch()])
    [1, 1, 2, 2]
    >>> s.epoch
    0.5
    """

    def __init__(self, hops: np.ndarray, batch_size: int, atomic_share: float | None, seed: int,
                 max_hops: int | None = None, tag: str = "batches"):
        hops = np.asarray(hops)
        top = int(hops.max()) if max_hops is None else max_hops
        atomic = np.flatnonzero(hops == 1)
        composed = np.flatnonzero((hops >= 2) & (hops <= top))
        self.batch_size = batch_size
        rng = generator(seed, tag)
        if atomic_share is None or len(composed) == 0 or len(atomic) == 0:
            rows = np.flatnonzero(hops <= top)
            if len(rows) == 0:
                raise ValueError("no training rows to sample from")
            self.cyclers = [_Cycler(rows, rng)]
            self.sizes = [batch_size]
        else:
            n_atomic = min(max(round(atomic_share * batch_size), 0), batch_size)
            self.cyclers = [_Cycler(atomic, rng), _Cycler(composed, rng)]
            self.sizes = [n_atomic, batch_size - n_atomic]
        self.n_rows = sum(len(c.rows) for c in self.cyclers)

    def next_batch(self) -> np.ndarray:
        return np.concatenate([c.take(n) for c, n in zip(self.cyclers, self.sizes)])

    @property
    def epoch(self) -> float:
        return self.cyclers[-1].progress

    def state_dict(self) -> dict[str, Any]:
        return {"cyclers": [c.state_dict() for c in self.cyclers], "sizes": list(self.sizes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["sizes"]) != self.sizes or len(state["cyclers"]) != len(self.cyclers):
            raise ValueError("saved batch sampler does not match this configuration (batch size or atomic share changed?)")
        for cycler, s in zip(self.cyclers, state["cyclers"]):
            cycler.load_state_dict(s)


class IterationSampler:
    """The recurrence R of each training batch.

    >>> from looplens.models.train.config import RecurrenceConfig
    >>> s = IterationSampler(RecurrenceConfig(mode="poisson", mean=4.0, min=2, max=8), fixed=4, seed=0)
    >>> draws = [s.sample() for _ in range(1000)]
    >>> min(draws) >= 2 and max(draws) <= 8
    True
    """

    def __init__(self, cfg: RecurrenceConfig, fixed: int, seed: int):
        self.cfg = cfg
        self.fixed = fixed
        self.rng = generator(seed, "recurrence")

    def sample(self) -> int:
        cfg = self.cfg
        if cfg.mode == "fixed":
            return self.fixed
        if cfg.mode == "poisson":
            r = int(self.rng.poisson(cfg.mean))
        elif cfg.mode == "uniform":
            r = int(self.rng.integers(cfg.min, cfg.max + 1))
        else:  # Huginn (Geiping et al. 2025): log-normal rate, Poisson count, + 1
            tau = self.rng.normal(np.log(cfg.mean) - cfg.sigma**2 / 2, cfg.sigma)
            r = int(self.rng.poisson(np.exp(tau))) + 1
        return int(min(max(r, cfg.min), cfg.max))

    def probabilities(self) -> dict[int, float]:
        """The exact distribution of :meth:`sample` (Poisson-lognormal: by 200k-draw simulation)."""
        cfg = self.cfg
        if cfg.mode == "fixed":
            return {self.fixed: 1.0}
        support = range(cfg.min, cfg.max + 1)
        if cfg.min == cfg.max:
            return {cfg.min: 1.0}
        if cfg.mode == "uniform":
            return {r: 1.0 / len(support) for r in support}
        if cfg.mode == "poisson":
            from math import exp, factorial

            pmf = [exp(-cfg.mean) * cfg.mean**k / factorial(k) for k in range(cfg.max + 1)]
            out = {r: pmf[r] for r in support}
            out[cfg.min] = sum(pmf[: cfg.min + 1])
            out[cfg.max] = 1.0 - sum(pmf[: cfg.max])
            return out
        sim = IterationSampler(cfg, self.fixed, seed=12345)
        draws = np.array([sim.sample() for _ in range(200_000)])
        return {r: float((draws == r).mean()) for r in support}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _set_rng_state(self.rng, state["rng"])

