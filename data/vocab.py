"""The token vocabulary: one token per entity and per relation, plus padding.

Layout (fixed, so any component can compute ids without a file):

    id 0              "<pad>"
    ids 1 .. N        entities  "e0" .. "e{N-1}"
    ids N+1 .. N+R    relations "r0" .. "r{R-1}"

A query is an entity followed by one or more relations, written with single spaces ("e17 r3 r9");
its answer is one entity token. Batches are right-padded with ``pad_id``: under a causal mask no
position attends to a later one, so padding after position ``length - 1`` (where the model reads the
answer) can never change that answer. Keeping the mask causal is the model's side of that contract.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int

PAD = "<pad>"


class Vocab:
    """Token ids for a world of ``n_entities`` entities and ``n_relations`` relations.

    >>> v = Vocab(20, 10)
    >>> len(v), v.pad_id
    (31, 0)
    >>> v.encode("e17 r3 r9")
    [18, 24, 30]
    >>> v.decode([18, 24, 30, 0, 0])
    'e17 r3 r9'
    >>> v.encode("e17 e3")
    Traceback (most recent call last):
    ...
    ValueError: query 'e17 e3': token 'e3' at position 1 is an entity; expected a relation
    """

    pad_id = 0

    def __init__(self, n_entities: int, n_relations: int) -> None:
        if n_entities < 1 or n_relations < 1:
            raise ValueError(f"Vocab needs >= 1 entity and relation, got {n_entities}, {n_relations}")
        self.n_entities = int(n_entities)
        self.n_relations = int(n_relations)
        self.tokens: list[str] = (
            [PAD] + [f"e{i}" for i in range(n_entities)] + [f"r{j}" for j in range(n_relations)]
        )
        self._index = pd.Index(self.tokens)  # hash lookup for whole arrays of token strings at once

    @classmethod
    def for_world(cls, world) -> Vocab:  # noqa: ANN001 - World, not imported to keep modules independent
        return cls(world.n_entities, world.n_relations)

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and (self.n_entities, self.n_relations) == (other.n_entities, other.n_relations)

    def __hash__(self) -> int:
        return hash((self.n_entities, self.n_relations))

    def __repr__(self) -> str:
        return f"Vocab(n_entities={self.n_entities}, n_relations={self.n_relations})"

    # ---- id arithmetic (scalars or arrays / tensors) ----
    @property
    def entity_ids(self) -> slice:
        """Slice of the entity ids, e.g. ``logits[..., vocab.entity_ids]`` restricts to entities."""
        return slice(1, 1 + self.n_entities)

    @property
    def relation_ids(self) -> slice:
        return slice(1 + self.n_entities, 1 + self.n_entities + self.n_relations)

    def entity_token(self, index):  # noqa: ANN001, ANN201 - int, array or tensor in, same out
        """Token id of entity ``index`` (``e{index}``)."""
        _check_index("entity", index, self.n_entities)
        return index + 1

    def relation_token(self, index):  # noqa: ANN001, ANN201
        """Token id of relation ``index`` (``r{index}``)."""
        _check_index("relation", index, self.n_relations)
        return index + 1 + self.n_entities

    def entity_index(self, token_id):  # noqa: ANN001, ANN201
        """Entity index of an entity token id (ValueError for any other id)."""
        if not _all(self.is_entity(token_id)):
            raise ValueError(f"entity_index: {_first_bad(token_id, self.is_entity(token_id))} is not an entity token id")
        return token_id - 1

    def relation_index(self, token_id):  # noqa: ANN001, ANN201
        """Relation index of a relation token id (ValueError for any other id)."""
        if not _all(self.is_relation(token_id)):
            raise ValueError(
                f"relation_index: {_first_bad(token_id, self.is_relation(token_id))} is not a relation token id"
            )
        return token_id - 1 - self.n_entities

    def is_entity(self, token_id):  # noqa: ANN001, ANN201
        return (token_id >= 1) & (token_id <= self.n_entities)

    def is_relation(self, token_id):  # noqa: ANN001, ANN201
        return (token_id > self.n_entities) & (token_id <= self.n_entities + self.n_relations)

    # ---- strings ----
    def token_id(self, token: str) -> int:
        """Id of one token string (ValueError if unknown)."""
        loc = self._index.get_indexer([token])[0]
        if loc < 0:
            raise ValueError(f"unknown token {token!r}")
        return int(loc)

    def ids_of(self, tokens: Sequence[str], kind: str = "any") -> Int[np.ndarray, " n"]:
        """Ids of many token strings at once; ``kind="entity"`` or ``"relation"`` also checks the kind."""
        ids = self._index.get_indexer(pd.Index(list(tokens), dtype=object)).astype(np.int64)
        ok = ids >= 0
        if kind == "entity":
            ok &= self.is_entity(ids)
        elif kind == "relation":
            ok &= self.is_relation(ids)
        if not ok.all():
            i = int(np.argmin(ok))
            what = "unknown token" if ids[i] < 0 else f"token (expected {'an' if kind == 'entity' else 'a'} {kind})"
            raise ValueError(f"{what} {tokens[i]!r} at index {i}")
        return ids

    def encode(self, query: str) -> list[int]:
        """Ids of one query (an entity followed by relations), validated."""
        ids, _ = self._encode_flat([query], single=True)
        return ids.tolist()

    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray) -> str:
        """Space-separated tokens, padding skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(i) for i in np.asarray(ids).ravel()]
        for i in ids:
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"decode: id {i} is not in 0..{len(self.tokens) - 1}")
        return " ".join(self.tokens[i] for i in ids if i != self.pad_id)

    def encode_batch(
        self, queries: Sequence[str]
    ) -> tuple[Int[torch.Tensor, "n pos"], Int[torch.Tensor, " n"]]:
        """Right-padded token ids [n, max_len] and lengths [n] of many queries (vectorised, validated)."""
        ids, lengths = self._encode_flat(queries)
        n = len(lengths)
        width = int(lengths.max()) if n else 0
        tokens = np.full((n, width), self.pad_id, dtype=np.int64)
        rows = np.repeat(np.arange(n), lengths)
        cols = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        tokens[rows, cols] = ids
        return torch.from_numpy(tokens), torch.from_numpy(lengths)

    def _encode_flat(self, queries: Sequence[str], single: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """All queries' ids concatenated, and each query's length; ValueError names the first bad token."""
        if isinstance(queries, str):
            raise ValueError("encode_batch expects a list of query strings, not one string")
        split = list(map(str.split, queries))
        lengths = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
        flat = list(chain.from_iterable(split))
        ids = self._index.get_indexer(pd.Index(flat, dtype=object)).astype(np.int64)
        starts = np.cumsum(lengths) - lengths
        is_first = np.zeros(len(flat), dtype=bool)
        is_first[starts[lengths > 0]] = True
        ok = np.where(is_first, self.is_entity(ids), self.is_relation(ids))
        if (lengths == 0).any():
            row = int(np.argmax(lengths == 0))
            raise ValueError(f"{_where(queries, row, single)} is empty; expected an entity followed by relations")
        if not ok.all():
            i = int(np.argmin(ok))
            row = int(np.searchsorted(starts, i, side="right") - 1)
            pos = i - int(starts[row])
            if ids[i] < 0:
                problem = "is not a known token"
            else:
                kind = "an entity" if self.is_entity(ids[i]) else "a relation" if self.is_relation(ids[i]) else "padding"
                problem = f"is {kind}; expected {'an entity' if pos == 0 else 'a relation'}"
            raise ValueError(f"{_where(queries, row, single)}: token {flat[i]!r} at position {pos} {problem}")
        return ids, lengths


def _where(queries: Sequence[str], row: int, single: bool) -> str:
    return f"query {queries[row]!r}" if single else f"query {row} ({queries[row]!r})"


def _check_index(what: str, index, n: int) -> None:  # noqa: ANN001
    ok = (index >= 0) & (index < n)
    if not _all(ok):
        raise ValueError(f"{what} index {_first_bad(index, ok)} is not in 0..{n - 1}")


def _all(mask) -> bool:  # noqa: ANN001
    return bool(mask.all()) if hasattr(mask, "all") else bool(mask)


def _first_bad(values, ok):  # noqa: ANN001, ANN202
    if hasattr(ok, "all"):
        flat_ok = np.asarray(ok).ravel()
        return np.asarray(values).ravel()[int(np.argmin(flat_ok))].item()
    return values
