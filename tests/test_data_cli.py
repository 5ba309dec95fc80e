"""`looplens data` in-process through analyses.cli.main: exit 0 on success, 2 with one line on user errors."""

from __future__ import annotations

import pytest
from looplens.analyses.cli import main
from looplens.data import DataConfig, load_dataset

pytestmark = pytest.mark.filterwarnings("error")

DEPTH_ARGS = ["data", "--task", "depth", "--world", "permutation", "--entities", "12", "--relations", "3",
              "--max-hops", "4", "--per-hop-train", "20", "--per-hop-test", "5", "--eval-max", "10", "--seed", "3"]
COMP_ARGS = ["data", "--task", "composition", "--world", "random-tail", "--entities", "60", "--relations", "8",
             "--out-degree", "3", "--phi", "2", "--eval-max", "50", "--seed", "1"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("looplens data: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_generate_prints_a_summary_and_writes_the_dataset(tmp_path, capsys):
    code, out, _ = run(capsys, *COMP_ARGS, "--out", str(tmp_path / "comp"))
    assert code == 0
    ds = load_dataset(tmp_path / "comp")
    assert ds.config == DataConfig(task="composition", world="random-tail", n_entities=60, n_relations=8,
                                   out_degree=3, phi=2.0, eval_max=50, seed=1)
    assert f"wrote {tmp_path / 'comp'}" in out
    for name in ds.split_names:
        assert name in out
    assert f"{ds.count('train'):,}" in out


def test_generate_depth_then_export_and_import(tmp_path, capsys):
    assert run(capsys, *DEPTH_ARGS, "--out", str(tmp_path / "d"))[0] == 0
    code, out, _ = run(capsys, "data", "export-grokked", str(tmp_path / "d"), "--out", str(tmp_path / "g"))
    assert code == 0 and "train.json" in out
    assert {p.name for p in (tmp_path / "g").iterdir()} >= {"train.json", "valid.json", "test.json", "vocab.json"}
    code, out, _ = run(capsys, "data", "import-grokked", str(tmp_path / "g"), "--out", str(tmp_path / "back"))
    assert code == 0 and "imported from" in out
    assert load_dataset(tmp_path / "back").checksum == load_dataset(tmp_path / "d").checksum


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["data", "--world", "permutation", "--entities", "5", "--relations", "2", "--seed", "0", "--out", "X"],
         ["--task is required"]),
        ([*DEPTH_ARGS[:5], "--entities", "-5", "--relations", "3", "--seed", "0", "--out", "X"],
         ["--entities must be an integer >= 2, got -5"]),
        ([*COMP_ARGS, "--phi", "99", "--out", "X"], ["phi=99.0 asks for", "lower --phi"]),
        ([*DEPTH_ARGS, "--per-hop-train", "500", "--out", "X"], ["k=2", "distinct 2-hop chains"]),
        ([*DEPTH_ARGS, "--out-degree", "2", "--out", "X"], ["--out-degree applies to random-tail worlds only"]),
        ([*COMP_ARGS, "--ood-fraction", "1.2", "--out", "X"], ["--ood-fraction must be a number in [0, 1), got 1.2"]),
    ],
)
def test_generate_user_errors(tmp_path, capsys, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, *fragments)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp dirs


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = str(tmp_path / "d")
    assert run(capsys, *DEPTH_ARGS, "--out", out)[0] == 0
    before = (tmp_path / "d" / "train.jsonl").read_bytes()
    code, _, err = run(capsys, *DEPTH_ARGS, "--out", out)
    assert_user_error(code, err, "already exists", "--overwrite")
    assert (tmp_path / "d" / "train.jsonl").read_bytes() == before
    seed = DEPTH_ARGS.index("--seed") + 1
    args = [*DEPTH_ARGS[:seed], "4", *DEPTH_ARGS[seed + 1:]]
    assert run(capsys, *args, "--out", out, "--overwrite")[0] == 0
    assert load_dataset(out).config.seed == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_corrupted_dataset_is_named_on_export(tmp_path, capsys):
    assert run(capsys, *DEPTH_ARGS, "--out", str(tmp_path / "d"))[0] == 0
    path = tmp_path / "d" / "train.jsonl"
    data = bytearray(path.read_bytes())
    data[-3] = ord("9") if data[-3] != ord("9") else ord("8")
    path.write_bytes(bytes(data))
    code, _, err = run(capsys, "data", "export-grokked", str(tmp_path / "d"), "--out", str(tmp_path / "g"))
    assert_user_error(code, err, "split 'train' (train.jsonl) sha256 mismatch", "rebuild with `looplens data --task depth")
    assert not (tmp_path / "g").exists()


def test_import_and_export_user_errors(tmp_path, capsys):
    code, _, err = run(capsys, "data", "import-grokked", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert_user_error(code, err, "is not a directory")
    code, _, err = run(capsys, "data", "export-grokked", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert_user_error(code, err, "no such directory")
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "data", "import-grokked", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert_user_error(code, err, "train.json is missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--task", "--world", "--entities", "--relations", "--out-degree", "--ood-fraction", "--phi",
                 "--test-id-fraction", "--max-hops", "--per-hop-train", "--per-hop-test", "--eval-max", "--seed",
                 "--out", "--overwrite", "import-grokked", "export-grokked"):
        assert flag in text, flag
    for default in ("default: 0.05", "default: 7.2", "default: 0.005", "default: 40", "default: 15000",
                    "default: 750", "default: 3000", "default: 20"):
        assert default in text, default
    for verb in ("import-grokked", "export-grokked"):
        with pytest.raises(SystemExit):
            main(["data", verb, "--help"])
        assert "--out" in capsys.readouterr().out
