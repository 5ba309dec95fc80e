"""Verdicts that name the model and the recipe (analyses/claims.py): differences from the paper, the
"reproduced with modifications" and "not testable on these runs" words, and claims 1, 2, 5, 6's rules."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from looplens.analyses import claims
from looplens.analyses.report import build_report
from looplens.analyses.studies.base import StudyResult
from looplens.models.train.presets import preset

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "analyses" / "shipped_run"


def shipped_config(name: str):
    from looplens.models.train.config import TrainConfig

    return TrainConfig.from_dict(json.loads((SHIPPED / name / "config.json").read_text())["config"])


def test_paper_presets_have_no_core_differences():
    for name in ("paper-composition", "paper-composition-code", "paper-depth", "paper-depth-r8", "paper-depth-dynamic"):
        diff = claims.run_differences(preset(name))
        assert diff.known and not diff.core and not diff.other, (name, diff)
    vanilla = preset("paper-composition").with_overrides(["model.n_iterations=1", "model.n_blocks=8"])
    assert not claims.run_differences(vanilla).other


def test_tiny_paper_preset_lists_sizes_but_no_core_difference():
    diff = claims.run_differences(preset("tiny-composition-paper"))
    assert not [d for d in diff.core if "feedback" in d or "supervision" in d]
    assert any(d.startswith("data.n_entities=") for d in diff.other)
    assert any(d.startswith("steps ") for d in diff.other)


def test_shipped_run_differences_name_feedback_supervision_and_world():
    diff = claims.run_differences(shipped_config("looped"))
    core = " ".join(diff.core)
    assert "readout feedback" in core and "intermediate supervision (recurrence.supervise=from_hops)" in core
    assert "world permutation (paper random-tail)" in core
    assert "optim.weight_decay=1 (paper 0.01 or 0.1)" in diff.other
    assert "optim.no_decay=[biases, embeddings, norms] (paper [])" in diff.other


def _systematic(looped_ood=0.9, vanilla_ood=0.0) -> dict:
    return {"runs": [
        {"run": "looped", "kind": "looped", "R": 4, "n_blocks": 1, "virtual_layers": 4, "final_step": 10,
         "final": {"test_inferred_ood": looped_ood}, "max": {}},
        {"run": "vanilla", "kind": "vanilla", "R": 1, "n_blocks": 4, "virtual_layers": 4, "final_step": 10,
         "final": {"test_inferred_ood": vanilla_ood}, "max": {}},
    ]}


def test_claim_1_on_the_shipped_runs_is_reproduced_with_modifications():
    configs = {"looped": shipped_config("looped"), "vanilla": shipped_config("vanilla")}
    result = claims.claim_1(_systematic(), configs)
    assert result.verdict == "reproduced with modifications"
    assert "readout feedback" in result.ours and "intermediate supervision" in result.ours
    assert any(d.startswith("looped: model/loss/world: readout feedback") for d in result.differences)


def test_claim_1_needs_a_vanilla_with_the_looped_runs_applicable_modifications():
    looped = shipped_config("looped")
    plain = looped.with_overrides(["model.n_iterations=1", "model.n_blocks=4", "optim.weight_decay=0.1",
                                   "optim.atomic_share=none"])
    result = claims.claim_1(_systematic(), {"looped": looped, "vanilla": plain})
    assert result.verdict == "not testable on these runs"
    assert "optim.weight_decay" in result.ours and "optim.atomic_share" in result.ours
    # the paper's own pair: nothing modified, so "reproduced"
    paper = preset("paper-composition")
    pair = {"looped": paper, "vanilla": paper.with_overrides(["model.n_iterations=1", "model.n_blocks=8"])}
    assert claims.claim_1(_systematic(), pair).verdict == "reproduced"


def test_claim_2_same_step_is_not_in_order_and_ood_must_be_late_after_id():
    assert claims.judge_grokking(1000, 1000, 2500) == "partly"  # only the late OOD transition
    assert claims.judge_grokking(1000, 1000, 1500) == "not reproduced"
    assert claims.judge_grokking(1000, 3000, 5000) == "partly"  # OOD < 2 x ID
    assert claims.judge_grokking(1000, 3000, 6000) == "reproduced"
    assert claims.judge_grokking(1000, 3000, 3000) == "partly"  # OOD at ID's step: not late


def test_claim_5_without_overthinking_is_not_testable():
    run = {"run": "looped", "split": "test_inferred_id", "solved_hops": [2], "best_fixed_T": 2,
           "best_fixed_accuracy": 1.0, "max_iterations": 32, "fixed_max_accuracy": 1.0, "kl_entropy_accuracy": 1.0,
           "kl_entropy_mean_iterations": 3.0, "kl_accuracy": 1.0, "kl_mean_iterations": 3.0}
    result = claims.claim_5({"runs": [run]})
    assert result.verdict == "not testable on these runs" and "nothing to recover" in result.ours
    lost = {**run, "fixed_max_accuracy": 0.6, "kl_entropy_accuracy": 0.99, "kl_accuracy": 0.7, "kl_mean_iterations": 2.0}
    assert claims.claim_5({"runs": [lost]}).verdict == "reproduced"
    kl_fine = {**lost, "kl_accuracy": 0.99}  # KL-only does not stop too early: the paper's point not shown
    assert claims.claim_5({"runs": [kl_fine]}).verdict == "partly"


def _mechanism(positions) -> dict:
    split = {"accuracy": 1.0, "bridge_resolved": 1.0, "answer_resolved": 1.0, "bridge_depth": 0.24,
             "answer_depth": 0.48}
    return {"primary_split": "test_inferred_id", "runs": [
        {"run": "looped", "kind": "looped", "R": 4, "splits": {"test_inferred_id": split},
         "patching": {"head": {"best_position_by_iteration": positions, "readout_position": 2}},
         "fixed_point": {"change_first": 0.98, "change_last": 0.03}}]}


def test_claim_6_does_not_count_a_lens_the_loss_built_in():
    plain = {"looped": preset("paper-composition")}
    assert claims.claim_6(_mechanism([0, 1, 2, 2]), plain).verdict == "reproduced"
    assert claims.claim_6(_mechanism([0, 2, 2, 2]), plain).verdict == "partly"  # lens without the patching move
    shipped = claims.claim_6(_mechanism([0, 1, 2, 2]), {"looped": shipped_config("looped")})
    assert shipped.verdict == "partly" and "built in by its loss" in shipped.ours


def test_report_writes_claims_csv_with_differences(tmp_path):
    findings = {"systematic": _systematic(), "mechanism": _mechanism([0, 1, 2, 2])}
    results = [StudyResult(name, f"study {name}", ["looped", "vanilla"], {"t": pd.DataFrame({"a": [1.0]})}, {}, f,
                           [f"note {name}"]) for name, f in findings.items()]
    configs = {"looped": shipped_config("looped"), "vanilla": shipped_config("vanilla")}
    build_report(results, tmp_path / "report", title="t", configs=configs)
    table = pd.read_csv(tmp_path / "report" / "tables" / "claims.csv")
    assert list(table.columns) == ["claim", "verdict", "runs", "differences"]
    row = table.set_index("claim").loc[1]
    assert row["verdict"] == "reproduced with modifications" and "readout feedback" in row["differences"]
    assert "reproduced" not in set(table["verdict"])
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "differences from the paper" in summary


@pytest.mark.parametrize("verdict", claims.VERDICTS)
def test_every_verdict_has_a_report_colour(verdict):
    from looplens.analyses.report import VERDICT_COLORS

    assert verdict in VERDICT_COLORS
