"""Knowledge-graph worlds: a table ``tails[entity, relation]`` of the entity each edge leads to.

Two kinds, as in the paper:

- ``random-tail`` (section 5): each entity has ``out_degree`` distinct relations, each to a uniformly
  random tail. Relations are many-to-one, so the last relations of a chain carry information about
  the answer (a possible shortcut; see :func:`data.shortcuts.shortcut_rate`).
- ``permutation`` (section 6): every relation is a random permutation of the entities (a bijection),
  so every (entity, relation) has exactly one answer and no suffix of relations is a shortcut.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Int
from looplens.data.config import WORLDS
from looplens.data.sampling import rng_for

MISSING = -1  # tails[e, r] when entity e has no relation r


@dataclass(eq=False)
class World:
    """The facts of one world. ``tails[e, r]`` is the tail of ``(e, r)``, or -1 where e lacks r.

    >>> w = make_world("permutation", 4, 2, seed=0)
    >>> w.n_facts, bool(w.is_permutation())
    (8, True)
    >>> answers, bridges = w.follow([0, 1], [[0, 1], [1, 1]])
    >>> bool((answers == w.tails[w.tails[[0, 1], [0, 1]], [1, 1]]).all()), bridges.shape
    (True, (2, 1))
    """

    kind: str
    n_entities: int
    n_relations: int
    tails: Int[np.ndarray, "entity relation"]

    def __post_init__(self) -> None:
        if self.kind not in WORLDS:
            raise ValueError(f"World.kind must be one of {', '.join(WORLDS)}; got {self.kind!r}")
        self.tails = np.asarray(self.tails, dtype=np.int64)
        if self.tails.shape != (self.n_entities, self.n_relations):
            raise ValueError(
                f"World.tails must have shape ({self.n_entities}, {self.n_relations}), got {self.tails.shape}"
            )
        if self.tails.size and (self.tails.min() < MISSING or self.tails.max() >= self.n_entities):
            raise ValueError(f"World.tails must hold entity indices 0..{self.n_entities - 1} or -1")

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, World)
            and (self.kind, self.n_entities, self.n_relations) == (other.kind, other.n_entities, other.n_relations)
            and np.array_equal(self.tails, other.tails)
        )

    @property
    def n_facts(self) -> int:
        return int((self.tails != MISSING).sum())

    def facts(self) -> tuple[Int[np.ndarray, " fact"], Int[np.ndarray, " fact"], Int[np.ndarray, " fact"]]:
        """All atomic facts as (heads, relations, tails), sorted by head, then relation."""
        heads, relations = np.nonzero(self.tails != MISSING)
        return heads.astype(np.int64), relations.astype(np.int64), self.tails[heads, relations]

    def out_degrees(self) -> Int[np.ndarray, " entity"]:
        return (self.tails != MISSING).sum(axis=1)

    def is_permutation(self) -> bool:
        """True when every relation is a bijection of the entities."""
        if (self.tails == MISSING).any():
            return False
        ordered = np.sort(self.tails, axis=0)
        return bool((ordered == np.arange(self.n_entities)[:, None]).all())

    def follow(
        self, heads: Int[np.ndarray, " n"], relations: Int[np.ndarray, "n k"]
    ) -> tuple[Int[np.ndarray, " n"], Int[np.ndarray, "n k_minus_1"]]:
        """Follow each row's relations from its head: the answers and the intermediate (bridge) entities.

        Raises ValueError naming the first chain that leaves the world (unknown index or missing edge).
        """
        heads = np.asarray(heads, dtype=np.int64)
        relations = np.asarray(relations, dtype=np.int64)
        if relations.ndim != 2 or heads.shape != relations.shape[:1]:
            raise ValueError(f"follow: heads must be [n] and relations [n, k]; got {heads.shape}, {relations.shape}")
        _check_range("head", heads, self.n_entities)
        _check_range("relation", relations, self.n_relations)
        current = heads
        visited = []
        for hop in range(relations.shape[1]):
            nxt = self.tails[current, relations[:, hop]]
            if (nxt == MISSING).any():
                row = int(np.argmax(nxt == MISSING))
                raise ValueError(
                    f"follow: chain {row} leaves the world at hop {hop + 1}: entity e{current[row]} "
                    f"has no relation r{relations[row, hop]}"
                )
            visited.append(nxt)
            current = nxt
        if not visited:
            return heads.copy(), np.zeros((len(heads), 0), dtype=np.int64)
        path = np.stack(visited, axis=1)
        return path[:, -1], path[:, :-1]

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "n_entities": self.n_entities,
            "n_relations": self.n_relations,
            "tails": self.tails.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> World:
        try:
            return cls(d["kind"], int(d["n_entities"]), int(d["n_relations"]), np.asarray(d["tails"], dtype=np.int64))
        except KeyError as err:
            raise ValueError(f"world: missing key {err.args[0]!r}") from None


def make_world(kind: str, n_entities: int, n_relations: int, out_degree: int | None = None, seed: int = 0) -> World:
    """Build a random world of the given kind (``out_degree`` is ignored for permutation worlds).

    The random stream is ``rng_for(seed, "world")``: the world depends only on (kind, sizes, seed),
    not on the task, so both tasks built with one seed share their world.
    """
    rng = rng_for(seed, f"world/{kind}")
    if kind == "permutation":
        # column r is relation r: a random permutation of the entities
        perms = np.argsort(rng.random((n_relations, n_entities)), axis=1)
        return World(kind, n_entities, n_relations, perms.T.copy())
    if kind != "random-tail":
        raise ValueError(f"world kind must be one of {', '.join(WORLDS)}; got {kind!r}")
    if out_degree is None or not 1 <= out_degree <= n_relations:
        raise ValueError(f"random-tail world: out_degree must be in 1..{n_relations}, got {out_degree!r}")
    # out_degree distinct relations per entity: the first out_degree of a random ordering of the relations
    chosen = np.argsort(rng.random((n_entities, n_relations)), axis=1)[:, :out_degree]
    tails = np.full((n_entities, n_relations), MISSING, dtype=np.int64)
    rows = np.repeat(np.arange(n_entities), out_degree)
    tails[rows, chosen.ravel()] = rng.integers(0, n_entities, size=n_entities * out_degree)
    return World(kind, n_entities, n_relations, tails)


def _check_range(what: str, values: np.ndarray, n: int) -> None:
    bad = (values < 0) | (values >= n)
    if bad.any():
        where = np.argwhere(bad)[0]
        raise ValueError(f"follow: {what} index {values[tuple(where)]} at {tuple(int(i) for i in where)} is not in 0..{n - 1}")
