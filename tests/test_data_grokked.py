"""data/grokked.py: export to and import from the GrokkedTransformer / Loop-Think-Generalize JSON format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from looplens.data import DataConfig, build_dataset, export_grokked, import_grokked, load_dataset

COMP = DataConfig(task="composition", world="random-tail", n_entities=80, n_relations=10, out_degree=3,
                  phi=2.0, test_id_fraction=0.05, eval_max=60, seed=7)
DEPTH = DataConfig(task="depth", world="permutation", n_entities=20, n_relations=3, max_hops=5,
                   per_hop_train=30, per_hop_test=8, eval_max=15, seed=2)


def _build(cfg: DataConfig, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(cfg.task)
    src = build_dataset(cfg, root / "ds")
    return src, export_grokked(src, root / "grokked")


@pytest.fixture(scope="module")
def built_comp(tmp_path_factory):
    return _build(COMP, tmp_path_factory)


@pytest.fixture(scope="module")
def built_depth(tmp_path_factory):
    return _build(DEPTH, tmp_path_factory)


@pytest.fixture(params=["comp", "depth"])
def built(request):
    return request.getfixturevalue(f"built_{request.param}")


def read(path: Path):
    return json.loads(path.read_text())


def write(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


DIAGNOSTIC = ("test_inferred_first_ood", "test_inferred_second_ood")


def assert_rebuilt_diagnostics(path: Path) -> None:
    """Without our sidecar the first- / second-hop-OOD splits are rebuilt from the data alone: an atomic fact
    is OOD when no trained 2-hop fact uses it; each row has exactly its split's hop OOD."""
    ds = load_dataset(path)
    assert set(DIAGNOSTIC) <= set(ds.split_names)
    assert set(ds.meta["origin"]["rebuilt_splits"]) == set(DIAGNOSTIC)
    train = ds.rows("train")
    two = train[train["hops"] == 2]
    used = set()
    for query, bridges in zip(two["query"], two["bridges"]):
        h, r1, r2 = query.split()
        used |= {(h, r1), (bridges[0], r2)}
    for name, first_ood in zip(DIAGNOSTIC, (True, False)):
        rows = ds.rows(name)
        assert len(rows), name
        for query, bridges in zip(rows["query"], rows["bridges"]):
            h, r1, r2 = query.split()
            assert ((h, r1) not in used, (bridges[0], r2) not in used) == (first_ood, not first_ood), (name, query)


def assert_same_dataset(a: Path, b: Path, same_config: bool = True, skip: tuple = ()) -> None:
    da, db = load_dataset(a), load_dataset(b)
    assert da.split_names == db.split_names
    assert da.world == db.world
    for name in da.split_names:
        if name in skip:
            continue
        assert (a / f"{name}.jsonl").read_bytes() == (b / f"{name}.jsonl").read_bytes(), name
    if not skip:  # the checksum covers every split
        assert da.checksum == db.checksum
    if same_config:
        assert da.config == db.config


def test_round_trip_gives_identical_splits(built, tmp_path):
    src, exported = built
    back = import_grokked(exported, tmp_path / "back")
    assert_same_dataset(src, back)
    origin = load_dataset(back).meta["origin"]
    assert origin["kind"] == "imported" and origin["config_inferred"] is False
    assert origin["rows_with_unknown_bridges"] == 0
    assert all(v == 0 for v in origin["test_rows_also_in_train"].values())


def test_round_trip_without_our_sidecar_infers_the_config(built, tmp_path):
    src, exported = built
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("train.json", "test.json", "valid.json", "vocab.json"):
        (plain / name).write_bytes((exported / name).read_bytes())
    back = import_grokked(plain, tmp_path / "back")
    if load_dataset(src).config.task == "composition":  # the diagnostic splits are not exported: rebuilt
        assert_rebuilt_diagnostics(back)
        assert_same_dataset(src, back, same_config=False, skip=DIAGNOSTIC)
    else:
        assert_same_dataset(src, back, same_config=False)
    cfg, orig = load_dataset(back).config, load_dataset(src).config
    assert (cfg.task, cfg.world, cfg.n_entities, cfg.n_relations, cfg.out_degree) == (
        orig.task, orig.world, orig.n_entities, orig.n_relations, orig.out_degree)
    assert load_dataset(back).meta["origin"]["config_inferred"] is True
    if cfg.task == "depth":
        assert (cfg.max_hops, cfg.per_hop_train, cfg.per_hop_test) == (orig.max_hops, orig.per_hop_train,
                                                                        orig.per_hop_test)


def test_export_writes_the_upstream_format(built):
    src, exported = built
    ds = load_dataset(src)
    train, test, valid, vocab = (read(exported / f) for f in ("train.json", "test.json", "valid.json", "vocab.json"))
    assert vocab[:2] == ["<e_0>", "<e_1>"] and vocab[ds.vocab.n_entities] == "<r_0>" and "</a>" in vocab
    assert len(train) == ds.count("train")
    first = ds.rows("train").iloc[0]
    h, r = first["query"].split()
    assert train[0]["input_text"] == f"<{h[0]}_{h[1:]}><{r[0]}_{r[1:]}>"
    assert train[0]["target_text"] == train[0]["input_text"] + f"<e_{first['answer'][1:]}></a>"
    types = {item["type"] for item in test}
    if ds.config.task == "composition":
        assert "type" not in train[0]
        assert {"id_atomic", "ood_atomic", "train_inferred", "test_inferred_iid", "test_inferred_ood"} <= types
        assert len(valid) == ds.count("test_inferred_ood") and "type" not in valid[0]
    else:
        assert {"2hop_test", f"{DEPTH.max_hops}hop_test", "atomic_facts", "2hop_train"} <= types
        assert {item["type"] for item in train} == {"atomic"} | {f"{k}hop_train" for k in range(2, 6)}
        assert valid == test


def test_import_upstream_depth_style(tmp_path, built_depth):
    """Loop-Think-Generalize's train.json labels 2-hop facts '0hop_train' (off by two): hops come from
    the query, not the type. Its test.json mixes '<k>hop_test', 'atomic_facts' and '<k>hop_train'."""
    src, exported = built_depth
    upstream = tmp_path / "ltg"
    upstream.mkdir()
    train = read(exported / "train.json")
    for item in train:
        n_rel = item["input_text"].count("<r_")
        item["type"] = "atomic" if n_rel == 1 else f"{n_rel - 2}hop_train"
    write(upstream / "train.json", train)
    test = read(exported / "test.json")
    write(upstream / "test.json", test[::-1])  # order does not matter: splits are stored sorted
    back = import_grokked(upstream, tmp_path / "back")
    assert_same_dataset(src, back, same_config=False)


def test_import_upstream_composition_style_without_diagnostic_splits(tmp_path, built_comp):
    src, exported = built_comp
    upstream = tmp_path / "grokked"
    upstream.mkdir()
    (upstream / "train.json").write_bytes((exported / "train.json").read_bytes())
    test = [i for i in read(exported / "test.json") if i["type"] not in ("test_inferred_first_ood",
                                                                         "test_inferred_second_ood")]
    write(upstream / "test.json", test)
    ds = load_dataset(import_grokked(upstream, tmp_path / "back"))
    assert ds.split_names == ["train", "id_atomic", "ood_atomic", "train_inferred", "test_inferred_id",
                              "test_inferred_ood", *DIAGNOSTIC]  # the diagnostic splits are rebuilt
    assert_rebuilt_diagnostics(tmp_path / "back")
    orig = load_dataset(src)
    for name in ds.split_names:
        if name not in DIAGNOSTIC:
            assert ds.rows(name).equals(orig.rows(name)), name
    assert ds.meta["origin"]["test_types"]["test_inferred_iid"] == orig.count("test_inferred_id")


def test_export_writes_the_papers_types_unless_asked(built_comp, tmp_path):
    src, exported = built_comp
    assert {i["type"] for i in read(exported / "test.json")} == {"id_atomic", "ood_atomic", "train_inferred",
                                                                 "test_inferred_iid", "test_inferred_ood"}
    full = export_grokked(src, tmp_path / "full", diagnostics=True)
    assert set(DIAGNOSTIC) <= {i["type"] for i in read(full / "test.json")}


def test_imported_and_generated_datasets_never_share_a_directory(built_comp, tmp_path):
    from looplens.data import ensure_dataset

    src, exported = built_comp
    cfg = load_dataset(src).config
    with pytest.raises(ValueError, match="directory name the trainer gives a generated dataset"):
        import_grokked(exported, tmp_path / cfg.dirname())
    root = tmp_path / "root"
    imported = load_dataset(import_grokked(exported, root / "elsewhere"))
    assert imported.dirname != cfg.dirname() and "imported" in imported.dirname
    (root / "elsewhere").rename(root / cfg.dirname())  # an imported dataset moved under the generated name
    with pytest.raises(ValueError, match="was imported"):
        ensure_dataset(cfg, root)


def test_import_keeps_rows_whose_chain_the_world_cannot_follow(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    atomic = [("<e_0><r_0>", "<e_1>"), ("<e_1><r_1>", "<e_2>"), ("<e_2><r_0>", "<e_0>")]
    train = [{"input_text": q, "target_text": q + a + "</a>"} for q, a in atomic]
    train.append({"input_text": "<e_0><r_0><r_1>", "target_text": "<e_0><r_0><r_1><e_2></a>"})
    test = [{"input_text": "<e_1><r_1><r_0>", "target_text": "<e_1><r_1><r_0><e_0></a>", "type": "test_inferred_ood"},
            # e_0 has no r_1 in the atomic facts: bridges unknown, the row is kept
            {"input_text": "<e_0><r_1><r_0>", "target_text": "<e_0><r_1><r_0><e_2></a>", "type": "test_inferred_ood"}]
    write(src / "train.json", train)
    write(src / "test.json", test)
    ds = load_dataset(import_grokked(src, tmp_path / "ds"))
    rows = ds.rows("test_inferred_ood").set_index("query")
    assert rows.loc["e1 r1 r0", "bridges"] == ["e2"] and rows.loc["e0 r1 r0", "bridges"] == []
    assert ds.meta["origin"]["rows_with_unknown_bridges"] == 1
    assert ds.config.n_entities == 3 and ds.config.n_relations == 2  # no vocab.json: sizes from the data
    assert ds.encode("test_inferred_ood").bridges.tolist() == [[-1], [3]]


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda d: (d / "train.json").unlink(), FileNotFoundError, r"train.json is missing"),
        (lambda d: (d / "test.json").write_text("[1, 2"), ValueError, r"test.json is not valid JSON"),
        (lambda d: write(d / "test.json", [{"input_text": "<e_0><x_1>", "target_text": "<e_0><x_1><e_1></a>",
                                            "type": "id_atomic"}]),
         ValueError, r"test.json item 0: input_text '<e_0><x_1>' is not a sequence"),
        (lambda d: write(d / "test.json", [{"input_text": "<e_0><r_0>", "target_text": "<e_0><r_0><e_1>",
                                            "type": "id_atomic"}]),
         ValueError, r"test.json item 0: target_text .* is not input_text \+ <e_N></a>"),
        (lambda d: write(d / "test.json", [{"input_text": "<e_0><r_0>", "target_text": "<e_0><r_0><e_1></a>"}]),
         ValueError, r"test.json item 0: has no \"type\""),
        (lambda d: write(d / "test.json", [{"input_text": "<e_0><r_0>", "target_text": "<e_0><r_0><e_1></a>",
                                            "type": "banana"}]),
         ValueError, r"test.json item 0 has unknown type 'banana'"),
        (lambda d: write(d / "test.json", [{"input_text": "<e_0><r_0>", "target_text": "<e_0><r_0><e_5></a>",
                                            "type": "id_atomic"}]),
         ValueError, r"atomic fact e0 r0 has two different answers"),
        (lambda d: write(d / "vocab.json", ["<e_0>", "<e_2>", "<r_0>", "</a>"]),
         ValueError, r"vocab.json entity tokens must be numbered 0..N-1 without gaps"),
        (lambda d: write(d / "test.json", [{"input_text": "<r_0><e_0>", "target_text": "<r_0><e_0><e_5></a>",
                                            "type": "id_atomic"}]),
         ValueError, r"test.json: query 0 \('r0 e0'\): token 'r0' at position 0 is a relation"),
    ],
)
def test_import_errors_are_one_line_and_write_nothing(tmp_path, edit, error, message):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "train.json", [{"input_text": "<e_0><r_0>", "target_text": "<e_0><r_0><e_1></a>"},
                               {"input_text": "<e_1><r_0>", "target_text": "<e_1><r_0><e_0></a>"}])
    write(src / "test.json", [{"input_text": "<e_0><r_0>", "target_text": "<e_0><r_0><e_1></a>", "type": "id_atomic"}])
    import_grokked(src, tmp_path / "ok")  # the unedited directory imports
    edit(src)
    with pytest.raises(error, match=message) as err:
        import_grokked(src, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok", "src"]


def test_import_rejects_a_wrong_answer(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "train.json", [{"input_text": "<e_0><r_0>", "target_text": "<e_0><r_0><e_1></a>"},
                               {"input_text": "<e_1><r_0>", "target_text": "<e_1><r_0><e_0></a>"},
                               {"input_text": "<e_0><r_0><r_0>", "target_text": "<e_0><r_0><r_0><e_1></a>"}])
    write(src / "test.json", [{"input_text": "<e_0><r_0>", "target_text": "<e_0><r_0><e_1></a>", "type": "id_atomic"}])
    with pytest.raises(ValueError, match=r"train.json item 2: answer e1 but its atomic facts lead to e0"):
        import_grokked(src, tmp_path / "out")


def test_export_and_import_refuse_existing_output(built, tmp_path):
    src, exported = built
    with pytest.raises(FileExistsError, match="already exists"):
        export_grokked(src, exported)
    with pytest.raises(FileExistsError, match="already exists"):
        import_grokked(exported, src)
    export_grokked(src, exported, overwrite=True)


def test_round_trip_keeps_empty_splits(tmp_path):
    cfg = COMP.replace(ood_fraction=0.0)  # no OOD facts: every OOD split is empty
    src = build_dataset(cfg, tmp_path / "ds")
    assert load_dataset(src).count("test_inferred_ood") == 0
    back = import_grokked(export_grokked(src, tmp_path / "g"), tmp_path / "back")
    assert_same_dataset(src, back)
