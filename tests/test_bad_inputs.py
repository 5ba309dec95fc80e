"""Bad inputs end in one clear line naming the file (or flag) and what is wrong; nothing half-written.

Table-driven: each case damages a copy of a small trained run (tests/fixtures/app_runs/comp-looped) and
expects a message fragment, both through the CLI in-process (exit status 2, one line on stderr) and
through the Python API (a ValueError subclass, ``InvalidFileError``, with the same message).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from looplens.analyses.cli import main
from looplens.data.files import (
    FormatVersionError,
    InvalidFileError,
    OutputError,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
)

FIXTURE = Path(__file__).parent / "fixtures" / "app_runs" / "comp-looped"
CONFIG = "config.json"
METRICS = "metrics.csv"
SIDECAR = "checkpoints/step_0.json"
WEIGHTS = "checkpoints/step_0.safetensors"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "runs" / "comp"
    shutil.copytree(FIXTURE, out)
    return out


def _edit_json(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        obj = json.loads(path.read_text())
        edit(obj)
        path.write_text(json.dumps(obj))
    return apply


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _set_format(tag: str, version: str) -> Callable[[Path], None]:
    def edit(obj: dict) -> None:
        obj["format"] = tag
        obj["provenance"]["looplens_version"] = version
    return _edit_json(edit)


# (file damaged, how, expected fragment of the one-line message)
RUN_CASES = [
    (CONFIG, _write(b"{not json"), "run config is not valid JSON"),
    (CONFIG, _truncate, "run config is not valid JSON"),
    (CONFIG, _write(b""), "run config is empty"),
    (CONFIG, _write(b"\x00\xff\xfe garbage"), "run config is not text"),
    (CONFIG, _write(b"[1, 2]"), "run config must be a JSON object, got list"),
    (CONFIG, _edit_json(lambda o: o.pop("config")), "run config has no 'config' table"),
    (CONFIG, _edit_json(lambda o: o["config"]["optim"].update(lr="fast")),
     "invalid training config: optim.lr must be a finite number >= 0, got 'fast'"),
    (CONFIG, _edit_json(lambda o: o["config"]["optim"].update(lrate=1)), "unknown key 'lrate' in section [optim]"),
    (CONFIG, _set_format("looplens-run-v7", "9.1.0"),
     "run directory format v7 written by looplens 9.1.0 (newer); this looplens"),
    (CONFIG, _set_format("looplens-run-v0", "0.0.1"), "run directory format v0 written by looplens 0.0.1 (older)"),
    (CONFIG, _set_format("something-else", "0.1.0"), "not a looplens run directory (format 'something-else'"),
    (METRICS, _write(b"\x89PNG\r\n\x1a\n\x00\x00garbage\n"), "metrics file is not text"),
    (METRICS, _write(b"a,b,c\n1,2,3\n"), "metrics header is 'a,b,c', expected 'step,epoch,stage"),
    (SIDECAR, _write(b"garbage"), "checkpoint sidecar is not valid JSON"),
    (SIDECAR, _truncate, "checkpoint sidecar is not valid JSON"),
    (SIDECAR, _edit_json(lambda o: o.pop("weights_sha256")), "no valid 'weights_sha256'"),
    (SIDECAR, _edit_json(lambda o: o["config"].update(d_model=-3)), "invalid model config"),
    (SIDECAR, _set_format("looplens-checkpoint-v2", "1.4.0"),
     "checkpoint format v2 written by looplens 1.4.0 (newer)"),
    (WEIGHTS, _truncate, "sha256 mismatch with its sidecar"),
    (WEIGHTS, _write(b"not safetensors"), "the weights file is truncated, corrupted"),
]
IDS = [f"{file}-{i}" for i, (file, _, _) in enumerate(RUN_CASES)]


@pytest.mark.parametrize(("file", "damage", "fragment"), RUN_CASES, ids=IDS)
def test_damaged_run_files_fail_in_one_line_through_the_cli(run_dir, tmp_path, capsys, file, damage, fragment):
    damage(run_dir / file)
    out_csv = tmp_path / "eval.csv"
    status = main(["eval", str(run_dir), "--checkpoint", "0", "--iterations", "1", "--quiet", "--out", str(out_csv)])
    err = capsys.readouterr().err
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("looplens eval: error: ")
    assert str(run_dir / file) in lines[0] and fragment in lines[0], lines[0]
    assert not out_csv.exists()


@pytest.mark.parametrize(("file", "damage", "fragment"), RUN_CASES, ids=IDS)
def test_damaged_run_files_raise_a_value_error_naming_the_file(run_dir, file, damage, fragment):
    from looplens.models.train import load_run

    damage(run_dir / file)
    with pytest.raises(InvalidFileError) as info:
        load_run(run_dir).load_model(0)
    assert isinstance(info.value, ValueError)
    assert info.value.path == run_dir / file
    message = str(info.value)
    assert "\n" not in message and str(run_dir / file) in message and fragment in message, message
    if "format v" in fragment:
        assert isinstance(info.value, FormatVersionError)


def test_metrics_row_that_is_not_numbers_names_the_line(run_dir):
    from looplens.models.train import load_run

    path = run_dir / METRICS
    lines = path.read_text().splitlines(keepends=True)
    fields = lines[3].split(",")
    fields[0] = "oops"
    lines[3] = ",".join(fields)
    path.write_text("".join(lines))
    run = load_run(run_dir)  # the header is fine: opening works, reading the rows names the bad line
    with pytest.raises(InvalidFileError, match=r"metrics.csv: line 4: step is 'oops', expected a number"):
        _ = run.metrics


def test_a_newer_run_directory_is_refused_by_the_app_loader_too(run_dir):
    from looplens.models.train import load_run

    _set_format("looplens-run-v2", "3.0.0")(run_dir / CONFIG)
    with pytest.raises(FormatVersionError, match=r"written by looplens 3\.0\.0 \(newer\).*reads format v1"):
        load_run(run_dir)


# -------------------------------------------------------------------------------------------------
# outputs: read-only / full disk / a file where a folder should be; nothing half-written
# -------------------------------------------------------------------------------------------------
def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_output_under_a_regular_file_names_it_and_writes_nothing(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"cannot write .*not-a-folder/out/a\.json: .*not-a-folder is a file"):
        atomic_write_text(blocker / "out" / "a.json", "{}")
    with pytest.raises(OutputError, match=r"not-a-folder is a file"):
        with atomic_dir(blocker / "dataset"):
            pass
    assert blocker.read_text() == "x" and _leftovers(tmp_path) == []


def test_full_disk_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError) as info:
        atomic_write_bytes(target, b"new contents")
    assert str(info.value) == f"cannot write {target}: No space left on device (disk full or over quota)"
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_read_only_folder_is_named(tmp_path, monkeypatch):
    """Tests run as root here, where chmod does not stop writes: simulate the OS refusing."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match=r"cannot write .*a\.csv: Permission denied \(read-only"):
        atomic_write_text(tmp_path / "a.csv", "x")
    assert list(tmp_path.iterdir()) == []


DATA_ARGS = ["data", "--task", "composition", "--world", "random-tail", "--entities", "30", "--relations", "6",
             "--out-degree", "3", "--phi", "2", "--seed", "0"]


def test_cli_output_under_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert main([*DATA_ARGS, "--out", str(blocker / "ds")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blocker is a file, not a folder" in err[0], err


def test_cli_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    real = Path.write_bytes

    def full(self, data):
        if self.suffix == ".jsonl":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    out = tmp_path / "datasets" / "comp"
    assert main([*DATA_ARGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write {out}: No space left on device" in err[0], err
    assert not out.exists() and _leftovers(out.parent) == []


# -------------------------------------------------------------------------------------------------
# file modes: the user's umask, not mkstemp's 0600
# -------------------------------------------------------------------------------------------------
@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_follow_the_umask(tmp_path, umask_027):
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_bytes(tmp_path / "b.bin", b"x")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "c.txt").write_text("x")
    assert _mode(tmp_path / "a.txt") == 0o640
    assert _mode(tmp_path / "b.bin") == 0o640
    assert _mode(tmp_path / "folder") == 0o750
    assert _mode(tmp_path / "folder" / "c.txt") == 0o640


def test_checkpoint_and_dataset_files_follow_the_umask(tmp_path, umask_027, capsys):
    from looplens.models import LoopedConfig, LoopedTransformer
    from looplens.models.checkpoint import save_checkpoint

    model = LoopedTransformer(LoopedConfig(d_vocab=10, n_ctx=4, d_model=8, n_heads=2, n_blocks=1, seed=0))
    weights = save_checkpoint(model, tmp_path / "ckpt" / "step_0", step=0)
    assert _mode(weights) == 0o640 and _mode(weights.with_suffix(".json")) == 0o640
    assert main([*DATA_ARGS, "--out", str(tmp_path / "ds")]) == 0
    capsys.readouterr()
    assert _mode(tmp_path / "ds") == 0o750
    assert {_mode(p) for p in (tmp_path / "ds").iterdir()} == {0o640}


# -------------------------------------------------------------------------------------------------
# a world too small for the requested fractions: refuse, naming the smallest setting that works
# -------------------------------------------------------------------------------------------------
SMALL_WORLD = ["data", "--task", "composition", "--world", "random-tail", "--entities", "10", "--relations", "3",
               "--out-degree", "2", "--phi", "1", "--seed", "0"]


@pytest.mark.parametrize(("flag", "value", "other", "split"), [
    ("--ood-fraction", "0.05", ["--test-id-fraction", "0.2"], "test_inferred_ood"),
    ("--test-id-fraction", "0.005", ["--ood-fraction", "0.2"], "test_inferred_id"),
])
def test_world_too_small_names_the_smallest_fraction_that_works(tmp_path, capsys, flag, value, other, split):
    import re

    from looplens.data import load_dataset

    def generate(fraction: str, out: str) -> tuple[int, str]:
        status = main([*SMALL_WORLD, *other, flag, fraction, "--out", str(tmp_path / out)])
        return status, capsys.readouterr().err

    status, err = generate(value, "refused")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"world too small for {flag} {value}" in err and f"{split} would be empty" in err, err
    assert not (tmp_path / "refused").exists()
    smallest = float(re.search(rf"raise {flag} to at least ([0-9.]+)", err).group(1))
    status, err = generate(repr(smallest), "ok")
    assert status == 0, err
    assert load_dataset(tmp_path / "ok").count(split) >= 1
    status, err = generate(repr(round(smallest - 0.001, 3)), "just-below")  # it is the smallest on the grid
    assert status == 2 and "world too small" in err, err
    bigger = re.search(r"--entities (\d+) works", err)
    if flag == "--ood-fraction":  # the bigger world it names works too
        world = [*SMALL_WORLD[:6], bigger.group(1), *SMALL_WORLD[7:]]
        assert main([*world, *other, flag, value, "--out", str(tmp_path / "bigger")]) == 0, capsys.readouterr().err
        assert load_dataset(tmp_path / "bigger").count(split) >= 1


def test_full_disk_while_appending_metrics_leaves_no_half_row(tmp_path, monkeypatch):
    from looplens.models.train.run import MetricsLog, format_row

    log = MetricsLog(tmp_path / "metrics.csv")
    row = {"step": 1, "epoch": 0.5, "stage": 0, "split": "train_batch", "hops": 0, "iterations": 4,
           "accuracy": 0.5, "loss": 1.0, "n": 8}
    log.add([row])
    log.flush()
    before = (tmp_path / "metrics.csv").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    log.add([{**row, "step": 2}])
    with pytest.raises(OutputError, match=r"cannot write .*metrics\.csv: No space left on device \(disk full"):
        log.flush()
    assert (tmp_path / "metrics.csv").read_bytes() == before and before.endswith(format_row(row).encode())


def test_a_dataset_of_another_format_version_names_the_looplens_that_wrote_it(tmp_path, capsys):
    from looplens.data import load_dataset

    assert main([*DATA_ARGS, "--out", str(tmp_path / "ds")]) == 0
    capsys.readouterr()
    _edit_json(lambda o: o.update(format_version=9, looplens_version="9.0.0"))(tmp_path / "ds" / "meta.json")
    with pytest.raises(FormatVersionError, match=r"meta\.json: dataset format_version 9 written by looplens 9\.0\.0 "
                                                 r"is not supported \(this looplens .* reads 1\)"):
        load_dataset(tmp_path / "ds")
    assert main(["data", "export-grokked", str(tmp_path / "ds"), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written by looplens 9.0.0" in err[0], err


@pytest.mark.parametrize("damage", [_truncate, _write(b"garbage, not a torch file")], ids=["truncated", "garbage"])
def test_a_damaged_training_state_fails_resume_in_one_line(tmp_path, capsys, damage):
    from looplens.models.train import preset, train

    out = tmp_path / "runs" / "smoke"
    cfg = preset("smoke-composition").with_overrides(["run.max_steps=4", "eval.every=4", "run.save_every=4"])
    train(cfg, out, progress=False)
    state = out / "checkpoints" / "state_latest.pt"
    damage(state)
    with pytest.raises(InvalidFileError, match="cannot be read as a training state") as err:
        train(None, out, resume=True, progress=False)
    assert str(state) in str(err.value) and "\n" not in str(err.value)
    assert main(["train", "--out", str(out), "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "state_latest.pt" in lines[0] and "training state" in lines[0]
