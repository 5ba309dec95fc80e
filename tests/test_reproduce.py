"""`looplens reproduce`: the smoke preset end to end (in-process CLI), skipping finished stages, and
resumption after a kill (mid-training and between stages) giving the results of an uninterrupted run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from looplens.analyses import claims
from looplens.analyses.cli import main
from looplens.analyses.reproduce import STOP_ENV, Plan, RunSpec, plan_for, reproduce
from looplens.analyses.studies import STUDIES
from looplens.analyses.studies.base import StudyOptions, load_findings
from looplens.models.train import load_run


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reproduce") / "smoke"
    assert main(["reproduce", "--preset", "smoke", "--out", str(out), "--quiet"]) == 0
    return out


def _summary_verdicts(path: Path) -> dict[int, str]:
    rows = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\| (\d) \|", line)
        if m:
            rows[int(m.group(1))] = line.rstrip(" |").rsplit("| ", 1)[-1].strip()
    return rows


@pytest.mark.slow
def test_smoke_runs_every_stage(smoke):
    plan = plan_for("smoke")
    ledger = json.loads((smoke / "ledger.json").read_text())
    assert list(ledger["stages"]) == plan.stages()
    assert all(s["status"] == "done" for s in ledger["stages"].values())
    assert {s for s, _ in plan.studies} == set(STUDIES)  # every study runs in the smoke preset
    for spec in plan.runs:
        summary = json.loads((smoke / "runs" / spec.name / "summary.json").read_text())
        assert summary["status"] == "finished"
    for study in STUDIES:
        assert (smoke / "studies" / study / "result.json").is_file()
    report = smoke / "report"
    text = (report / "index.html").read_text()
    assert "* plotly.js v" not in text and re.findall(r"<script[^>]+src='([^']+)'", text) == ["figures/plotly.min.js"]
    for study in STUDIES:
        assert f"id='{study}'" in text
    figures = list((report / "figures").glob("*.html"))
    assert len(figures) >= 15 and (report / "figures" / "plotly.min.js").is_file()


@pytest.mark.slow
def test_smoke_summary_verdicts_follow_the_numbers(smoke):
    findings = {s: load_findings(smoke / "studies" / s) for s in STUDIES}
    configs = {r.name: load_run(r).config for r in (smoke / "runs").iterdir() if (r / "config.json").is_file()}
    expected = {c.claim: c.verdict for c in claims.judge_claims(findings, configs)}
    assert _summary_verdicts(smoke / "report" / "summary.md") == expected
    assert set(expected.values()) <= set(claims.VERDICTS)
    text = (smoke / "report" / "summary.md").read_text()
    assert "## Verdict rules" in text and all(rule in text for rule in claims.RULES.values())


@pytest.mark.slow
def test_smoke_rerun_skips_everything(smoke, capsys):
    before = (smoke / "report" / "summary.md").read_bytes()
    ledger = (smoke / "ledger.json").read_text()
    assert main(["reproduce", "--preset", "smoke", "--out", str(smoke)]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == len(plan_for("smoke").stages())
    assert "0 stages run" in out
    assert (smoke / "report" / "summary.md").read_bytes() == before
    assert json.loads((smoke / "ledger.json").read_text())["stages"] == json.loads(ledger)["stages"]


def test_dry_run(capsys, tmp_path):
    assert main(["reproduce", "--preset", "smoke", "--out", str(tmp_path / "x"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "looplens train --preset smoke-depth --set recurrence.mode=poisson" in out
    assert "stages: 15" in out and not (tmp_path / "x").exists()


def test_bad_set_fails_before_training(tmp_path, capsys):
    assert main(["reproduce", "--preset", "smoke", "--out", str(tmp_path / "x"), "--set", "optim.nope=1"]) == 2
    assert "unknown key 'nope'" in capsys.readouterr().err and not (tmp_path / "x").exists()


# -------------------------------------------------------------------------------------------------
# Resumption: a small plan, run straight through and with interruptions
# -------------------------------------------------------------------------------------------------
def _mini() -> Plan:
    return Plan("mini", (RunSpec("comp", "smoke-composition", ("run.max_steps=150",)),),
                (("systematic", ("comp",)), ("overthinking", ("comp",))),
                StudyOptions(n_queries=16, max_iterations=5, patch_pairs=8, fixed_point_iterations=5))


def _results(out: Path) -> dict[str, bytes]:
    """Every result file, without the lines that legitimately differ (git SHA, timings)."""
    files = {}
    for path in sorted([*out.glob("studies/*/tables/*.csv"), *out.glob("studies/*/figures/*.json"),
                        out / "runs" / "comp" / "metrics.csv", out / "report" / "summary.md"]):
        text = path.read_text()
        if path.name == "summary.md":
            text = "\n".join(line for line in text.splitlines() if not line.startswith("looplens "))
        files[str(path.relative_to(out))] = text
    for path in out.glob("studies/*/result.json"):
        meta = json.loads(path.read_text())
        meta.pop("provenance")
        files[str(path.relative_to(out))] = json.dumps(meta, sort_keys=True)
    return files


@pytest.mark.slow
def test_resume_after_kills_gives_identical_results(tmp_path, monkeypatch):
    from looplens.models.train import trainer as trainer_module

    straight = reproduce(_mini(), tmp_path / "a", progress=False, log=None)
    assert straight.skipped == [] and len(straight.executed) == 4

    # kill 1: inside the training, at step 120 (the last saved state is step 100)
    original = trainer_module.Trainer.train_step
    fired = []

    def killing_step(self):
        original(self)
        if self.step == 120 and not fired:
            fired.append(self.step)
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.Trainer, "train_step", killing_step)
    with pytest.raises(KeyboardInterrupt):
        reproduce(_mini(), tmp_path / "b", progress=False, log=None)
    assert fired == [120]
    assert json.loads((tmp_path / "b" / "runs" / "comp" / "summary.json").read_text())["status"] == "interrupted"
    assert json.loads((tmp_path / "b" / "ledger.json").read_text())["stages"] == {}

    # kill 2: between stages, right after the first study
    class Kill(Exception):
        pass

    def stop_after_study(stage):
        if stage == "study:systematic":
            raise Kill

    with pytest.raises(Kill):
        reproduce(_mini(), tmp_path / "b", progress=False, log=None, after_stage=stop_after_study)
    config = json.loads((tmp_path / "b" / "runs" / "comp" / "config.json").read_text())
    assert [r["step"] for r in config["resumes"]] == [100]  # the training resumed from its saved state

    lines = []
    resumed = reproduce(_mini(), tmp_path / "b", progress=False, log=lines.append)
    assert resumed.skipped == ["train:comp", "study:systematic"]
    assert resumed.executed == ["study:overthinking", "report"]
    assert any("train:comp: done earlier, skipped" in line for line in lines)
    assert _results(tmp_path / "a") == _results(tmp_path / "b")
    assert resumed.verdicts == straight.verdicts


@pytest.mark.slow
def test_stop_env_and_cli_exit_code(tmp_path, monkeypatch, capsys):
    import looplens.analyses.reproduce as rep

    monkeypatch.setitem(rep._PLANS, "smoke", _mini)
    monkeypatch.setenv(STOP_ENV, "2")
    out = tmp_path / "r"
    assert main(["reproduce", "--preset", "smoke", "--out", str(out), "--quiet"]) == 3
    assert "stopped after 2 stage(s)" in capsys.readouterr().err
    assert list(json.loads((out / "ledger.json").read_text())["stages"]) == ["train:comp", "study:systematic"]
    monkeypatch.delenv(STOP_ENV)
    assert main(["reproduce", "--preset", "smoke", "--out", str(out), "--quiet"]) == 0
    assert "2 stages run, 2 skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_out_must_be_a_matching_reproduction(tmp_path):
    out = tmp_path / "r"
    reproduce(_mini(), out, progress=False, log=None)
    other = Plan("mini", _mini().runs, (("systematic", ("comp",)),), _mini().options)
    with pytest.raises(ValueError, match="another plan"):
        reproduce(other, out, progress=False, log=None)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "file.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a reproduce directory"):
        reproduce(_mini(), stranger, progress=False, log=None)
    with pytest.raises(FileExistsError, match="not a reproduce directory"):
        reproduce(_mini(), stranger, progress=False, log=None, overwrite=True)
    assert (stranger / "file.txt").exists()


def test_plans_are_consistent():
    for name in ("smoke", "tiny", "paper"):
        plan = plan_for(name)
        for spec in plan.runs:
            spec.config()  # every preset exists and every override applies
        assert {s for s, _ in plan.studies} == set(STUDIES)
    with pytest.raises(ValueError, match="unknown reproduce preset"):
        plan_for("huge")
    with pytest.raises(ValueError, match="unknown run"):
        Plan("bad", _mini().runs, (("systematic", ("nope",)),), StudyOptions())


def test_tiny_plan_judges_claims_on_the_paper_model():
    """Issue 15: every run a claim reads is the paper's model, loss and world (no core difference); the only
    other run (the permutation-world shortcut run) feeds the shortcut study alone; two runs train at once."""
    from looplens.analyses.claims import run_differences

    plan = plan_for("tiny")
    claim_runs = {r for study, runs in plan.studies if study != "shortcut" for r in runs}
    for spec in plan.runs:
        core = run_differences(spec.config()).core
        if spec.name in claim_runs:
            assert core == [], (spec.name, core)
        else:
            assert core == ["world permutation (paper random-tail)"], (spec.name, core)
    assert "tiny-composition-feedback" not in {spec.preset for spec in plan.runs}
    assert plan.jobs == 2 and plan_for("smoke").jobs == 1


def test_tiny_plan_runs_stop_at_a_step_count():
    """The tiny plan's verdicts must not depend on the machine's load: every run ends at its max_steps,
    and its wall-clock cap is a safety net at least twice the time that takes at the measured speed."""
    from looplens.models.train import preset

    measured = json.loads((Path(__file__).parent.parent / "benchmarks/results/reproduce_tiny.json").read_text())
    for spec in plan_for("tiny").runs:
        cfg = spec.config()
        assert cfg.run.max_steps is not None, spec.name
        cap = cfg.run.time_budget_minutes * 60
        seconds = measured["stages"][f"train:{spec.name}"]
        steps = measured["runs"][spec.name]["step"]
        assert cap >= 2 * seconds * cfg.run.max_steps / steps, (spec.name, cap, seconds, steps)
    assert preset("tiny-depth").optim.schedule == "constant"  # so 6,000 steps is a prefix of a longer run
