"""data/: configs, worlds, vocab, the two tasks' invariants (small and paper scale), storage, shortcuts."""

from __future__ import annotations

import doctest
import importlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from looplens.data import (
    DataConfig,
    Dataset,
    EncodedSplit,
    Vocab,
    World,
    build_dataset,
    ensure_dataset,
    load_dataset,
    make_world,
    shortcut_rate,
)
from looplens.data.facts import PAD, Facts
from looplens.data.tasks import COMPOSITION_SPLITS, DEPTH_SPLITS, TRAIN_SAMPLES, generate

SMALL_COMP = DataConfig(task="composition", world="random-tail", n_entities=120, n_relations=12, out_degree=4,
                        phi=3.0, test_id_fraction=0.05, eval_max=200, seed=3)
SMALL_DEPTH = DataConfig(task="depth", world="permutation", n_entities=30, n_relations=4, max_hops=6,
                         per_hop_train=60, per_hop_test=20, eval_max=50, seed=1)


# ----------------------------------------------------------------------------------------------
# helpers


def keys(facts: Facts, width: int = 8) -> set:
    return set(facts.query_keys(width).tolist())


def fact_keys(heads: np.ndarray, relations: np.ndarray, n_relations: int) -> np.ndarray:
    return heads * n_relations + relations


def assert_follows_world(world: World, facts: Facts) -> None:
    """Every answer is the chain followed through the world; bridges are the intermediate entities."""
    assert len(facts) > 0
    for k in np.unique(facts.hops):
        rows = facts.hops == k
        answers, bridges = world.follow(facts.heads[rows], facts.relations[rows, :k])
        np.testing.assert_array_equal(answers, facts.answers[rows])
        np.testing.assert_array_equal(bridges, facts.bridges[rows, : k - 1])
        assert (facts.relations[rows, k:] == PAD).all() and (facts.bridges[rows, k - 1:] == PAD).all()


def assert_canonical_order(facts: Facts) -> None:
    np.testing.assert_array_equal(facts.sort_order(), np.arange(len(facts)))


def no_temp_dirs(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def comp_gen():
    return generate(SMALL_COMP)


@pytest.fixture(scope="module")
def paper_comp():
    return generate(DataConfig())


@pytest.fixture(scope="module")
def depth_dir(tmp_path_factory):
    return build_dataset(SMALL_DEPTH, tmp_path_factory.mktemp("depth") / "ds")


@pytest.fixture(scope="module")
def comp_dir(tmp_path_factory):
    return build_dataset(SMALL_COMP, tmp_path_factory.mktemp("comp") / "ds")


# ----------------------------------------------------------------------------------------------
# DataConfig


def test_config_defaults_are_the_paper_and_round_trip():
    cfg = DataConfig()
    assert (cfg.n_entities, cfg.n_relations, cfg.out_degree, cfg.ood_fraction, cfg.phi) == (2000, 200, 20, 0.05, 7.2)
    assert (cfg.eval_max, cfg.max_hops, cfg.per_hop_train, cfg.per_hop_test) == (3000, 40, 15000, 750)
    assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.checksum() == DataConfig().checksum() and len(cfg.checksum()) == 12
    assert cfg.checksum() != cfg.replace(seed=1).checksum()
    assert DataConfig(world="permutation", n_relations=10).out_degree == 10  # normalised


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"n_entities": -5}, "n_entities"),
        ({"n_relations": 0}, "n_relations"),
        ({"out_degree": 0}, "out_degree"),
        ({"out_degree": 300}, "out_degree"),
        ({"ood_fraction": 1.5}, "ood_fraction"),
        ({"phi": -1.0}, "phi"),
        ({"phi": float("nan")}, "phi"),
        ({"eval_max": 0}, "eval_max"),
        ({"max_hops": 1}, "max_hops"),
        ({"per_hop_train": -1}, "per_hop_train"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"task": "sorting"}, "task"),
        ({"world": "grid"}, "world"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"DataConfig\.{field} "):
        DataConfig(**changes)


def test_config_from_dict_rejects_unknown_key():
    with pytest.raises(ValueError, match="unknown key 'n_entites'"):
        DataConfig.from_dict({"n_entites": 5})


# ----------------------------------------------------------------------------------------------
# worlds


def test_random_tail_world_out_degree_and_tails():
    w = make_world("random-tail", 300, 40, out_degree=7, seed=0)
    assert (w.out_degrees() == 7).all()  # exactly out_degree distinct relations per entity
    assert w.n_facts == 300 * 7
    heads, rels, tails = w.facts()
    assert len(np.unique(heads * 40 + rels)) == len(heads)
    assert tails.min() >= 0 and tails.max() < 300
    assert len(np.unique(tails)) > 250  # tails spread over the entities (uniformly random)
    assert not w.is_permutation()
    assert w == make_world("random-tail", 300, 40, out_degree=7, seed=0)
    assert w != make_world("random-tail", 300, 40, out_degree=7, seed=1)


def test_paper_world_sizes():
    w = make_world("random-tail", 2000, 200, out_degree=20, seed=0)
    assert w.n_facts == 40_000
    p = make_world("permutation", 200, 10, seed=0)
    assert p.n_facts == 2_000


def test_permutation_world_relations_are_bijections():
    w = make_world("permutation", 200, 10, seed=4)
    assert w.is_permutation()
    for r in range(10):
        assert sorted(w.tails[:, r].tolist()) == list(range(200))
    # the relations differ from each other and from the identity
    assert len({tuple(w.tails[:, r]) for r in range(10)}) == 10


def test_follow_is_vectorised_chain_following_and_rejects_missing_edges():
    w = make_world("random-tail", 50, 6, out_degree=2, seed=0)
    heads, rels, tails = w.facts()
    # a 2-hop chain built by hand from two facts
    b = tails[0]
    second = np.flatnonzero(heads == b)[0]
    answers, bridges = w.follow([heads[0]], [[rels[0], rels[second]]])
    assert answers.tolist() == [tails[second]] and bridges.tolist() == [[b]]
    missing = int(np.flatnonzero(w.tails[0] == -1)[0])
    with pytest.raises(ValueError, match=rf"chain 1 leaves the world at hop 1: entity e0 has no relation r{missing}"):
        w.follow([heads[0], 0], [[rels[0]], [missing]])
    with pytest.raises(ValueError, match="relation index 6"):
        w.follow([0], [[6]])


def test_world_json_round_trip():
    w = make_world("random-tail", 20, 5, out_degree=2, seed=0)
    assert World.from_dict(json.loads(json.dumps(w.to_dict()))) == w


# ----------------------------------------------------------------------------------------------
# vocab


def test_vocab_layout_and_round_trip():
    v = Vocab(2000, 200)
    assert len(v) == 2201 and v.pad_id == 0 and v.tokens[0] == "<pad>"
    assert v.tokens[1] == "e0" and v.tokens[2000] == "e1999" and v.tokens[2001] == "r0" and v.tokens[2200] == "r199"
    assert v.entity_token(17) == 18 and v.relation_token(3) == 2004
    assert v.entity_index(18) == 17 and v.relation_index(2004) == 3
    assert v.encode("e17 r3 r9") == [18, 2004, 2010]
    assert v.decode([18, 2004, 2010, 0]) == "e17 r3 r9"
    assert v.decode(torch.tensor([18, 0])) == "e17"
    assert v.is_entity(np.array([0, 1, 2000, 2001])).tolist() == [False, True, True, False]
    np.testing.assert_array_equal(v.entity_token(np.arange(3)), [1, 2, 3])
    with pytest.raises(ValueError, match="not an entity token id"):
        v.entity_index(2001)
    with pytest.raises(ValueError, match="relation index 200"):
        v.relation_token(200)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("e17 r3 x9", r"token 'x9' at position 2 is not a known token"),
        ("e17 r3 e4", r"token 'e4' at position 2 is an entity; expected a relation"),
        ("r3 r4", r"token 'r3' at position 0 is a relation; expected an entity"),
        ("e2000 r1", r"token 'e2000' at position 0 is not a known token"),
        ("e1 <pad>", r"token '<pad>' at position 1 is padding; expected a relation"),
        ("", r"is empty"),
    ],
)
def test_vocab_rejects_bad_queries_naming_token_and_position(query, message):
    v = Vocab(2000, 200)
    with pytest.raises(ValueError, match=message):
        v.encode(query)


def test_encode_batch_right_pads_and_reports_the_bad_row():
    v = Vocab(10, 5)
    tokens, lengths = v.encode_batch(["e1 r0", "e2 r1 r2 r3", "e9 r4"])
    assert tokens.dtype == torch.long and lengths.tolist() == [2, 4, 2]
    assert tokens.tolist() == [[2, 11, 0, 0], [3, 12, 13, 14], [10, 15, 0, 0]]
    with pytest.raises(ValueError, match=r"query 1 \('e2 r1 zz'\): token 'zz' at position 2"):
        v.encode_batch(["e1 r0", "e2 r1 zz"])


# ----------------------------------------------------------------------------------------------
# composition


def check_composition(g, cfg: DataConfig) -> None:
    world, s = g.world, g.splits
    n_rel = world.n_relations
    assert list(s) == list(COMPOSITION_SPLITS)
    ood_keys = set(fact_keys(g.ood_atomic.heads, g.ood_atomic.relations[:, 0], n_rel).tolist())
    atomic = Facts.atomic(world)
    assert len(g.ood_atomic) == round(cfg.ood_fraction * len(atomic))

    def hop_status(f: Facts) -> tuple[np.ndarray, np.ndarray]:
        first = np.isin(fact_keys(f.heads, f.relations[:, 0], n_rel), list(ood_keys))
        second = np.isin(fact_keys(f.bridges[:, 0], f.relations[:, 1], n_rel), list(ood_keys))
        return first, second

    for name, f in s.items():
        if len(f):
            assert_follows_world(world, f)
            assert_canonical_order(f)
        if name != "train":
            assert len(f) <= cfg.eval_max, name
    train = s["train"]
    # train = all atomic facts (ID and OOD) + round(phi x |ID atomic|) 2-hop facts
    assert keys(train.take(train.hops == 1)) == keys(atomic)
    n_id = len(atomic) - len(g.ood_atomic)
    assert int((train.hops == 2).sum()) == round(cfg.phi * n_id) == g.counts["inferred_trained"]
    # no OOD atomic fact is used by any training composition, as first or as second hop
    first, second = hop_status(train.take(train.hops == 2))
    assert not first.any() and not second.any()
    expected = {"test_inferred_id": (False, False), "train_inferred": (False, False),
                "test_inferred_ood": (True, True), "test_inferred_first_ood": (True, False),
                "test_inferred_second_ood": (False, True)}
    for name, (want_first, want_second) in expected.items():
        assert (s[name].hops == 2).all()
        first, second = hop_status(s[name])
        assert (first == want_first).all() and (second == want_second).all(), name
    # atomic eval splits: ID / OOD samples of the atomic facts
    id_f = np.isin(fact_keys(s["id_atomic"].heads, s["id_atomic"].relations[:, 0], n_rel), list(ood_keys))
    assert not id_f.any() and (s["id_atomic"].hops == 1).all()
    assert keys(s["ood_atomic"]) <= keys(g.ood_atomic)
    # samples of train are subsets of it; everything else is pairwise disjoint
    train_keys = keys(train)
    for name in TRAIN_SAMPLES & set(s):
        assert keys(s[name]) <= train_keys, name
    disjoint = [n for n in s if n not in TRAIN_SAMPLES]
    for i, a in enumerate(disjoint):
        assert len(keys(s[a])) == len(s[a]), f"duplicate queries in {a}"
        for b in disjoint[i + 1:]:
            assert not keys(s[a]) & keys(s[b]), (a, b)


def test_composition_invariants_small(comp_gen):
    check_composition(comp_gen, SMALL_COMP)
    assert len(comp_gen.splits["test_inferred_ood"]) > 0
    assert len(comp_gen.splits["ood_atomic"]) == len(comp_gen.ood_atomic)  # eval_max above |OOD|


def test_composition_paper_scale(paper_comp):
    """Section 5: 40,000 atomic facts, 273,600 trained 2-hop facts, ~2,000 OOD test facts."""
    g = paper_comp
    assert g.counts["atomic"] == 40_000 and g.counts["ood_atomic"] == 2_000
    assert len(g.splits["train"]) == 40_000 + 273_600
    assert int((g.splits["train"].hops == 2).sum()) == 273_600
    assert 1_700 <= g.counts["inferred_ood"] <= 2_300  # 40,000 x 0.05 x 20 x 0.05 = 2,000 expected
    assert len(g.splits["test_inferred_ood"]) == g.counts["inferred_ood"]  # below the 3,000 cap
    for name in ("id_atomic", "train_inferred", "test_inferred_id", "test_inferred_first_ood",
                 "test_inferred_second_ood"):
        assert len(g.splits[name]) == 3_000
    check_composition(g, DataConfig())


def test_composition_on_a_permutation_world():
    cfg = DataConfig(task="composition", world="permutation", n_entities=60, n_relations=5, eval_max=500, phi=3.0)
    g = generate(cfg)
    check_composition(g, cfg)


def test_phi_too_large_is_a_clear_error():
    with pytest.raises(ValueError, match=r"phi=50.0 asks for .* lower --phi"):
        generate(SMALL_COMP.replace(phi=50.0))


def test_generation_is_deterministic_and_seeded(comp_gen):
    again = generate(SMALL_COMP)
    for name in COMPOSITION_SPLITS:
        np.testing.assert_array_equal(again.splits[name].relations, comp_gen.splits[name].relations)
        np.testing.assert_array_equal(again.splits[name].heads, comp_gen.splits[name].heads)
    other = generate(SMALL_COMP.replace(seed=4))
    assert keys(other.splits["train"]) != keys(comp_gen.splits["train"])


def test_both_tasks_share_the_world_of_a_seed():
    a = generate(SMALL_DEPTH)
    b = generate(SMALL_DEPTH.replace(task="composition", eval_max=3000, phi=1.0))
    assert a.world == b.world


# ----------------------------------------------------------------------------------------------
# depth


def check_depth(g, cfg: DataConfig) -> None:
    s = g.splits
    assert list(s) == list(DEPTH_SPLITS)
    atomic = Facts.atomic(g.world)
    for f in s.values():
        assert_follows_world(g.world, f)
        assert_canonical_order(f)
    train, test, train_eval = s["train"], s["test"], s["train_eval"]
    assert keys(train.take(train.hops == 1)) == keys(atomic)
    assert (test.hops >= 2).all()
    for k in range(2, cfg.max_hops + 1):
        assert int((train.hops == k).sum()) == cfg.per_hop_train, k
        assert int((test.hops == k).sum()) == cfg.per_hop_test, k
        assert 0 < int((train_eval.hops == k).sum()) <= cfg.per_hop_test
    assert int((train_eval.hops == 1).sum()) == min(cfg.eval_max, len(atomic))
    assert int(train.hops.max()) == cfg.max_hops
    assert len(keys(train, 64)) == len(train) and len(keys(test, 64)) == len(test)
    assert not keys(train, 64) & keys(test, 64)
    assert keys(train_eval, 64) <= keys(train, 64)


def test_depth_invariants_permutation():
    check_depth(generate(SMALL_DEPTH), SMALL_DEPTH)


def test_depth_on_random_tail_follows_existing_edges_only():
    cfg = DataConfig(task="depth", world="random-tail", n_entities=40, n_relations=8, out_degree=3, max_hops=7,
                     per_hop_train=50, per_hop_test=10, eval_max=20, seed=2)
    check_depth(generate(cfg), cfg)


def test_depth_large_k_uses_rejection_sampling_and_stays_unique():
    # 200 x 10^k chains: k >= 5 exceeds the enumeration limit, so this exercises the i.i.d. sampler
    cfg = DataConfig(task="depth", world="permutation", n_entities=200, n_relations=10, max_hops=9,
                     per_hop_train=3000, per_hop_test=200, seed=0)
    check_depth(generate(cfg), cfg)


def test_depth_too_few_chains_names_k():
    cfg = DataConfig(task="depth", world="permutation", n_entities=5, n_relations=2, max_hops=3,
                     per_hop_train=20, per_hop_test=5)
    with pytest.raises(ValueError, match=r"k=2: the world has only 20 distinct 2-hop chains"):
        generate(cfg)


def irregular_world() -> World:
    """Out-degrees 0..4 (entity 0 a dead end), so walk-based and chain-uniform sampling differ."""
    rng = np.random.default_rng(0)
    tails = np.full((12, 4), -1)
    for e in range(1, 12):
        rels = rng.permutation(4)[: 1 + e % 4]
        tails[e, rels] = rng.integers(0, 12, size=len(rels))
    return World("random-tail", 12, 4, tails)


def test_chain_sampler_is_uniform_over_distinct_chains():
    from looplens.data.tasks import _ChainCounter

    counter = _ChainCounter(irregular_world())
    heads, relations = counter.enumerate(3)
    total = counter.total(3)
    assert len(heads) == total and len(np.unique(np.column_stack([heads, relations]), axis=0)) == total
    drawn_h, drawn_r = counter.sample(3, 200 * int(total), np.random.default_rng(1))
    assert len(drawn_h) == 200 * total  # no walker died in a dead end
    every = {tuple(row) for row in np.column_stack([heads, relations]).tolist()}
    drawn = pd.Series([tuple(row) for row in np.column_stack([drawn_h, drawn_r]).tolist()]).value_counts()
    assert set(drawn.index) == every  # only real chains, and all of them
    assert drawn.min() > 140 and drawn.max() < 265  # 200 expected each (binomial sd ~14)


def test_depth_on_an_irregular_world():
    cfg = DataConfig(task="depth", world="random-tail", n_entities=12, n_relations=4, out_degree=4, max_hops=4,
                     per_hop_train=20, per_hop_test=5, eval_max=10)
    from looplens.data.tasks import depth_splits

    g = depth_splits(irregular_world(), cfg)
    check_depth(g, cfg)
    assert not (g.splits["test"].heads == 0).any()  # entity 0 has no relations


# ----------------------------------------------------------------------------------------------
# storage


def test_build_writes_the_documented_layout(comp_dir):
    meta = json.loads((comp_dir / "meta.json").read_text())
    for key in ("task", "world", "seed", "config", "counts", "splits", "looplens_version", "git_sha",
                "torch_version", "numpy_version"):
        assert key in meta, key
    assert meta["config"] == SMALL_COMP.to_dict()
    assert meta["split_names"] == list(COMPOSITION_SPLITS)
    for name, info in meta["splits"].items():
        assert info["file"] == f"{name}.jsonl" and (comp_dir / info["file"]).is_file()
    line = (comp_dir / "train.jsonl").read_text().splitlines()[-1]
    row = json.loads(line)
    assert set(row) == {"query", "answer", "hops", "bridges"} and row["hops"] == 2 and len(row["bridges"]) == 1
    assert line == json.dumps(row, sort_keys=True, separators=(",", ":"))  # deterministic JSON
    assert (comp_dir / "meta.json").stat().st_mode & 0o005  # readable by others


def test_build_is_byte_identical_across_builds(tmp_path, comp_dir):
    again = build_dataset(SMALL_COMP, tmp_path / "again")
    files = sorted(p.name for p in comp_dir.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (comp_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_load_dataset_rows_and_encoding(comp_dir, comp_gen):
    ds = load_dataset(comp_dir)
    assert isinstance(ds, Dataset) and ds.config == SMALL_COMP and ds.world == comp_gen.world
    assert ds.vocab == Vocab(SMALL_COMP.n_entities, SMALL_COMP.n_relations)
    assert ds.split_names == list(COMPOSITION_SPLITS)
    rows = ds.rows("test_inferred_ood")
    assert list(rows.columns) == ["query", "answer", "hops", "bridges"]
    assert rows["hops"].dtype == np.int64 and isinstance(rows["bridges"].iloc[0], list)
    enc = ds.encode("train")
    assert enc is ds.encode("train")  # cached
    assert isinstance(enc, EncodedSplit) and len(enc) == len(comp_gen.splits["train"])
    assert enc.tokens.dtype == enc.answers.dtype == enc.bridges.dtype == torch.long
    assert enc.bridges.shape == (len(enc), 1)  # max_hops - 1 with max_hops = 2 for composition
    # padding after the query, answer read at lengths - 1 is the last relation
    positions = torch.arange(enc.tokens.shape[1])
    assert (enc.tokens[positions >= enc.lengths[:, None]] == ds.vocab.pad_id).all()
    assert ds.vocab.is_relation(enc.tokens[torch.arange(len(enc)), enc.lengths - 1]).all()
    assert (enc.hops == enc.lengths - 1).all()
    assert ds.vocab.is_entity(enc.answers).all()
    assert ((enc.bridges == -1) == (enc.hops == 1)[:, None]).all()
    # decoding the encoded split gives the rows back, and facts() the generated arrays
    frame = ds.rows("train")
    assert ds.vocab.decode(enc.tokens[-1]) == frame["query"].iloc[-1]
    assert ds.vocab.decode(enc.answers[-1:]) == frame["answer"].iloc[-1]
    facts = ds.facts("train")
    np.testing.assert_array_equal(facts.answers, comp_gen.splits["train"].answers)
    np.testing.assert_array_equal(facts.bridges, comp_gen.splits["train"].bridges)
    assert ds.checksum == load_dataset(comp_dir).checksum and len(ds.checksum) == 64


def assert_same_encoding(a: EncodedSplit, b: EncodedSplit) -> None:
    for name in ("tokens", "lengths", "answers", "hops", "bridges"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("split", ["train", "test_inferred_ood"])
def test_byte_level_encoder_matches_the_string_parser(comp_dir, split):
    from looplens.data.storage import _encode_jsonl_bytes

    ds = load_dataset(comp_dir)
    data = ds._read(split)
    assert_same_encoding(_encode_jsonl_bytes(data, ds.vocab, 1), ds._encode_strings(split, data))


def test_byte_level_encoder_refuses_other_layouts():
    """Reordered keys or spacing would shift tokens: the fast path must hand over to json parsing."""
    from looplens.data.storage import _encode_jsonl_bytes

    v = Vocab(10, 3)
    ours = b'{"answer":"e2","bridges":["e5"],"hops":2,"query":"e1 r0 r2"}\n'
    enc = _encode_jsonl_bytes(ours, v, 1)
    assert enc.tokens.tolist() == [[2, 11, 13]] and enc.answers.tolist() == [3] and enc.bridges.tolist() == [[6]]
    reordered = b'{"query":"e1 r0 r2","answer":"e2","bridges":["e5"],"hops":2}\n'
    assert _encode_jsonl_bytes(reordered, v, 1) is None
    spaced = b'{"answer": "e2", "bridges": ["e5"], "hops": 2, "query": "e1 r0 r2"}\n'
    assert _encode_jsonl_bytes(spaced, v, 1) is None
    assert _encode_jsonl_bytes(ours.replace(b"e5", b"e50"), v, 1) is None  # out of range


def test_encoded_split_subset(depth_dir):
    enc = load_dataset(depth_dir).encode("train")
    assert enc.bridges.shape == (len(enc), SMALL_DEPTH.max_hops - 1)
    deep = enc.subset(enc.hops >= 4)
    assert len(deep) == 3 * SMALL_DEPTH.per_hop_train and (deep.hops >= 4).all()
    picked = enc.subset([0, 5, 5])
    assert picked.tokens[1].tolist() == picked.tokens[2].tolist() == enc.tokens[5].tolist()
    assert len(enc.subset(np.arange(3))) == 3
    with pytest.raises(ValueError, match="mask must have shape"):
        enc.subset(torch.ones(3, dtype=torch.bool))


def test_depth_dataset_on_disk(depth_dir):
    ds = load_dataset(depth_dir)
    assert ds.split_names == ["train", "test", "train_eval"]
    # curriculum stage k = rows of train with hops <= k
    train = ds.rows("train")
    stage = train[train["hops"] <= 3]
    assert sorted(stage["hops"].unique().tolist()) == [1, 2, 3]
    row = ds.rows("test").iloc[-1]
    assert row["hops"] == SMALL_DEPTH.max_hops and len(row["bridges"]) == SMALL_DEPTH.max_hops - 1
    answers, bridges = ds.world.follow(*_indices(ds.vocab, row["query"]))
    assert f"e{answers[0]}" == row["answer"] and [f"e{b}" for b in bridges[0]] == row["bridges"]


def _indices(vocab: Vocab, query: str):
    ids = vocab.encode(query)
    return [vocab.entity_index(ids[0])], [[vocab.relation_index(i) for i in ids[1:]]]


def test_corrupted_split_names_the_file(tmp_path, depth_dir):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(depth_dir, copy)
    data = bytearray((copy / "test.jsonl").read_bytes())
    data[10] = ord("7") if data[10] != ord("7") else ord("8")
    (copy / "test.jsonl").write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        load_dataset(copy)
    message = str(err.value)
    assert "split 'test' (test.jsonl) sha256 mismatch" in message and "\n" not in message
    assert "looplens data --task depth --world permutation --entities 30" in message
    assert f"--out {copy} --overwrite" in message


def test_corrupted_world_and_missing_files(tmp_path, depth_dir):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(depth_dir, copy)
    (copy / "world.json").write_text((copy / "world.json").read_text().replace("[", "[ ", 1))
    with pytest.raises(ValueError, match=r"world \(world.json\) sha256 mismatch"):
        load_dataset(copy)
    shutil.copy(depth_dir / "world.json", copy / "world.json")
    (copy / "train_eval.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"split 'train_eval' \(train_eval.jsonl\) is missing"):
        load_dataset(copy)
    (copy / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is not valid JSON"):
        load_dataset(copy)
    (copy / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        load_dataset(copy)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_dataset(tmp_path / "nothing")


def test_existing_output_needs_overwrite_and_leaves_nothing_half_written(tmp_path):
    cfg = SMALL_DEPTH.replace(max_hops=3)
    out = build_dataset(cfg, tmp_path / "ds")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="already exists"):
        build_dataset(cfg, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    build_dataset(cfg.replace(seed=9), out, overwrite=True)
    assert load_dataset(out).config.seed == 9
    assert no_temp_dirs(tmp_path)


def test_failures_leave_no_output_and_no_temp_dirs(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="phi"):
        build_dataset(SMALL_COMP.replace(phi=99.0), tmp_path / "a")
    assert not (tmp_path / "a").exists() and no_temp_dirs(tmp_path)

    import looplens.data.storage as storage

    calls = []

    def broken(facts):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(facts)

    original = storage.facts_to_jsonl
    monkeypatch.setattr(storage, "facts_to_jsonl", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_dataset(SMALL_DEPTH, tmp_path / "b")
    assert not (tmp_path / "b").exists() and no_temp_dirs(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_ensure_dataset_builds_once_and_finds_by_checksum(tmp_path):
    cfg = SMALL_DEPTH.replace(max_hops=3)
    ds = ensure_dataset(cfg, tmp_path)
    assert ds.path == tmp_path / f"depth-permutation-{cfg.checksum()}"
    mtime = (ds.path / "train.jsonl").stat().st_mtime_ns
    again = ensure_dataset(cfg, tmp_path)
    assert again.checksum == ds.checksum and (ds.path / "train.jsonl").stat().st_mtime_ns == mtime
    other = ensure_dataset(cfg.replace(seed=2), tmp_path)
    assert other.path != ds.path and len(list(tmp_path.iterdir())) == 2


def test_concurrent_first_builds_keep_the_first_finished_dataset(tmp_path, monkeypatch):
    """Two processes building the same cached dataset: the one finishing second must not move the first
    one's folder aside (a reader in between saw "no such directory": a CI failure of the Ray retry test)."""
    import looplens.data.storage as storage

    cfg = SMALL_DEPTH.replace(max_hops=3)
    original = storage.facts_to_jsonl

    def race(target):  # while this build writes, another process completes ``target``
        inode = []

        def racing(facts):
            if not inode:
                monkeypatch.setattr(storage, "facts_to_jsonl", original)
                build_dataset(cfg, target)
                inode.append((target / "train.jsonl").stat().st_ino)
            return original(facts)

        monkeypatch.setattr(storage, "facts_to_jsonl", racing)
        return inode

    path = tmp_path / cfg.dirname()
    inode = race(path)
    ds = ensure_dataset(cfg, tmp_path)  # loses the race quietly and opens the winner's dataset
    assert ds.path == path and inode
    assert (path / "train.jsonl").stat().st_ino == inode[0]  # the winner's files, never replaced
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp or .old folder left behind
    race(tmp_path / "b")
    with pytest.raises(FileExistsError, match="written by another process meanwhile"):
        build_dataset(cfg, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "b"])


def test_unknown_split_is_a_clear_error(depth_dir):
    with pytest.raises(ValueError, match=r"no split 'valid' \(splits: train, test, train_eval\)"):
        load_dataset(depth_dir).rows("valid")


@pytest.mark.slow
def test_paper_scale_build_load_encode(tmp_path):
    ds = load_dataset(build_dataset(DataConfig(), tmp_path / "paper"))
    assert ds.meta["splits"]["train"]["count"] == 313_600
    enc = ds.encode("train")
    assert enc.tokens.shape == (313_600, 3)
    assert int((enc.hops == 2).sum()) == 273_600


# ----------------------------------------------------------------------------------------------
# shortcuts


def _frame(g, split: str) -> pd.DataFrame:
    f = g.splits[split]
    queries = [" ".join([f"e{h}"] + [f"r{r}" for r in rel[:k]]) for h, rel, k in zip(f.heads, f.relations, f.hops)]
    return pd.DataFrame({"query": queries, "answer": [f"e{a}" for a in f.answers]})


def test_shortcut_rate_random_tail_vs_permutation():
    """A relation suffix predicts the answer in a random-tail world, not in a permutation world."""
    base = dict(task="depth", n_entities=200, n_relations=40, max_hops=3, per_hop_train=100, per_hop_test=600)
    perm = generate(DataConfig(world="permutation", **base))
    tail = generate(DataConfig(world="random-tail", out_degree=2, **base))  # ~10 heads per relation
    p = shortcut_rate(perm.world, _frame(perm, "test"))
    t = shortcut_rate(tail.world, _frame(tail, "test"))
    assert p["n_suffixes"] == t["n_suffixes"] == 40 and p["n_rows"] == 1200
    assert abs(p["shortcut"]) < 0.02 and p["uniform"] == 1 / 200
    assert t["shortcut"] > 0.1 and t["accuracy"] > 3 * t["chance"]


def test_shortcut_rate_accepts_datasets_and_encoded_splits(depth_dir):
    ds = load_dataset(depth_dir)
    from_rows = shortcut_rate(ds, ds.rows("test"), suffix_len=2)
    from_enc = shortcut_rate(ds, ds.encode("test"), suffix_len=2)
    assert from_rows == from_enc and from_rows["suffix_len"] == 2
    # a predictor that sees the whole query is always right: suffix_len >= hops + ... = full query key
    full = shortcut_rate(ds, ds.rows("test"), suffix_len=SMALL_DEPTH.max_hops)
    assert full["accuracy"] >= from_rows["accuracy"]
    with pytest.raises(ValueError, match="suffix_len"):
        shortcut_rate(ds, ds.rows("test"), suffix_len=0)


# ----------------------------------------------------------------------------------------------
# docstring examples


@pytest.mark.parametrize("module", ["looplens.data.config", "looplens.data.worlds", "looplens.data.vocab", "looplens.data.sampling", "looplens.data.storage"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
