"""analyses/: studies on tiny trained runs, the study / report CLI in-process, claim rules both ways, the report.

Three tiny runs (smoke presets, 150 steps each, ~10 s in all on one core) are trained once per module.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from looplens.analyses import claims, shipped_run_path
from looplens.analyses.cli import main
from looplens.analyses.report import build_report, markdown_table
from looplens.analyses.studies import STUDIES, run_study
from looplens.analyses.studies.base import (
    StudyOptions,
    StudyResult,
    accuracy_curves,
    as_runs,
    load_findings,
    run_info,
)
from looplens.analyses.studies.depth import answered_depth, depth_profile

SMALL = ["--n-queries", "24", "--max-iterations", "6", "--patch-pairs", "8", "--fixed-point-iterations", "6"]
OPTIONS = StudyOptions(n_queries=24, max_iterations=6, patch_pairs=8, fixed_point_iterations=6)
# which of the module's runs each study reads
STUDY_RUNS = {
    "systematic": ["comp-looped", "comp-vanilla"],
    "grokking": ["comp-looped"],
    "depth": ["depth-dynamic"],
    "overthinking": ["depth-dynamic", "comp-looped"],
    "halting": ["depth-dynamic"],
    "mechanism": ["comp-looped", "comp-vanilla"],
    "shortcut": ["comp-looped", "depth-dynamic"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from looplens.models.train import preset, train

    root = tmp_path_factory.mktemp("analyses") / "runs"
    comp = preset("smoke-composition").with_overrides(["run.max_steps=150", "eval.every=50"])
    train(comp, root / "comp-looped", progress=False)
    train(comp.with_overrides(["model.n_blocks=2", "model.n_iterations=1"]), root / "comp-vanilla", progress=False)
    depth = preset("smoke-depth").with_overrides(["run.max_steps=150", "recurrence.mode=poisson"])
    train(depth, root / "depth-dynamic", progress=False)
    return root


# -------------------------------------------------------------------------------------------------
# Studies through the CLI
# -------------------------------------------------------------------------------------------------
def test_study_list(capsys):
    assert main(["study", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # the analysis studies, then grokking-speed (the study that trains its own grid of runs)
    assert [line.split()[0] for line in lines] == [*STUDIES, "grokking-speed"]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("name", list(STUDIES))
def test_study_cli_writes_result(name, runs, tmp_path, capsys):
    out = tmp_path / name
    args = ["study", name, *sum((["--run", str(runs / r)] for r in STUDY_RUNS[name]), []), "--out", str(out), *SMALL]
    assert main(args) == 0
    assert f"study {name} on" in capsys.readouterr().out
    result = StudyResult.load(out)
    assert result.study == name and result.runs and set(result.runs) <= set(STUDY_RUNS[name])
    assert result.tables and result.figures and result.notes
    for fig_name in result.figures:
        assert (out / "figures" / f"{fig_name}.html").is_file()
    assert (out / "figures" / "plotly.min.js").is_file()
    assert load_findings(out) == json.loads((out / "result.json").read_text())["findings"]
    # the saved findings are exactly what the claim rules read
    if name in claims.STUDY_OF.values():
        n = next(k for k, v in claims.STUDY_OF.items() if v == name)
        assert claims.CLAIMS[n](result.findings).verdict in claims.VERDICTS


def test_study_result_roundtrip(runs, tmp_path):
    result = run_study("systematic", [runs / "comp-looped", runs / "comp-vanilla"], OPTIONS, out=tmp_path / "s")
    loaded = StudyResult.load(tmp_path / "s")
    assert list(loaded.tables) == list(result.tables) and list(loaded.figures) == list(result.figures)
    for name, table in result.tables.items():
        assert loaded.tables[name].shape == table.shape
    assert loaded.findings == json.loads(json.dumps(loaded.findings))
    # saving again gives the same files (fixed div ids, no timestamps)
    result.save(tmp_path / "s2")
    for rel in ("result.json", "tables/final.csv", "figures/curves.json", "figures/curves.html"):
        assert (tmp_path / "s" / rel).read_bytes() == (tmp_path / "s2" / rel).read_bytes()


def test_systematic_numbers_match_metrics(runs):
    result = run_study("systematic", [runs / "comp-looped", runs / "comp-vanilla"], OPTIONS)
    by_run = {f["run"]: f for f in result.findings["runs"]}
    assert by_run["comp-looped"]["kind"] == "looped" and by_run["comp-vanilla"]["kind"] == "vanilla"
    assert by_run["comp-vanilla"]["virtual_layers"] == by_run["comp-looped"]["virtual_layers"] == 2
    metrics = as_runs([runs / "comp-looped"])[0].metrics
    last = metrics[(metrics["split"] == "test_inferred_ood") & (metrics["iterations"] == 2)]
    last = last[last["step"] == last["step"].max()]
    expected = float((last["accuracy"] * last["n"]).sum() / last["n"].sum())
    assert by_run["comp-looped"]["final"]["test_inferred_ood"] == pytest.approx(expected)
    assert "comp-vanilla" in result.tables["final"].set_index("run").loc["comp-looped", "iso_flop_with"]


def test_study_cli_errors(runs, tmp_path, capsys):
    assert main(["study", "nope", "--run", str(runs / "comp-looped"), "--out", str(tmp_path / "x")]) == 2
    assert "unknown study 'nope'" in capsys.readouterr().err
    assert main(["study", "depth", "--run", str(runs / "comp-looped"), "--out", str(tmp_path / "x")]) == 2
    assert "needs at least one depth-task run" in capsys.readouterr().err
    assert main(["study", "systematic", "--run", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a looplens run directory" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert main(["study", "systematic", "--run", str(runs / "comp-looped"), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["study", "systematic", "--out", str(tmp_path / "y")]) == 2
    assert "--run" in capsys.readouterr().err


def test_run_info_and_curves(runs):
    looped, vanilla, depth = as_runs([runs / "comp-looped", runs / "comp-vanilla", runs / "depth-dynamic"])
    assert run_info(looped)["R"] == 2 and run_info(vanilla)["kind"] == "vanilla"
    info = run_info(depth)
    assert info["kind"] == "looped" and info["recurrence"] == "dynamic" and info["curriculum"]
    curves = accuracy_curves(looped, ["train_inferred", "test_inferred_id"])
    assert set(curves["split"]) == {"train_inferred", "test_inferred_id"}
    assert curves.groupby("split")["step"].apply(lambda s: s.is_monotonic_increasing).all()
    assert curves["accuracy"].between(0, 1).all()


# -------------------------------------------------------------------------------------------------
# looplens report
# -------------------------------------------------------------------------------------------------
def test_report_cli_single_run(runs, capsys):
    run = runs / "comp-looped"
    assert main(["report", str(run), "--quiet", *SMALL]) == 0
    index = run / "report" / "index.html"
    assert str(index) in capsys.readouterr().out
    text = index.read_text()
    assert "* plotly.js v" not in text  # the report's one copy is figures/plotly.min.js (tests/test_report.py)
    assert re.findall(r"<script[^>]+src='([^']+)'", text) == ["figures/plotly.min.js"]  # nothing from elsewhere
    summary = (run / "report" / "summary.md").read_text()
    assert "Studies not applicable to these runs: depth" in summary or "depth:" in text
    for study in ("systematic", "grokking", "overthinking", "halting", "mechanism", "shortcut"):
        assert (run / "report" / "studies" / study / "result.json").is_file()
    assert not (run / "report" / "studies" / "depth").exists()
    pages = list((run / "report" / "figures").glob("*.html"))
    assert pages and (run / "report" / "figures" / "plotly.min.js").is_file()
    assert len(list((run / "report" / "tables").glob("*.csv"))) >= 6


def test_report_cli_needs_out_for_several_runs(runs, capsys):
    assert main(["report", str(runs / "comp-looped"), str(runs / "comp-vanilla")]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_report_cli_named_study_must_apply(runs, tmp_path, capsys):
    assert main(["report", str(runs / "comp-looped"), "--out", str(tmp_path / "r"), "--studies", "depth"]) == 2
    assert "depth-task run" in capsys.readouterr().err


@pytest.mark.browser
@pytest.mark.slow
def test_report_png(runs, tmp_path):
    from looplens.analyses.report import chromium_path

    assert chromium_path() is not None, "the browser tests need Chromium"
    assert main(["report", str(runs / "comp-looped"), "--out", str(tmp_path / "r"), "--studies", "systematic",
                 "--png", "--quiet", *SMALL]) == 0
    pngs = list((tmp_path / "r" / "figures").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


# -------------------------------------------------------------------------------------------------
# Claim rules, both ways, from fabricated numbers
# -------------------------------------------------------------------------------------------------
def _systematic(looped_ood: float, vanilla_ood: float) -> dict:
    return {"runs": [
        {"run": "comp-r4", "kind": "looped", "R": 4, "n_blocks": 4, "virtual_layers": 16, "final_step": 10,
         "final": {"test_inferred_ood": looped_ood}, "max": {}},
        {"run": "comp-v8", "kind": "vanilla", "R": 1, "n_blocks": 8, "virtual_layers": 8, "final_step": 10,
         "final": {"test_inferred_ood": vanilla_ood}, "max": {}},
    ]}


def _grokking(steps: tuple) -> dict:
    names = ("train", "test_id", "test_ood")
    stages = {n: {"reached": s is not None, "step": s, "epoch": None, "final_accuracy": 0.0, "max_accuracy": 0.0}
              for n, s in zip(names, steps)}
    return {"runs": [{"run": "comp-r4", "kind": "looped", "R": 4, "stages": stages, "three_stage": False,
                      "verdict": "none"}]}


def _depth(ext_fixed: int, reach_fixed: int, reach_dynamic: int) -> dict:
    base = {"learnable_depth": 4, "answered_depth_train_T": 4, "best_T": 8, "train_T": 4}
    return {"runs": [{**base, "run": "depth-r4", "recurrence": "fixed", "reach": reach_fixed, "extension": ext_fixed},
                     {**base, "run": "depth-dyn", "recurrence": "dynamic", "reach": reach_dynamic, "extension": 0}]}


def _overthinking(peak_m, final_m, peak_acc, final_acc, solved=(2, 3)) -> dict:
    return {"runs": [{"run": "depth-r4", "recurrence": "fixed", "R": 4, "solved_hops": list(solved),
                      "max_iterations": 32, "peak_iteration": 6, "peak_margin": peak_m, "final_margin": final_m,
                      "accuracy_peak_iteration": 6, "peak_accuracy": peak_acc, "final_accuracy": final_acc}]}


def _halting(best, halt_acc, halt_it) -> dict:
    return {"runs": [{"run": "depth-r4", "recurrence": "fixed", "R": 4, "split": "test", "max_iterations": 32,
                      "solved_hops": [2, 3], "train_T": 4, "fixed_train_T_accuracy": best,
                      "fixed_max_accuracy": best - 0.2, "best_fixed_T": 6, "best_fixed_accuracy": best,
                      "kl_accuracy": 0.3, "kl_mean_iterations": 2.0, "kl_entropy_accuracy": halt_acc,
                      "kl_entropy_mean_iterations": halt_it}]}


def _mechanism(acc, bridge, bridge_depth, answer_depth, first, last, positions=(0, 1, 2, 2)) -> dict:
    split = {"accuracy": acc, "bridge_resolved": bridge, "answer_resolved": 0.9, "bridge_depth": bridge_depth,
             "answer_depth": answer_depth, "bridge_iteration": 1.0, "answer_iteration": 3.0}
    return {"primary_split": "test_inferred_id", "runs": [
        {"run": "comp-r4", "kind": "looped", "R": 4, "virtual_layers": 16, "splits": {"test_inferred_id": split},
         "patching": {"head": {"best_position_by_iteration": list(positions), "readout_position": 2}},
         "fixed_point": {"iterations": 32, "change_first": first, "change_last": last}},
        {"run": "comp-v8", "kind": "vanilla", "R": 1, "virtual_layers": 8, "splits": {"test_inferred_id": split},
         "patching": {}},
    ]}


GOOD = {"systematic": _systematic(0.78, 0.0), "grokking": _grokking((1000, 5000, 200000)),
        "depth": _depth(3, 10, 22), "overthinking": _overthinking(9.0, 2.0, 0.99, 0.5),
        "halting": _halting(0.9, 0.89, 7.0), "mechanism": _mechanism(0.95, 0.9, 0.3, 0.8, 0.5, 0.001)}
PARTLY = {"systematic": _systematic(0.3, 0.05), "grokking": _grokking((1000, 5000, None)),
          "depth": _depth(0, 10, 22), "overthinking": _overthinking(9.0, 2.0, 0.99, 0.98),
          "halting": _halting(0.9, 0.7, 7.0), "mechanism": _mechanism(0.95, 0.9, 0.3, 0.8, 0.5, 0.4)}
BAD = {"systematic": _systematic(0.02, 0.0), "grokking": _grokking((1000, None, None)),
       "depth": _depth(0, 10, 9), "overthinking": _overthinking(9.0, 9.0, 0.99, 0.99),
       "halting": _halting(0.9, 0.7, 31.0), "mechanism": _mechanism(0.95, 0.1, 0.9, 0.8, 0.5, 0.4, ())}


@pytest.mark.parametrize("findings, verdict", [(GOOD, "reproduced"), (PARTLY, "partly"), (BAD, "not reproduced")])
def test_claim_rules_from_fabricated_findings(findings, verdict):
    results = claims.judge_claims(findings)
    assert [r.claim for r in results] == [1, 2, 3, 4, 5, 6]
    assert [r.verdict for r in results] == [verdict] * 6
    for r in results:
        assert r.rule == claims.RULES[r.claim] and r.paper and r.ours and r.runs


def test_claim_rule_edges():
    # claim 1: the vanilla baseline must stay low for "reproduced"
    assert claims.judge_systematic(0.9, 0.2) == "partly"
    assert claims.judge_systematic(0.5, 0.1) == "reproduced"
    assert claims.judge_systematic(None, 0.1) == "not measured"
    # claim 2: OOD must come long after train; ID before train is not the order of the claim
    assert claims.judge_grokking(1000, 1500, 1800) == "partly"
    assert claims.judge_grokking(1000, 800, 5000) == "not reproduced"
    # claim 3: without a dynamic run only (a) can hold
    assert claims.judge_depth([2], None, [10]) == "partly"
    assert claims.judge_depth([], 22, [10]) == "not measured"
    # claims 4-6 are never "reproduced" by a model that answers nothing
    assert claims.judge_overthinking(9, 2, 6, 32, 0.99, 0.5, answered=False) == "not reproduced"
    assert claims.judge_halting(0.3, 0.3, 2.0, 32) == "not reproduced"
    assert claims.judge_mechanism(None, 0.9, 0.3, 0.8, 0.5, 0.001) == "not reproduced"
    # best run counts: one good run among bad ones reproduces claim 4
    mixed = _overthinking(9.0, 9.0, 0.99, 0.99)
    mixed["runs"].append({**_overthinking(9.0, 2.0, 0.99, 0.5)["runs"][0], "run": "depth-dyn"})
    result = claims.claim_4(mixed)
    assert result.verdict == "reproduced" and result.runs == ["depth-dyn"]


def test_missing_studies_are_not_measured():
    results = claims.judge_claims({"systematic": GOOD["systematic"]})
    assert [r.verdict for r in results] == ["reproduced"] + ["not measured"] * 5
    only_looped = {"runs": [GOOD["systematic"]["runs"][0]]}
    assert claims.claim_1(only_looped).verdict == "not measured"


def _summary_verdicts(path: Path) -> dict[int, str]:
    rows = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\| (\d) \|", line)
        if m:
            rows[int(m.group(1))] = line.rstrip(" |").rsplit("| ", 1)[-1].strip()
    return rows


@pytest.mark.parametrize("findings, verdict", [(GOOD, "reproduced"), (BAD, "not reproduced")])
def test_summary_verdicts_follow_the_numbers(findings, verdict, tmp_path):
    results = [StudyResult(name, f"study {name}", ["r"], {"t": pd.DataFrame({"a": [1.0]})}, {}, f, [f"note {name}"])
               for name, f in findings.items()]
    build_report(results, tmp_path / "report", title="fabricated")
    summary = tmp_path / "report" / "summary.md"
    assert _summary_verdicts(summary) == dict.fromkeys(range(1, 7), verdict)
    text = summary.read_text()
    for n, rule in claims.RULES.items():
        assert f"{n}. {rule}" in text
    assert "src='figures/plotly.min.js'" in (tmp_path / "report" / "index.html").read_text()


# -------------------------------------------------------------------------------------------------
# Small pieces
# -------------------------------------------------------------------------------------------------
def test_depth_profile():
    table = pd.DataFrame({"hops": [2, 3, 4] * 2, "iterations": [4] * 3 + [8] * 3,
                          "accuracy": [1.0, 0.95, 0.2, 1.0, 0.97, 0.93]})
    prof = depth_profile(table, train_T=4, threshold=0.9)
    assert prof["answered_depth_by_T"] == {4: 3, 8: 4} and prof["reach"] == 4 and prof["extension"] == 1
    assert answered_depth(pd.Series({2: 0.5, 3: 1.0}), 0.9) == 1


def test_options_validate():
    with pytest.raises(ValueError, match="n_queries"):
        StudyOptions(n_queries=0)
    with pytest.raises(ValueError, match="max_iterations"):
        StudyOptions(max_iterations=1)
    assert "progress" not in StudyOptions().to_dict()


def test_markdown_table_escapes_pipes():
    text = markdown_table(pd.DataFrame({"a": ["x|y"], "b": [0.123456]}))
    assert "x\\|y" in text and "0.1235" in text


def test_shipped_run_path():
    path = shipped_run_path()
    assert path.name == "shipped_run" and path.parent.name == "analyses"


def test_run_copied_to_a_read_only_place_rebuilds_its_dataset_in_the_cache(runs, tmp_path, monkeypatch):
    import shutil

    import looplens.analyses.studies.base as base

    shutil.copytree(runs / "comp-looped", tmp_path / "pkg" / "shipped_run")
    meta = json.loads((tmp_path / "pkg" / "shipped_run" / "config.json").read_text())
    meta["dataset"]["path"] = str(tmp_path / "elsewhere")  # as on the machine that trained it
    (tmp_path / "pkg" / "shipped_run" / "config.json").write_text(json.dumps(meta))
    monkeypatch.setattr(base.os, "access", lambda path, mode: False)  # the package folder is read-only
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (run,) = as_runs([tmp_path / "pkg" / "shipped_run"])
    assert Path(run.dataset.path).is_relative_to(tmp_path / "cache" / "looplens" / "datasets")
    assert not (tmp_path / "pkg" / ".datasets").exists()
    assert run.dataset.checksum == run.dataset_checksum


def test_report_cli_on_a_folder_of_runs(runs, tmp_path, capsys):
    """A folder of run directories (like analyses/shipped_run/) stands for every run inside it."""
    out = tmp_path / "r"
    assert main(["report", str(runs), "--out", str(out), "--studies", "systematic", "--quiet", *SMALL]) == 0
    result = StudyResult.load(out / "studies" / "systematic")
    assert sorted(result.runs) == ["comp-looped", "comp-vanilla"]
    assert "depth-dynamic" in (out / "summary.md").read_text()  # listed among the runs
