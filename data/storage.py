"""Dataset directories on disk: writing (atomically), loading (verified), encoding, caching by config.

Layout of a dataset directory::

    meta.json          task, world, seed, full config, counts, per-split file/count/sha256, provenance
    world.json         the world's tails table
    <split>.jsonl      one row per line: {"answer":"e42","bridges":["e5"],"hops":2,"query":"e17 r3 r9"}

Splits are JSONL rather than Parquet: JSONL needs no pyarrow (not a dependency), diffs and greps well,
and is readable by any tool. At these sizes (<= ~150 MB, the depth task) it is fast enough: ``encode``
parses our own layout straight from the bytes with numpy (see ``_encode_jsonl_bytes``).
All JSON is deterministic (sorted keys, fixed separators, no timestamps, no output path), so the same
config and seed give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from looplens.data.config import DataConfig
from looplens.data.facts import PAD, Facts
from looplens.data.files import FormatVersionError
from looplens.data.provenance import atomic_dir, provenance
from looplens.data.tasks import COMPOSITION_SPLITS, DEPTH_SPLITS, TRAIN_SAMPLES, Generated, generate
from looplens.data.vocab import Vocab
from looplens.data.worlds import World

FORMAT = "looplens-dataset"
FORMAT_VERSION = 1
META = "meta.json"
WORLD = "world.json"


def dumps(obj: Any) -> str:
    """The one JSON style of every file we write: sorted keys, compact separators."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# writing


def facts_to_jsonl(facts: Facts) -> str:
    """JSONL text of a split, identical to ``dumps(row) + "\\n"`` per row, built column-wise.

    Rows of one hop count share a template; token strings come from lookup tables and are joined with
    ``map(str.join, ...)``, so no Python code runs per row (300k-600k rows at paper scale).
    """
    n = len(facts)
    if n == 0:
        return ""
    top = int(max(facts.heads.max(), facts.answers.max(), facts.bridges.max(initial=0))) + 1
    ent = np.array([f"e{i}" for i in range(top)], dtype=object)
    rel = np.array([f"r{j}" for j in range(int(facts.relations.max()) + 1)], dtype=object)
    lines = np.empty(n, dtype=object)
    for k in np.unique(facts.hops):
        rows = np.flatnonzero(facts.hops == k)
        words = np.concatenate([ent[facts.heads[rows]][:, None], rel[facts.relations[rows, :k]]], axis=1)
        queries = map(" ".join, words.tolist())
        bridges = np.full(len(rows), "", dtype=object)
        known = (facts.bridges[rows, : k - 1] != PAD).all(axis=1) if k > 1 else np.zeros(len(rows), bool)
        if known.any():  # unknown bridges (only in some imported data) are written as []
            bridges[known] = list(map('"{}"'.format, map('","'.join, ent[facts.bridges[rows[known], : k - 1]].tolist())))
        template = '{{"answer":"{}","bridges":[{}],"hops":' + str(int(k)) + ',"query":"{}"}}\n'
        lines[rows] = list(map(template.format, ent[facts.answers[rows]].tolist(), bridges.tolist(), queries))
    return "".join(lines.tolist())


def write_dataset(
    out_dir: str | os.PathLike,
    *,
    config: DataConfig,
    generated: Generated,
    split_names: list[str] | None = None,
    origin: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write world, splits and meta into ``out_dir`` atomically (all or nothing)."""
    out_dir = Path(out_dir)
    names = list(split_names or generated.splits)
    world_text = dumps(generated.world.to_dict()) + "\n"
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        splits_meta = {}
        for name in names:
            data = facts_to_jsonl(generated.splits[name]).encode()
            (tmp / f"{name}.jsonl").write_bytes(data)
            hops, counts = np.unique(generated.splits[name].hops, return_counts=True)
            splits_meta[name] = {
                "file": f"{name}.jsonl",
                "count": len(generated.splits[name]),
                "sha256": sha256_bytes(data),
                "hops": {str(int(h)): int(c) for h, c in zip(hops, counts)},
            }
        (tmp / WORLD).write_bytes(world_text.encode())
        vocab = Vocab.for_world(generated.world)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "task": config.task,
            "world": generated.world.kind,
            "seed": config.seed,
            "config": config.to_dict(),
            "counts": generated.counts,
            "max_hops": generated.max_hops,
            "split_names": names,
            "train_samples": sorted(TRAIN_SAMPLES & set(names)),
            "splits": splits_meta,
            "world_file": {"file": WORLD, "sha256": sha256_bytes(world_text.encode())},
            "vocab": {"size": len(vocab), "n_entities": vocab.n_entities, "n_relations": vocab.n_relations,
                      "layout": "0 <pad>; 1..N e0..e{N-1}; N+1..N+R r0..r{R-1}"},
            # the rebuild command without --out, so the bytes do not depend on where the dataset lives
            "origin": origin or {"kind": "generated", "args": config.cli_args()},
            **provenance(),
        }
        (tmp / META).write_text(json.dumps(meta, sort_keys=True, indent=1) + "\n", encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a dataset is meant to be shared
    return out_dir


def rebuild_command(args: list[str], out_dir: str | os.PathLike) -> str:
    """The command line that writes this dataset again (``args`` from meta.json's origin)."""
    return " ".join(["looplens", "data", *args, "--out", str(out_dir), "--overwrite"])


def build_dataset(cfg: DataConfig, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Generate the dataset of ``cfg`` and write it to ``out_dir`` (atomically); returns the path.

    Everything is generated in memory first, so a config error (e.g. phi too large) writes nothing.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    generated = generate(cfg)
    names = list(COMPOSITION_SPLITS if cfg.task == "composition" else DEPTH_SPLITS)
    return write_dataset(out_dir, config=cfg, generated=generated, split_names=names, overwrite=overwrite)


def ensure_dataset(cfg: DataConfig, root: str | os.PathLike) -> Dataset:
    """The dataset of ``cfg`` under ``root/<task>-<world>-<checksum>/``, built on first use.

    A dataset is thus written once per (config, seed) and found again by its config's checksum.
    """
    path = Path(root) / cfg.dirname()
    if not path.exists():
        try:
            build_dataset(cfg, path)
        except (FileExistsError, OSError):
            if not (path / META).exists():  # not a concurrent build that finished first
                raise
    ds = load_dataset(path)
    if ds.imported:  # never stand in for the generated dataset of this config
        raise ValueError(f"dataset {path} was imported ({ds.meta['origin'].get('format')}), not generated from its "
                         f"config; move it to another name (e.g. {ds.dirname}) so this config can be generated here")
    if ds.config != cfg:
        raise ValueError(f"dataset {path}: its meta.json config differs from the requested one; remove the directory")
    return ds


# ----------------------------------------------------------------------------------------------
# reading


@dataclass
class EncodedSplit:
    """One split as tensors of vocab ids, ready for a model.

    tokens   [n, L]             queries, right-padded with pad_id (0); L = longest query in the split
    lengths  [n]                query lengths; the answer is read at position lengths - 1
    answers  [n]                answer token ids
    hops     [n]                number of relations in each query
    bridges  [n, max_hops - 1]  token ids of the intermediate entities, -1 padded (max_hops of the dataset)
    """

    tokens: Int[torch.Tensor, "n pos"]
    lengths: Int[torch.Tensor, " n"]
    answers: Int[torch.Tensor, " n"]
    hops: Int[torch.Tensor, " n"]
    bridges: Int[torch.Tensor, "n bridge"]

    def __len__(self) -> int:
        return len(self.lengths)

    def subset(self, mask_or_index: Any) -> EncodedSplit:
        """Rows selected by a boolean mask or an index (tensor, array or list)."""
        idx = torch.as_tensor(np.asarray(mask_or_index)) if not isinstance(mask_or_index, torch.Tensor) else mask_or_index
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise ValueError(f"subset: mask must have shape ({len(self)},), got {tuple(idx.shape)}")
        else:
            idx = idx.long()
        return EncodedSplit(self.tokens[idx], self.lengths[idx], self.answers[idx], self.hops[idx], self.bridges[idx])

    def to(self, device: str | torch.device) -> EncodedSplit:
        return EncodedSplit(*(t.to(device) for t in (self.tokens, self.lengths, self.answers, self.hops, self.bridges)))


class Dataset:
    """A dataset directory, verified on load. Splits are read (and re-verified) on first use, then cached.

    >>> import tempfile
    >>> from looplens.data import DataConfig, build_dataset, load_dataset
    >>> cfg = DataConfig(task="depth", world="permutation", n_entities=8, n_relations=2,
    ...                  max_hops=3, per_hop_train=6, per_hop_test=2, eval_max=4)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> ds = load_dataset(build_dataset(cfg, tmp.name + "/ds"))
    >>> ds.split_names
    ['train', 'test', 'train_eval']
    >>> list(ds.rows("test").columns)
    ['query', 'answer', 'hops', 'bridges']
    >>> ds.encode("train").tokens.shape  # 16 atomic facts + 6 two-hop + 6 three-hop chains
    torch.Size([28, 4])
    >>> tmp.cleanup()
    """

    def __init__(self, path: Path, meta: dict, world: World) -> None:
        self.path = path
        self.meta = meta
        self.config = DataConfig.from_dict(meta["config"])
        self.world = world
        self.vocab = Vocab.for_world(world)
        self.split_names: list[str] = list(meta["split_names"])
        self.max_hops: int = int(meta["max_hops"])
        self.checksum: str = dataset_checksum(meta)
        self._encoded: dict[str, EncodedSplit] = {}

    @property
    def imported(self) -> bool:
        """Converted from another format (``looplens data import-grokked``), not generated from the config."""
        return self.meta.get("origin", {}).get("kind") == "imported"

    @property
    def dirname(self) -> str:
        """A directory name for this dataset: ``<task>-<world>-<config checksum>`` (where the trainer caches a
        generated one) or, imported, ``<task>-<world>-imported-<dataset checksum>``, so the two never collide."""
        if self.imported:
            return f"{self.config.task}-{self.config.world}-imported-{self.checksum[:12]}"
        return self.config.dirname()

    def __repr__(self) -> str:
        counts = ", ".join(f"{n}={self.meta['splits'][n]['count']}" for n in self.split_names)
        return f"Dataset({str(self.path)!r}, {self.config.task}/{self.world.kind}, {counts})"

    def _check_split(self, split: str) -> None:
        if split not in self.meta["splits"]:
            raise ValueError(f"dataset {self.path}: no split {split!r} (splits: {', '.join(self.split_names)})")

    def count(self, split: str) -> int:
        self._check_split(split)
        return int(self.meta["splits"][split]["count"])

    def _read(self, split: str) -> bytes:
        """The split file's bytes, sha256-verified (on every read: the file may change after loading)."""
        self._check_split(split)
        info = self.meta["splits"][split]
        return _read_verified(self.path, info["file"], info["sha256"], f"split {split!r}")

    def _check_count(self, split: str, n: int) -> None:
        if n != self.meta["splits"][split]["count"]:
            raise ValueError(f"dataset {self.path}: split {split!r} has {n} rows, meta.json says "
                             f"{self.meta['splits'][split]['count']}")

    def rows(self, split: str) -> pd.DataFrame:
        """The split as a new DataFrame: query (str), answer (str), hops (int), bridges (list[str]).

        Read from disk on every call (Python strings for a 600k-row split take ~1 GB); models should
        use :meth:`encode`, which is cached.
        """
        cols = _parse_jsonl(self._read(split).decode())
        self._check_count(split, len(cols["query"]))
        bridges = [b.replace('"', "").split(",") if b else [] for b in cols["bridges"]]
        return pd.DataFrame({"query": pd.Series(cols["query"], dtype=object),
                             "answer": pd.Series(cols["answer"], dtype=object),
                             "hops": cols["hops"], "bridges": pd.Series(bridges, dtype=object)})

    def encode(self, split: str) -> EncodedSplit:
        """The split as tensors (cached: the same object is returned on every call)."""
        if split not in self._encoded:
            data = self._read(split)
            enc = _encode_jsonl_bytes(data, self.vocab, max(self.max_hops - 1, 0))
            if enc is None:  # not our writer's exact layout: parse as strings (slower, precise errors)
                enc = self._encode_strings(split, data)
            self._check_count(split, len(enc))
            self._encoded[split] = enc
        return self._encoded[split]

    def _encode_strings(self, split: str, data: bytes) -> EncodedSplit:
        cols = _parse_jsonl(data.decode())
        n = len(cols["query"])
        tokens, lengths = self.vocab.encode_batch(cols["query"])
        answers = self.vocab.ids_of(cols["answer"], kind="entity")
        bridges = np.full((n, max(self.max_hops - 1, 0)), PAD, dtype=np.int64)
        text = cols["bridges"]
        per_row = np.fromiter((b.count(",") + 1 if b else 0 for b in text), dtype=np.int64, count=n)
        if per_row.sum():
            flat = ",".join(b for b in text if b).replace('"', "").split(",")
            ids = self.vocab.ids_of(flat, kind="entity")
            rows = np.repeat(np.arange(n), per_row)
            cols_ = np.arange(len(ids)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
            bridges[rows, cols_] = ids
        hops = cols["hops"]
        if not np.array_equal(hops, lengths.numpy() - 1):
            row = int(np.argmax(hops != lengths.numpy() - 1))
            raise ValueError(f"dataset {self.path}: split {split!r} row {row}: hops={hops[row]} but the query has "
                             f"{int(lengths[row]) - 1} relations")
        return EncodedSplit(tokens, lengths, torch.from_numpy(answers), torch.from_numpy(hops.copy()),
                            torch.from_numpy(bridges))

    def facts(self, split: str) -> Facts:
        """The split as world-index arrays (see :class:`data.facts.Facts`)."""
        enc = self.encode(split)
        n_ent = self.vocab.n_entities
        tokens = enc.tokens.numpy()
        relations = np.where(tokens[:, 1:] > 0, tokens[:, 1:] - 1 - n_ent, PAD)
        bridges = enc.bridges.numpy()
        return Facts(tokens[:, 0] - 1, relations, enc.hops.numpy().copy(), enc.answers.numpy() - 1,
                     np.where(bridges > 0, bridges - 1, PAD))


_FIELD = {name: re.compile(pattern) for name, pattern in (
    ("answer", r'"answer":"([^"]*)"'), ("bridges", r'"bridges":\[([^\]]*)\]'), ("hops", r'"hops":(\d+)'),
    ("query", r'"query":"([^"]*)"'))}


def _parse_jsonl(text: str) -> dict:
    """Columns of a split file. Files we wrote have one fixed layout, so four regex scans read them
    (~10x faster than json.loads); anything else goes through json."""
    n = text.count("\n")
    cols = {name: pattern.findall(text) for name, pattern in _FIELD.items()}
    if any(len(v) != n for v in cols.values()):
        records = json.loads("[" + text.rstrip("\n").replace("\n", ",") + "]")
        cols = {"answer": [r["answer"] for r in records], "query": [r["query"] for r in records],
                "hops": [r["hops"] for r in records],
                "bridges": [",".join(f'"{b}"' for b in r["bridges"]) for r in records]}
    cols["hops"] = np.fromiter(map(int, cols["hops"]), dtype=np.int64, count=len(cols["hops"]))
    return cols


def _encode_jsonl_bytes(data: bytes, vocab: Vocab, bridge_width: int) -> EncodedSplit | None:
    """Encode a split file straight from its bytes, without making Python strings (~20x faster).

    Relies on our writer's layout: every token is a letter e/r followed by digits (no key has a digit
    after an e or r), and a line lists its tokens as answer, bridges..., head, relations... (keys sorted).
    Returns None if the bytes do not fit that layout; the caller then parses them as strings.
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(arr == ord("\n"))
    n = len(newlines)
    if n == 0:
        z = torch.zeros(0, dtype=torch.long)
        return EncodedSplit(torch.zeros((0, 0), dtype=torch.long), z, z, z, torch.zeros((0, bridge_width), dtype=torch.long))
    digit = (arr >= ord("0")) & (arr <= ord("9"))
    start = np.flatnonzero(((arr[:-1] == ord("e")) | (arr[:-1] == ord("r"))) & digit[1:])
    # token values digit by digit, over the tokens that still have digits left
    value = (arr[start + 1] - ord("0")).astype(np.int64)
    more = np.flatnonzero(digit[np.minimum(start + 2, len(arr) - 1)])
    offset = 2
    while len(more):
        pos = start[more] + offset
        value[more] = value[more] * 10 + (arr[pos] - ord("0"))
        more = more[digit[np.minimum(pos + 1, len(arr) - 1)]]
        offset += 1
    is_rel = arr[start] == ord("r")
    line = np.searchsorted(newlines, start)
    hops = np.bincount(line[is_rel], minlength=n)
    n_ent = np.bincount(line[~is_rel], minlength=n)
    n_bridges = n_ent - 2
    if (
        (hops < 1).any() or (n_ent < 2).any() or not ((n_bridges == 0) | (n_bridges == hops - 1)).all()
        or (hops - 1 > bridge_width).any()
        or (value[~is_rel] >= vocab.n_entities).any() or (value[is_rel] >= vocab.n_relations).any()
    ):
        return None

    def rank(mask: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lines = line[mask]
        return lines, np.arange(len(lines)) - (np.cumsum(counts) - counts)[lines]

    rel_line, rel_rank = rank(is_rel, hops)
    ent_line, ent_rank = rank(~is_rel, n_ent)
    ent_id = value[~is_rel] + 1
    head = ent_rank == n_ent[ent_line] - 1
    ent_start = start[~is_rel]
    for key, which in ((b'"answer":"', ent_rank == 0), (b'"query":"', head)):  # layout check, per line
        at = ent_start[which]
        if (at < len(key)).any() or any((arr[at - len(key) + j] != c).any() for j, c in enumerate(key)):
            return None
    tokens = np.full((n, int(hops.max()) + 1), vocab.pad_id, dtype=np.int64)
    tokens[rel_line, 1 + rel_rank] = value[is_rel] + 1 + vocab.n_entities
    tokens[ent_line[head], 0] = ent_id[head]
    answers = np.empty(n, dtype=np.int64)
    answers[ent_line[ent_rank == 0]] = ent_id[ent_rank == 0]
    bridges = np.full((n, bridge_width), PAD, dtype=np.int64)
    middle = (ent_rank > 0) & ~head
    bridges[ent_line[middle], ent_rank[middle] - 1] = ent_id[middle]
    return EncodedSplit(torch.from_numpy(tokens), torch.from_numpy(hops + 1), torch.from_numpy(answers),
                        torch.from_numpy(hops.astype(np.int64)), torch.from_numpy(bridges))


def dataset_checksum(meta: dict) -> str:
    """sha256 over the splits' names and sha256s: identifies a dataset's content."""
    return hashlib.sha256(dumps({n: s["sha256"] for n, s in meta["splits"].items()}).encode()).hexdigest()


def _read_verified(path: Path, file: str, sha: str, what: str) -> bytes:
    target = path / file
    hint = _rebuild_hint(path)
    if not target.is_file():
        raise FileNotFoundError(f"dataset {path}: {what} ({file}) is missing; {hint}")
    data = target.read_bytes()
    if sha256_bytes(data) != sha:
        raise ValueError(f"dataset {path}: {what} ({file}) sha256 mismatch: file changed since it was written; {hint}")
    return data


def _rebuild_hint(path: Path) -> str:
    try:
        command = rebuild_command(json.loads((path / META).read_text())["origin"]["args"], path)
    except (OSError, ValueError, KeyError, TypeError):
        command = "looplens data ..."
    return f"rebuild with `{command}`"


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Open a dataset directory, verifying meta.json, world.json and every split file's sha256.

    Raises FileNotFoundError / ValueError with one line naming the directory and the faulty file.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset {path}: no such directory; build one with `looplens data ... --out {path}`")
    meta_path = path / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"dataset {path}: {META} is missing; not a looplens dataset (build one with `looplens data`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"dataset {path}: {META} is not valid JSON ({err}); {_rebuild_hint(path)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"dataset {path}: {META} is not a looplens dataset description")
    if meta.get("format_version") != FORMAT_VERSION:
        from looplens import __version__

        raise FormatVersionError(meta_path, f"dataset format_version {meta.get('format_version')} written by looplens "
                                 f"{meta.get('looplens_version', '(unknown)')} is not supported (this looplens "
                                 f"{__version__} reads {FORMAT_VERSION}); {_rebuild_hint(path)}")
    try:
        try:
            DataConfig.from_dict(meta["config"])
        except ValueError as err:
            raise ValueError(f"dataset {path}: {META} has an invalid config: {err}") from None
        world_data = _read_verified(path, meta["world_file"]["file"], meta["world_file"]["sha256"], "world")
        world = World.from_dict(json.loads(world_data))
        for name in meta["split_names"]:
            info = meta["splits"][name]
            _read_verified(path, info["file"], info["sha256"], f"split {name!r}")
    except KeyError as err:
        raise ValueError(f"dataset {path}: {META} lacks {err.args[0]!r}; {_rebuild_hint(path)}") from None
    return Dataset(path, meta, world)
