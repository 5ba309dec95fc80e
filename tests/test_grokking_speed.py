"""The grokking-speed ladder: milestones from metrics, aggregation, the grid runner and its resume."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from looplens.analyses import grokking_speed as gs


def _metrics(points, split="test_inferred_id", iterations=4):
    return pd.DataFrame(
        [{"step": s, "epoch": s / 10, "stage": 0, "split": split, "hops": 2, "iterations": iterations,
          "accuracy": a, "loss": 1.0, "n": 100} for s, a in points]
    )


def test_first_reach_reads_the_training_iteration_count_only():
    m = pd.concat([_metrics([(0, 0.1), (100, 0.5), (200, 0.95)]), _metrics([(50, 0.99)], iterations=8)])
    assert gs.first_reach(m, "test_inferred_id", 0.9, 4) == (200.0, 20.0)
    assert gs.first_reach(m, "test_inferred_id", 0.9, 8) == (50.0, 5.0)
    step, epoch = gs.first_reach(m, "test_inferred_id", 0.99, 4)
    assert math.isnan(step) and math.isnan(epoch)


def test_summarize_medians_reached_counts_and_speedup():
    table = pd.DataFrame([
        {"intervention": "control", "control": "control", "seed": s, "steps_to_id": v, "seconds_to_id": v / 10,
         "epochs_to_id": v / 5, "steps_to_ood": math.nan, "seconds_to_ood": math.nan, "final_id": 0.9, "final_ood": 0.0,
         "final_first_ood": 0.1, "final_second_ood": 0.0, "final_ood_atomic": 1.0} for s, v in [(0, 1000), (1, 1200), (2, 1100)]
    ] + [
        {"intervention": "fast", "control": "control", "seed": s, "steps_to_id": v, "seconds_to_id": v / 10,
         "epochs_to_id": v / 5, "steps_to_ood": o, "seconds_to_ood": o / 10, "final_id": 1.0, "final_ood": 0.6,
         "final_first_ood": 0.5, "final_second_ood": 0.2, "final_ood_atomic": 1.0}
        for s, v, o in [(0, 500, 900), (1, 550, math.nan), (2, 600, 1000)]
    ])
    summary = gs.summarize(table).set_index("intervention")
    assert summary.loc["control", "steps_to_id"] == 1100
    assert summary.loc["fast", "steps_to_id"] == 550
    assert summary.loc["fast", "id_speedup_vs_control"] == pytest.approx(2.0)
    assert summary.loc["control", "id_speedup_vs_control"] == pytest.approx(1.0)
    assert summary.loc["fast", "ood_reached"] == 2
    assert math.isnan(summary.loc["fast", "steps_to_ood"])  # one seed never got there: no median claimed


def test_ladder_has_lr_matched_control_for_grokfast():
    ladder = gs.interventions_for(base_lr=1e-3, base_phi=7.2)
    assert ladder["grokfast"].control == "control-lr-matched"
    assert "optim.lr=0.003" in ladder["control-lr-matched"].overrides
    assert "data.phi=14.4" in ladder["phi-high"].overrides
    assert ladder["vanilla"].overrides == ("model.n_blocks=4", "model.n_iterations=1")  # iso-FLOP with 1 x 4
    assert gs.interventions_for(1e-3, 7.2, base_depth=8)["vanilla"].overrides[0] == "model.n_blocks=8"
    assert "optim.batch_size=1024" in gs.interventions_for(1e-3, 7.2, base_batch=256)["batch-4x"].overrides


def _milestones(name, steps_id, steps_ood, batch_mult):
    return [{"intervention": name, "seed": s, "steps_to_id": a, "epochs_to_id": a * batch_mult / 100,
             "steps_to_ood": b, "epochs_to_ood": b * batch_mult / 100} for s, (a, b) in enumerate(zip(steps_id, steps_ood))]


def test_steps_or_epochs_reads_which_quantity_stays_constant():
    # ID arrives after the same number of steps whatever the batch; OOD after the same number of epochs
    table = pd.DataFrame(_milestones("control", [1000, 1000], [8000, 8000], 1)
                         + _milestones("batch-4x", [1000, 1100], [2000, 2100], 4))
    se = gs.steps_or_epochs(table).set_index("milestone")
    assert se.loc["id", "verdict"] == "steps" and se.loc["ood", "verdict"] == "epochs"
    assert se.loc["ood", "steps_ratio"] == pytest.approx(2050 / 8000)
    table.loc[table.intervention == "batch-4x", "steps_to_ood"] = math.nan
    assert gs.steps_or_epochs(table).set_index("milestone").loc["ood", "verdict"] == "not reached in both"
    assert gs.steps_or_epochs(table[table.intervention == "control"]).empty


@pytest.mark.slow
def test_grid_trains_reuses_finished_runs_and_reports(tmp_path):
    table = gs.run_grid(tmp_path, base="smoke-composition", interventions=["weight-decay-1"], seeds=[0],
                        max_steps=40, progress=False)
    assert set(table["intervention"]) == {"weight-decay-1", "control"}  # its control was added
    assert (table["steps"] == 40).all()
    summary_file = tmp_path / "runs" / "control-s0" / "summary.json"
    before = summary_file.stat().st_mtime_ns
    again = gs.run_grid(tmp_path, base="smoke-composition", interventions=["weight-decay-1"], seeds=[0],
                        max_steps=40, progress=False)
    assert summary_file.stat().st_mtime_ns == before  # finished runs are not trained again
    pd.testing.assert_frame_equal(table, again)
    report = gs.write_report(tmp_path, table, "looplens study grokking-speed ...")
    text = report.read_text()
    assert "weight-decay-1" in text and "Command:" in text
    assert (tmp_path / "test_inferred_ood.html").exists() and (tmp_path / "test_inferred_ood_by_epoch.html").exists()
    assert 'src="plotly.min.js"' in (tmp_path / "test_inferred_ood.html").read_text()  # one shared copy, offline
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    with pytest.raises(ValueError, match="unknown intervention"):
        gs.run_grid(tmp_path, base="smoke-composition", interventions=["magic"], progress=False)


@pytest.mark.slow
def test_study_cli_grokking_speed(tmp_path, capsys):
    from looplens.analyses.cli import main

    out = tmp_path / "gs"
    assert main(["study", "grokking-speed", "--out", str(out), "--base", "smoke-composition",
                 "--interventions", "nope", "--seeds", "0", "--max-steps", "30", "--quiet"]) == 0
    assert (out / "summary.md").exists() and (out / "runs" / "nope-s0").exists() and (out / "runs" / "control-s0").exists()
    assert main(["study", "grokking-speed", "--out", str(out), "--seeds", "x"]) == 2
    assert main(["study", "--list"]) == 0
    assert "grokking-speed" in capsys.readouterr().out


@pytest.mark.slow
def test_grid_runs_in_parallel_processes(tmp_path):
    """jobs=2 trains the runs in two spawned processes; the same seed gives the same numbers as in-process."""
    table = gs.run_grid(tmp_path / "par", base="smoke-composition", interventions=["lr-half"], seeds=[0],
                        max_steps=20, extra_overrides=["run.threads=1"], jobs=2, progress=False)
    assert sorted(table["intervention"]) == ["control", "lr-half"] and (table["steps"] == 20).all()
    serial = gs.run_grid(tmp_path / "ser", base="smoke-composition", interventions=["lr-half"], seeds=[0],
                         max_steps=20, extra_overrides=["run.threads=1"], progress=False)
    cols = ["final_id", "final_ood", "final_train", "final_ood_atomic"]
    pd.testing.assert_frame_equal(table[cols], serial[cols])
    with pytest.raises(ValueError, match="jobs"):
        gs.run_grid(tmp_path / "x", base="smoke-composition", jobs=0, progress=False)


def test_fast_recipe_rung_turns_the_paper_preset_into_tiny_composition_feedback():
    from looplens.models.train import preset

    recipe = preset("tiny-composition-paper").with_overrides([*gs.FAST_RECIPE, "run.max_steps=8000",
                                                              "run.time_budget_minutes=20"])
    assert recipe.to_dict() == preset("tiny-composition-feedback").to_dict()


def test_paper_model_recipe_rung_turns_the_paper_preset_into_tiny_composition():
    from looplens.analyses.claims import run_differences
    from looplens.models.train import preset

    recipe = preset("tiny-composition-paper").with_overrides([*gs.PAPER_MODEL_RECIPE, "run.max_steps=10000",
                                                              "run.time_budget_minutes=30"])
    assert recipe.to_dict() == preset("tiny-composition").to_dict()
    assert run_differences(recipe).core == []  # recipe values only: the paper's model, loss and world
