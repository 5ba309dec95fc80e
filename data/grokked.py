"""Import and export of the GrokkedTransformer / Loop-Think-Generalize JSON format.

That format (OSU-NLP-Group/GrokkedTransformer ``composition.ipynb``; OSU-NLP-Group/Loop-Think-Generalize
``getNhopfact.py``, ``create_dataset.py``) is a directory of JSON lists of items::

    {"input_text": "<e_17><r_3><r_9>", "target_text": "<e_17><r_3><r_9><e_42></a>", "type": "..."}

- ``train.json``: the training items (no "type" in composition; in depth its types are off by two,
  "0hop_train" for 2-hop facts, so they are ignored and hops are counted from the query);
- ``test.json``: evaluation items, each with a "type";
- ``valid.json``: composition: the OOD test items; depth: a copy of test.json;
- ``vocab.json``: the token list (entities, relations, then special tokens).

Type names <-> our split names: composition ``id_atomic``, ``ood_atomic``, ``train_inferred``,
``test_inferred_iid`` (our ``test_inferred_id``), ``test_inferred_ood``, plus our own
``test_inferred_first_ood`` / ``test_inferred_second_ood``; depth ``{k}hop_test`` -> ``test``,
``atomic_facts`` and ``{k}hop_train`` -> ``train_eval``.

An export writes exactly the paper's test.json types (composition: ``id_atomic``, ``ood_atomic``,
``train_inferred``, ``test_inferred_iid``, ``test_inferred_ood``); ``diagnostics=True`` adds our first- and
second-hop-OOD splits. An import rebuilds those two diagnostic splits when test.json lacks them: with our
``looplens.json`` exactly as generation made them (same OOD facts, same caps), else from the data alone,
an atomic fact counting as OOD when no trained 2-hop fact uses it as either hop. An export also writes
``looplens.json`` (our config; the upstream loaders ignore unknown files), so export -> import gives back
the same config and byte-identical splits. An imported dataset may not take the directory name the
trainer gives a generated dataset of the same settings (``<task>-<world>-<checksum>``).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
from looplens.data.config import DataConfig
from looplens.data.facts import PAD, Facts
from looplens.data.provenance import atomic_dir
from looplens.data.sampling import rng_for, sample_rows, sample_without_replacement
from looplens.data.storage import Dataset, load_dataset, sha256_bytes, write_dataset
from looplens.data.tasks import COMPOSITION_SPLITS, DEPTH_SPLITS, Generated, _sample_category, _TwoHopIndex
from looplens.data.vocab import Vocab
from looplens.data.worlds import MISSING, World

SIDECAR = "looplens.json"
SPECIAL_TOKENS = ["<mask>", "<sep>", "<a>", "</a>", "<q>", "</q>"]
COMPOSITION_TYPES = {  # upstream type -> our split
    "id_atomic": "id_atomic",
    "ood_atomic": "ood_atomic",
    "train_inferred": "train_inferred",
    "test_inferred_iid": "test_inferred_id",
    "test_inferred_id": "test_inferred_id",
    "test_inferred_ood": "test_inferred_ood",
    "test_inferred_first_ood": "test_inferred_first_ood",
    "test_inferred_second_ood": "test_inferred_second_ood",
}
_EXPORT_TYPES = {"test_inferred_id": "test_inferred_iid"}  # our split -> upstream type, where they differ
DIAGNOSTIC_SPLITS = {"test_inferred_first_ood": (True, False), "test_inferred_second_ood": (False, True)}  # OOD hops
_HOP_TYPE = re.compile(r"(\d+)hop_(train|test)")
_TOKEN = re.compile(r"<([er])_(\d+)>")
_INPUT = re.compile(r"(?:<[er]_\d+>)+")


# ----------------------------------------------------------------------------------------------
# export


def _items(ds: Dataset, split: str, types: list[str] | str | None) -> list[dict]:
    frame = ds.rows(split)
    inputs = _to_upstream(frame["query"].tolist())
    answers = _to_upstream(frame["answer"].tolist())
    if isinstance(types, str) or types is None:
        types = [types] * len(frame)
    return [
        {"input_text": i, "target_text": i + a + "</a>", **({"type": t} if t is not None else {})}
        for i, a, t in zip(inputs, answers, types)
    ]


def _to_upstream(queries: list[str]) -> list[str]:
    """"e17 r3 r9" -> "<e_17><r_3><r_9>" for a whole list (one regex pass over the joined text)."""
    text = re.sub(r"([er])(\d+) ?", r"<\1_\2>", "\n".join(queries))
    return text.split("\n") if queries else []


def _hop_types(ds: Dataset, split: str, suffix: str, atomic: str) -> list[str]:
    return [atomic if h == 1 else f"{h}hop_{suffix}" for h in ds.rows(split)["hops"].tolist()]


def export_grokked(dataset: Dataset | str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False,
                   diagnostics: bool = False) -> Path:
    """Write ``dataset`` in the GrokkedTransformer / Loop-Think-Generalize format to ``dst`` (atomically).

    test.json holds exactly the paper's types; ``diagnostics`` adds the first- / second-hop-OOD splits.
    """
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    dst = Path(dst)
    if ds.config.task == "composition":
        train = _items(ds, "train", None)
        test = [item for split in ds.split_names if split != "train" and (diagnostics or split not in DIAGNOSTIC_SPLITS)
                for item in _items(ds, split, _EXPORT_TYPES.get(split, split))]
        valid = _items(ds, "test_inferred_ood", None) if "test_inferred_ood" in ds.split_names else []
    else:
        train = _items(ds, "train", _hop_types(ds, "train", "train", "atomic"))
        test = _items(ds, "test", _hop_types(ds, "test", "test", "atomic_facts"))
        if "train_eval" in ds.split_names:
            test += _items(ds, "train_eval", _hop_types(ds, "train_eval", "train", "atomic_facts"))
        valid = test
    vocab = ([f"<e_{i}>" for i in range(ds.vocab.n_entities)] + [f"<r_{j}>" for j in range(ds.vocab.n_relations)]
             + SPECIAL_TOKENS)
    sidecar = {"format": "looplens-grokked-export", "config": ds.config.to_dict(), "world": ds.world.kind,
               "dataset_checksum": ds.checksum, "split_names": ds.split_names}
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        for name, obj in (("train.json", train), ("valid.json", valid), ("test.json", test), ("vocab.json", vocab)):
            (tmp / name).write_text(json.dumps(obj), encoding="utf-8")
        (tmp / SIDECAR).write_text(json.dumps(sidecar, sort_keys=True, indent=1) + "\n", encoding="utf-8")
        tmp.chmod(0o755)
    return dst


# ----------------------------------------------------------------------------------------------
# import


def _load_list(path: Path, required: bool = True) -> list | None:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"import-grokked: {path} is missing (expected train.json and test.json)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"import-grokked: {path} is not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise ValueError(f"import-grokked: {path} must hold a JSON list, got {type(data).__name__}")
    return data


def _parse_items(items: list, file: str, want_type: bool) -> tuple[list[str], list[str], list[str | None]]:
    """Queries and answers in our token spelling ("e17 r3"), and each item's type."""
    queries, answers, types = [], [], []
    for i, item in enumerate(items):
        where = f"import-grokked: {file} item {i}"
        if not isinstance(item, dict) or "input_text" not in item or "target_text" not in item:
            raise ValueError(f"{where}: expected an object with input_text and target_text")
        inp, tgt = item["input_text"], item["target_text"]
        if not isinstance(inp, str) or not _INPUT.fullmatch(inp):
            raise ValueError(f"{where}: input_text {inp!r} is not a sequence of <e_N>/<r_N> tokens")
        answer = tgt[len(inp):-len("</a>")] if isinstance(tgt, str) else None
        if (not isinstance(tgt, str) or not tgt.startswith(inp) or not tgt.endswith("</a>")
                or not re.fullmatch(r"<e_\d+>", answer or "")):
            raise ValueError(f"{where}: target_text {tgt!r} is not input_text + <e_N></a>")
        if want_type and not isinstance(item.get("type"), str):
            raise ValueError(f"{where}: has no \"type\" (every test item needs one)")
        queries.append(inp)
        answers.append(answer)
        types.append(item.get("type"))
    return _from_upstream(queries), _from_upstream(answers), types


def _from_upstream(texts: list[str]) -> list[str]:
    """"<e_17><r_3>" -> "e17 r3" for a whole list."""
    if not texts:
        return []
    return [t.rstrip() for t in _TOKEN.sub(r"\1\2 ", "\n".join(texts)).split("\n")]


def _sizes(vocab_tokens: list | None, queries: list[str], answers: list[str]) -> tuple[int, int]:
    """(n_entities, n_relations): from vocab.json when present, else the largest index used + 1."""
    if vocab_tokens is not None:
        numbered = [m.groups() for t in vocab_tokens if isinstance(t, str) and (m := _TOKEN.fullmatch(t))]
        sizes = []
        for letter, what in (("e", "entity"), ("r", "relation")):
            idx = sorted(int(i) for kind, i in numbered if kind == letter)
            if not idx or idx != list(range(len(idx))):
                raise ValueError(f"import-grokked: vocab.json {what} tokens must be numbered 0..N-1 without gaps")
            sizes.append(len(idx))
        return sizes[0], sizes[1]
    tokens = " ".join(queries + answers).split()
    n_ent = 1 + max(int(t[1:]) for t in tokens if t[0] == "e")
    n_rel = 1 + max((int(t[1:]) for t in tokens if t[0] == "r"), default=0)
    return n_ent, n_rel


def _facts(vocab: Vocab, queries: list[str], answers: list[str], file: str) -> Facts:
    try:
        tokens, lengths = vocab.encode_batch(queries)
        answer_ids = vocab.ids_of(answers, kind="entity")
    except ValueError as err:
        raise ValueError(f"import-grokked: {file}: {err}") from None
    tokens = tokens.numpy()
    relations = np.where(tokens[:, 1:] > 0, tokens[:, 1:] - 1 - vocab.n_entities, PAD)
    hops = lengths.numpy() - 1
    width = relations.shape[1]
    return Facts(tokens[:, 0] - 1, relations, hops, answer_ids - 1, np.full((len(queries), max(width - 1, 0)), PAD))


def _world_from_atomic(atomic: Facts, n_entities: int, n_relations: int) -> World:
    heads, rels, tails = atomic.heads, atomic.relations[:, 0], atomic.answers
    key = heads * n_relations + rels
    pairs = np.unique(np.stack([key, tails], axis=1), axis=0)
    dup = np.flatnonzero(np.diff(pairs[:, 0]) == 0)
    if len(dup):
        k = pairs[dup[0], 0]
        raise ValueError(f"import-grokked: atomic fact e{k // n_relations} r{k % n_relations} has two different "
                         f"answers (e{pairs[dup[0], 1]}, e{pairs[dup[0] + 1, 1]})")
    table = np.full((n_entities, n_relations), MISSING, dtype=np.int64)
    table[pairs[:, 0] // n_relations, pairs[:, 0] % n_relations] = pairs[:, 1]
    kind = "permutation" if World("random-tail", n_entities, n_relations, table).is_permutation() else "random-tail"
    return World(kind, n_entities, n_relations, table)


def _fill_bridges(world: World, facts: Facts, file: str) -> int:
    """Follow each row through the world: set its bridges, check its answer. Returns rows left unknown."""
    current = facts.heads.copy()
    path = np.full((len(facts), facts.width), PAD, dtype=np.int64)
    for hop in range(facts.width):
        active = (hop < facts.hops) & (current != PAD)
        nxt = np.full(len(facts), PAD, dtype=np.int64)
        nxt[active] = world.tails[current[active], facts.relations[active, hop]]
        current = np.where(hop < facts.hops, nxt, current)
        path[:, hop] = np.where(hop < facts.hops, nxt, PAD)
    known = current != PAD
    wrong = known & (current != facts.answers)
    if wrong.any():
        i = int(np.argmax(wrong))
        raise ValueError(f"import-grokked: {file} item {i}: answer e{facts.answers[i]} but its atomic facts lead to "
                         f"e{current[i]}")
    bridges = path[:, :-1] if facts.width else path
    facts.bridges = np.where(known[:, None], bridges, PAD)
    return int((~known & (facts.hops > 1)).sum())


def import_grokked(src: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert a GrokkedTransformer / Loop-Think-Generalize data directory into a looplens dataset.

    The world is rebuilt from the atomic facts (all of which are in train.json in both upstream
    recipes); bridges are recomputed wherever the world has every edge of a chain (else left unknown),
    and every answer the world can check is checked. Without a ``looplens.json`` the config is inferred
    from the data (sizes, ratios, caps; seed 0) and only describes it.
    """
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"import-grokked: {src} is not a directory")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    train_items = _load_list(src / "train.json")
    test_items = _load_list(src / "test.json")
    vocab_tokens = _load_list(src / "vocab.json", required=False)
    sidecar = json.loads((src / SIDECAR).read_text()) if (src / SIDECAR).is_file() else None

    train_q, train_a, _ = _parse_items(train_items, "train.json", want_type=False)
    test_q, test_a, test_types = _parse_items(test_items, "test.json", want_type=True)
    n_ent, n_rel = _sizes(vocab_tokens, train_q + test_q, train_a + test_a)
    vocab = Vocab(n_ent, n_rel)
    train = _facts(vocab, train_q, train_a, "train.json")
    test = _facts(vocab, test_q, test_a, "test.json")
    atomic = Facts.concat([train.take(train.hops == 1), test.take(test.hops == 1)])
    world = _world_from_atomic(atomic, n_ent, n_rel)
    unknown = _fill_bridges(world, train, "train.json") + _fill_bridges(world, test, "test.json")

    task, target = _assign_splits(test_types)
    # an empty split leaves no item behind; our sidecar remembers it so a round trip keeps every split
    listed = set(sidecar.get("split_names", [])) if sidecar else set()
    names = [n for n in (COMPOSITION_SPLITS if task == "composition" else DEPTH_SPLITS)
             if n == "train" or n in set(target) or n in listed]
    splits = {"train": train.sorted()}
    target = np.array(target, dtype=object)
    for name in names[1:]:
        splits[name] = test.take(np.flatnonzero(target == name)).sorted()
    max_hops = int(max(train.hops.max(initial=1), test.hops.max(initial=1)))

    config = _config(sidecar, task, world, splits, max_hops)
    if out_dir.name == config.dirname():
        raise ValueError(f"import-grokked: --out {out_dir}: {out_dir.name!r} is the directory name the trainer gives "
                         f"a generated dataset of these settings; name the imported one differently (e.g. "
                         f"{config.task}-{config.world}-imported-{config.checksum()})")
    rebuilt = {}
    if task == "composition":
        missing = [n for n in DIAGNOSTIC_SPLITS if n not in set(target)]
        if missing:
            rebuilt_splits, how = _diagnostic_splits(world, splits, config, from_config=sidecar is not None)
            for name in missing:
                splits[name] = rebuilt_splits[name]
                rebuilt[name] = how
            names = [n for n in COMPOSITION_SPLITS if n in splits]
    train_keys = set(splits["train"].query_keys(max_hops).tolist())
    overlap = {n: int(sum(k in train_keys for k in s.query_keys(max_hops).tolist()))
               for n, s in splits.items() if n != "train" and n not in ("id_atomic", "ood_atomic", "train_inferred",
                                                                          "train_eval")}
    files = {f: sha256_bytes((src / f).read_bytes()) for f in ("train.json", "test.json", "vocab.json", SIDECAR)
             if (src / f).is_file()}
    origin = {
        "kind": "imported",
        "format": "grokked",
        "source": str(src.resolve()),
        "source_sha256": files,
        "config_inferred": sidecar is None,
        "test_types": dict(sorted(Counter(test_types).items())),
        "rows_with_unknown_bridges": unknown,
        "test_rows_also_in_train": overlap,
        "rebuilt_splits": rebuilt,
        "args": ["import-grokked", str(src)],
    }
    counts = {"atomic": world.n_facts}
    generated = Generated(world, splits, counts, max_hops=max(max_hops, 2))
    return write_dataset(out_dir, config=config, generated=generated, split_names=names, origin=origin,
                         overwrite=overwrite)


def _ood_by_generation(world: World, config: DataConfig) -> np.ndarray:
    """The OOD atomic facts exactly as data.tasks.composition_splits draws them (same seed, same order)."""
    n_atomic = world.n_facts
    ood = np.zeros(n_atomic, dtype=bool)
    ood[sample_without_replacement(rng_for(config.seed, "composition/ood"), n_atomic,
                                   round(config.ood_fraction * n_atomic))] = True
    return ood


def _ood_by_usage(world: World, train: Facts) -> np.ndarray:
    """Atomic facts that no trained 2-hop fact uses as either hop (the paper's "never composed")."""
    heads, relations, _ = world.facts()
    keys = heads * world.n_relations + relations
    two = train.take(train.hops == 2)
    if not len(two):  # no compositions trained: every fact is OOD
        return np.ones(len(keys), dtype=bool)
    first = two.heads * world.n_relations + two.relations[:, 0]
    bridge = two.bridges[:, 0]
    known = bridge != PAD
    second = bridge[known] * world.n_relations + two.relations[known, 1]
    return ~np.isin(keys, np.concatenate([first, second]))


def _diagnostic_splits(world: World, splits: dict[str, Facts], config: DataConfig, from_config: bool
                       ) -> tuple[dict[str, Facts], str]:
    """First-hop-OOD and second-hop-OOD 2-hop facts (capped at eval_max as generation caps them), and how
    the OOD facts were found."""
    ood, how = None, "ood facts: atomic facts no trained 2-hop fact uses"
    if from_config:
        ood = _ood_by_generation(world, config)
        heads, relations, _ = world.facts()
        keys = heads * world.n_relations + relations
        listed = splits.get("ood_atomic")
        if listed is not None and not np.isin(listed.heads * world.n_relations + listed.relations[:, 0],
                                               keys[ood]).all():
            ood = None  # the config does not reproduce this data's OOD facts: use the data alone
        else:
            how = "ood facts: as generation draws them (looplens.json config)"
    if ood is None:
        ood = _ood_by_usage(world, splits["train"])
    out = {}
    for name, (first_ood, second_ood) in DIAGNOSTIC_SPLITS.items():
        index = _TwoHopIndex(world, ood, first_ood, second_ood)
        ranks = sample_rows(rng_for(config.seed, f"composition/eval/{name}"), index.total, config.eval_max)
        out[name] = _sample_category(index, ranks).sorted()
    return out, how


def _assign_splits(types: list[str | None]) -> tuple[str, list[str]]:
    """The task, and our split name for each test.json item, from the items' types."""
    depth = any(_HOP_TYPE.fullmatch(t) or t == "atomic_facts" for t in types)
    target = []
    for i, t in enumerate(types):
        if depth:
            m = _HOP_TYPE.fullmatch(t)
            if m:
                target.append("test" if m.group(2) == "test" else "train_eval")
            elif t in ("atomic_facts", "atomic"):
                target.append("train_eval")
            else:
                raise ValueError(f"import-grokked: test.json item {i} has type {t!r}; a depth dataset's types are "
                                 f"'<k>hop_test', '<k>hop_train' and 'atomic_facts'")
        elif t in COMPOSITION_TYPES:
            target.append(COMPOSITION_TYPES[t])
        else:
            raise ValueError(f"import-grokked: test.json item {i} has unknown type {t!r} (expected one of "
                             f"{', '.join(COMPOSITION_TYPES)} or '<k>hop_test')")
    return ("depth" if depth else "composition"), target


def _config(sidecar: dict | None, task: str, world: World, splits: dict[str, Facts], max_hops: int) -> DataConfig:
    sizes = {"task": task, "world": world.kind, "n_entities": world.n_entities, "n_relations": world.n_relations}
    if sidecar is not None:
        config = DataConfig.from_dict(sidecar.get("config", {}))
        for key, value in sizes.items():
            if getattr(config, key) != value:
                raise ValueError(f"import-grokked: {SIDECAR} says {key}={getattr(config, key)!r} but the data gives "
                                 f"{value!r}")
        return config
    degrees = world.out_degrees()
    inferred: dict = {**sizes, "out_degree": max(int(degrees.max(initial=1)), 1)}
    evals = [len(s) for n, s in splits.items() if n not in ("train", "test") and len(s)]
    inferred["eval_max"] = max(evals, default=DataConfig.eval_max)
    if task == "composition":
        n_atomic = world.n_facts
        n_ood = len(splits.get("ood_atomic", [])) if "ood_atomic" in splits else 0
        n_2hop = int((splits["train"].hops == 2).sum())
        inferred["ood_fraction"] = round(n_ood / n_atomic, 6) if n_atomic else 0.0
        inferred["phi"] = round(n_2hop / max(n_atomic - n_ood, 1), 6)
    else:
        inferred["max_hops"] = max(max_hops, 2)
        for split, field in (("train", "per_hop_train"), ("test", "per_hop_test")):
            hops = splits[split].hops if split in splits else np.zeros(0, np.int64)
            per_k = np.bincount(hops[hops >= 2]) if (hops >= 2).any() else np.array([1])
            inferred[field] = max(int(per_k.max()), 1)
    return DataConfig(**inferred)
