"""Measured numbers quoted in the docs match the results files they come from.

Every benchmark or research figure a doc quotes is written by a script to a results file
(benchmarks/results/*.json by the scripts in benchmarks/, docs/research/*/runs.csv by `looplens study
grokking-speed`, the presets' TOML for configuration values). QUOTES below lists each quote: the doc,
the text around the number (``{}`` marks the number), the results file, the key, and how the doc
writes the value. The test formats the value read from the file and looks for the text in the doc, so
a re-measured benchmark or an edited sentence that no longer matches its source fails here.

To quote a new number: write it with a script into a results file, then add a row here.
"""

from __future__ import annotations

import csv
import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
THROUGHPUT = "benchmarks/results/train_throughput.json"
THROUGHPUT_H100 = "benchmarks/results/train_throughput_h100.json"
PATCHING = "benchmarks/results/patching_sweep.json"
SMOKE = "benchmarks/results/reproduce_smoke.json"
TINY = "benchmarks/results/reproduce_tiny.json"
APP = "benchmarks/results/app_first_paint.json"
PAPER_MODEL = "docs/research/paper-model/runs.csv"  # issue 15: one row per composition run (curve.py --csv)
GRID = "docs/research/cpu-final/runs.csv"  # the 3-seed tiny-composition grid; its seed-0 runs ship


def f1(v: float) -> str:
    return f"{v:.1f}"


def f2(v: float) -> str:
    return f"{v:.2f}"


def f3(v: float) -> str:
    return f"{v:.3f}"


def thousands(v: float) -> str:
    return f"{v:,.0f}"


def percent(v: float) -> str:
    return f"{100 * v:.0f}%"


def seconds(v: float) -> str:
    return f"{v:.0f}"


def minutes_seconds(v: float) -> str:
    return f"{int(v // 60)}m{int(round(v)) % 60:02d}s"


def minutes(v: float) -> str:
    return f"{v / 60:.0f}"


def gflops(v: float) -> str:
    return f"{v / 1e9:.0f}"


def tflops(v: float) -> str:
    return f"{v / 1e12:.1f}"


# (doc, text with {} where the number stands, results file, key, format)
QUOTES: list[tuple[str, str, str, str, Callable[[Any], str]]] = [
    # training throughput (benchmarks/train_throughput.py)
    ("docs/training.md", "| tiny-composition | CPU, 1 thread | {} |", THROUGHPUT, "results[preset=tiny-composition].steps_per_s", f1),
    ("docs/training.md", "| CPU, 1 thread | 17.6 | {} |", THROUGHPUT, "results[preset=tiny-composition].tokens_per_s", thousands),
    ("docs/training.md", "| 13,478 | {} of", THROUGHPUT, "results[preset=tiny-composition].mfu", f2),
    ("docs/training.md", "0.61 of {} GFLOP/s", THROUGHPUT, "results[preset=tiny-composition].peak_flops_per_s", gflops),
    ("docs/training.md", "2 cores shared, load {} |", THROUGHPUT, "machine.load_average.0", f1),
    ("docs/training.md", "| tiny-depth (stage 2: 3-token queries) | CPU, 1 thread | {} |", THROUGHPUT, "results[preset=tiny-depth].steps_per_s", f1),
    ("docs/training.md", "| CPU, 1 thread | 17.7 | {} |", THROUGHPUT, "results[preset=tiny-depth].tokens_per_s", thousands),
    ("docs/training.md", "| 13,557 | {} |", THROUGHPUT, "results[preset=tiny-depth].mfu", f2),
    ("docs/training.md", "| tiny-composition | H100, bf16 | {} |", THROUGHPUT_H100, "results[preset=tiny-composition].steps_per_s", f1),
    ("docs/training.md", "| H100, bf16 | 64.4 | {} |", THROUGHPUT_H100, "results[preset=tiny-composition].tokens_per_s", thousands),
    ("docs/training.md", "| paper-composition | H100, bf16 | {} |", THROUGHPUT_H100, "results[preset=paper-composition].steps_per_s", f1),
    ("docs/training.md", "| H100, bf16 | 16.3 | {} |", THROUGHPUT_H100, "results[preset=paper-composition].tokens_per_s", thousands),
    ("docs/training.md", "| 25,087 | {} TFLOP/s", THROUGHPUT_H100, "results[preset=paper-composition].model_flops_per_s", tflops),
    ("docs/analyses.md", "at {} steps/s", THROUGHPUT_H100, "results[preset=paper-composition].steps_per_s", f1),
    ("analyses/reproduce.py", "paper-composition trains at {} steps/s on one H100", THROUGHPUT_H100, "results[preset=paper-composition].steps_per_s", f1),
    ("analyses/reproduce.py", "comp-r4's 1.5M steps take ~{} h", THROUGHPUT_H100, "results[preset=paper-composition].steps_per_s", lambda v: f"{1_500_000 / v / 3600:.1f}"),
    ("docs/analyses.md", "comp-r4's 1,500,000 steps take ~{} h", THROUGHPUT_H100, "results[preset=paper-composition].steps_per_s", lambda v: f"{1_500_000 / v / 3600:.1f}"),
    # R = 1, 2, 4, 8 and an 8-layer vanilla model cost 0.25 + 0.5 + 1 + 2 + 0.5 = 4.25 x comp-r4
    ("docs/analyses.md", "~{} days one after another", THROUGHPUT_H100, "results[preset=paper-composition].steps_per_s", lambda v: f"{4.25 * 1_500_000 / v / 86400:.1f}"),
    ("analyses/reproduce.py", "~{} days one after another", THROUGHPUT_H100, "results[preset=paper-composition].steps_per_s", lambda v: f"{4.25 * 1_500_000 / v / 86400:.1f}"),
    ("docs/research/README.md", "trains at **{} steps/s**", THROUGHPUT_H100, "results[preset=paper-composition].steps_per_s", f1),
    ("README.md", "`paper-composition` at {} steps/s", THROUGHPUT_H100, "results[preset=paper-composition].steps_per_s", f1),
    # issue 15: the paper's model, three seeds and their vanilla twins (README's research table)
    ("README.md", "| the paper's | {} / 0.76", PAPER_MODEL, "[run=repro-tiny-comp-looped].final_test_inferred_ood", f2),
    ("README.md", "| the paper's | 1.00 / {} /", PAPER_MODEL, "[run=d1-beta98-s1].final_test_inferred_ood", f2),
    ("README.md", "1.00 / 0.76 / {} (0.99", PAPER_MODEL, "[run=d1-beta98-s2].final_test_inferred_ood", f2),
    ("README.md", "| {} / 0.06 / 0.02 at the end", PAPER_MODEL, "[run=repro-tiny-comp-vanilla].final_test_inferred_ood", f2),
    ("README.md", "| 0.06 / {} / 0.02 at the end", PAPER_MODEL, "[run=d2-vanilla-s1].final_test_inferred_ood", f2),
    ("README.md", "| 0.06 / 0.06 / {} at the end", PAPER_MODEL, "[run=d2-vanilla-s2].final_test_inferred_ood", f2),
    # patching sweep (benchmarks/patching_sweep.py)
    ("docs/interp.md", "one CPU thread: median {} s including", PATCHING, "seconds_median.interp_fast", f2),
    ("docs/interp.md", "against {} s for `transformer_lens.patching`", PATCHING, "seconds_median.transformer_lens_one_forward_per_cell", f2),
    ("docs/interp.md", "given a ready clean cache), i.e. {}x", PATCHING, "speedup_median_fast_vs_one_forward_per_cell", f2),
    ("docs/interp.md", "the same ready clean cache, {}x", PATCHING, "speedup_median_fast_with_clean_cache_vs_one_forward_per_cell", f2),
    ("benchmarks/README.md", "fast path took {} s", "benchmarks/results/patching_sweep_16_5.json", "seconds_median.interp_fast", f2),
    ("benchmarks/README.md", "one hooked forward per cell {} s", "benchmarks/results/patching_sweep_16_5.json", "seconds_median.transformer_lens_one_forward_per_cell", f2),
    ("benchmarks/README.md", "exact path {} s", "benchmarks/results/patching_sweep_16_5.json", "seconds_median.interp_exact_path", f2),
    ("benchmarks/README.md", "**{}x** faster than one forward per cell", "benchmarks/results/patching_sweep_16_5.json", "speedup_median_fast_vs_one_forward_per_cell", f2),
    ("benchmarks/README.md", "end to end **{}x** faster than one hooked forward per cell", "benchmarks/results/patching_sweep_before_block_function.json", "speedup_median_fast_vs_one_forward_per_cell", f2),
    ("benchmarks/README.md", "corrupted run is added), **{}x** in wall time", "benchmarks/results/patching_sweep_before_block_function.json", "speedup_median_fast_with_clean_cache_vs_one_forward_per_cell", f2),
    ("benchmarks/README.md", "and {}x in CPU time", "benchmarks/results/patching_sweep_before_block_function.json", "speedup_cpu_fast_with_clean_cache_vs_one_forward_per_cell", f2),
    # looplens app's first paint (benchmarks/app_first_paint.py): before, after, bare Streamlit
    ("docs/app.md", "| title (first visit) | {} |", APP, "variants.baseline 3de0b9d.summary.median_first_title_s", f3),
    ("docs/app.md", "| 23.863 | {} |", APP, "variants.working tree.summary.median_first_title_s", f3),
    ("docs/app.md", "| 2.818 | {} |", APP, "variants.floor.summary.median_first_title_s", f3),
    ("docs/app.md", "| spinner (first visit) | none shown | {} |", APP, "variants.working tree.summary.median_first_spinner_s", f3),
    ("docs/app.md", "| first chart (first visit) | {} |", APP, "variants.baseline 3de0b9d.summary.median_first_chart_s", f3),
    ("docs/app.md", "| 32.098 | {} |", APP, "variants.working tree.summary.median_first_chart_s", f3),
    ("docs/app.md", "| title (second visit) | {} |", APP, "variants.baseline 3de0b9d.summary.median_second_title_s", f3),
    ("docs/app.md", "| 2.298 | {} |", APP, "variants.working tree.summary.median_second_title_s", f3),
    ("docs/app.md", "| 1.987 | {} |", APP, "variants.floor.summary.median_second_title_s", f3),
    ("docs/app.md", "| first chart (second visit) | {} |", APP, "variants.baseline 3de0b9d.summary.median_second_chart_s", f3),
    ("docs/app.md", "| 15.508 | {} |", APP, "variants.working tree.summary.median_second_chart_s", f3),
    # looplens reproduce (benchmarks/reproduce_time.py)
    ("README.md", "checks the plumbing in {} s of CPU time", SMOKE, "cpu_seconds", seconds),
    ("README.md", "CPU time ({} s of wall time here", SMOKE, "wall_seconds", seconds),
    ("README.md", "other work at load average {}:", SMOKE, "load_average_before.0", f1),
    ("docs/analyses.md", "# plumbing check: {} s of CPU time", SMOKE, "cpu_seconds", seconds),
    ("docs/analyses.md", "measured {} s of CPU time for the whole command", SMOKE, "cpu_seconds", seconds),
    ("docs/analyses.md", "whole command: {} s of wall time", SMOKE, "wall_seconds", seconds),
    ("docs/analyses.md", "({} s of stages)", SMOKE, "stage_seconds_total", seconds),
    ("docs/analyses.md", "while other work ran at load average {};", SMOKE, "load_average_before.0", f1),
    ("docs/analyses.md", "train:comp-r2: done in {} s", SMOKE, "stages.train:comp-r2", f1),
    ("docs/analyses.md", "study:systematic: done in {} s", SMOKE, "stages.study:systematic", f1),
    ("docs/analyses.md", "report: done in {} s", SMOKE, "stages.report", f1),
    ("docs/analyses.md", "0 skipped, {} s)", SMOKE, "stage_seconds_total", seconds),
    ("README.md", "`looplens reproduce` took {} s", TINY, "wall_seconds", thousands),
    ("README.md", "from a fresh clone ({} with the install", TINY, "demo_wall_seconds", minutes_seconds),
    ("docs/analyses.md", "took **{} s", TINY, "wall_seconds", thousands),
    ("docs/analyses.md", "`bash scripts/demo.sh`, {} wall", TINY, "demo_wall_seconds", minutes_seconds),
    ("docs/analyses.md", "comp-looped {} s", TINY, "stages.train:comp-looped", seconds),
    ("docs/analyses.md", "comp-vanilla {} s", TINY, "stages.train:comp-vanilla", seconds),
    ("docs/analyses.md", "comp-permutation {} s", TINY, "stages.train:comp-permutation", seconds),
    ("docs/analyses.md", "depth-fixed {} s", TINY, "stages.train:depth-fixed", seconds),
    ("docs/analyses.md", "depth-dynamic {} s", TINY, "stages.train:depth-dynamic", seconds),
    # the tiny-composition-feedback grid (docs/research/cpu-final) and its seed-0 runs (issue 8)
    ("docs/training.md", "(8,000 steps, ~{} minutes on one thread)", GRID, "[run=docs/research/cpu-final/runs/control-s0].wall_seconds", minutes),
    ("docs/training.md", "test_inferred_id >= 0.9 by step ~{} ", GRID, "[run=docs/research/cpu-final/runs/control-s0].steps_to_id", thousands),
    ("docs/training.md", "strict OOD (test_inferred_ood) {} at the end on seed 0", GRID, "[run=docs/research/cpu-final/runs/control-s0].final_ood", f2),
    ("README.md", "| 8,000 ({} s) | 8,000", GRID, "[run=docs/research/cpu-final/runs/control-s0].wall_seconds", seconds),
    ("README.md", "s) | 8,000 ({} s) |", GRID, "[run=docs/research/cpu-final/runs/vanilla-s0].wall_seconds", seconds),
    # configuration values quoted in prose
    ("docs/DECISIONS.md", "{} atomic per batch", "models/presets/tiny-composition-feedback.toml", "optim.atomic_share", percent),
    ("docs/analyses.md", "comp-r4's {} steps", "models/presets/paper-composition.toml", "run.max_steps", thousands),
    # issue 16's performance work (benchmarks/README.md)
    ("benchmarks/README.md", "wall-clock medians): tiny forward {}x", "benchmarks/results/zero_cost_hooks_before.json", "results[size=tiny].forward_ratio", f3),
    ("benchmarks/README.md", "tiny forward 1.106x, train step {}x", "benchmarks/results/zero_cost_hooks_fused_kernels.json", "results[size=tiny].step_ratio", f3),
    ("benchmarks/README.md", "tiny forward {}x, train step 1.045x", "benchmarks/results/zero_cost_hooks_fused_kernels.json", "results[size=tiny].forward_ratio", f3),
    ("benchmarks/README.md", "paper width forward {}x, train step 1.057x", "benchmarks/results/zero_cost_hooks_fused_kernels.json", "results[size=paper].forward_ratio", f3),
    ("benchmarks/README.md", "tiny forward **{}x**, train step", "benchmarks/results/zero_cost_hooks.json", "results[size=tiny].forward_ratio", f3),
    ("benchmarks/README.md", "train step **{}x**; paper width", "benchmarks/results/zero_cost_hooks.json", "results[size=tiny].step_ratio", f3),
    ("benchmarks/README.md", "paper width\nforward **{}x**", "benchmarks/results/zero_cost_hooks.json", "results[size=paper].forward_ratio", f3),
    ("benchmarks/README.md", "**1.007x**, train step **{}x**", "benchmarks/results/zero_cost_hooks.json", "results[size=paper].step_ratio", f3),
    ("benchmarks/README.md", "Before (`compile_step_before.json`): {} graph breaks", "benchmarks/results/compile_step_before.json", "forward_graph_breaks.graph_breaks", str),
    ("benchmarks/README.md", "step compiled / eager was {} (", "benchmarks/results/compile_step_load7.json", "train_step.compiled_over_eager", f3),
    ("benchmarks/README.md", "eager **{}** (`train_step.compiled_over_eager`)", "benchmarks/results/compile_step.json", "train_step.compiled_over_eager", f3),
    ("benchmarks/README.md", "after a {} s compile (`train_step.compile_seconds`)", "benchmarks/results/compile_step.json", "train_step.compile_seconds", f2),
    ("benchmarks/README.md", "still {} graph breaks", "benchmarks/results/compile_step.json", "forward_graph_breaks.graph_breaks", str),
    ("benchmarks/README.md", "8 seeds take {}x one seed's step in CPU time", "benchmarks/results/ensemble_train.json", "results[threads=1].step_ratio_cpu", f2),
    ("benchmarks/README.md", "`results[threads=1].step_ratio_cpu`; {}x in wall time", "benchmarks/results/ensemble_train.json", "results[threads=1].step_ratio", f2),
    ("benchmarks/README.md", "ensemble can share) is {} of the step", "benchmarks/results/ensemble_train.json", "decomposition.fit.fixed_share_of_step", lambda v: f"{100 * v:.1f}%"),
    ("benchmarks/README.md", "3.67 GFLOP at {} of the matmul peak", "benchmarks/results/ensemble_train.json", "decomposition.step_mfu_vs_measured_peak", f3),
    ("benchmarks/README.md", "The step is {} GFLOP at", "benchmarks/results/ensemble_train.json", "decomposition.step_flops", lambda v: f"{v / 1e9:.2f}"),
    ("benchmarks/README.md", "perfectly parallel cores take {}x one seed on one", "benchmarks/results/ensemble_train.json", "decomposition.bounds_n_seeds_over_one_seed.amortised_2_cores", f3),
    ("benchmarks/README.md", "amortised_2_cores`; {}x on one core", "benchmarks/results/ensemble_train.json", "decomposition.bounds_n_seeds_over_one_seed.amortised_1_cores", f3),
    ("benchmarks/README.md", "nothing else gives {}x (`at_peak_2_cores`)", "benchmarks/results/ensemble_train.json", "decomposition.bounds_n_seeds_over_one_seed.at_peak_2_cores", f2),
    ("benchmarks/README.md", "evaluation took {} of the run", "benchmarks/results/eval_share_before.json", "eval_share_measured", lambda v: f"{100 * v:.1f}%"),
    ("benchmarks/README.md", "load ~5) the projection is {} (", "benchmarks/results/eval_share_after_fast_path.json", "full_run.eval_share_projected", lambda v: f"{100 * v:.1f}%"),
    ("benchmarks/README.md", "took 9.1% of the run (`eval_share_measured`; 3 evaluations of 4,533 queries up to 8 iterations), {}", "benchmarks/results/eval_share_before.json", "full_run.eval_share_projected", lambda v: f"{100 * v:.1f}%"),
    ("benchmarks/README.md", "the padded chunking took\n{}x the CPU time", "benchmarks/results/eval_share_length_chunks.json", "chunking.cpu_ratio_padded_over_by_length", f3),
    ("benchmarks/README.md", "one evaluation costs {} training steps of CPU time", "benchmarks/results/eval_share_length_chunks.json", "full_run.eval_in_steps_cpu", f2),
    ("benchmarks/README.md", "the projected share of the full run is\n**{}** of wall time", "benchmarks/results/eval_share_length_chunks.json", "full_run.eval_share_projected", lambda v: f"{100 * v:.1f}%"),
    ("benchmarks/README.md", "`full_run.eval_share_projected`; {} in CPU time", "benchmarks/results/eval_share_length_chunks.json", "full_run.eval_share_projected_cpu", lambda v: f"{100 * v:.1f}%"),
    ("benchmarks/README.md", "evaluation costs {} training steps of CPU time (`full_run.eval_in_steps_cpu`; the step", "benchmarks/results/eval_share.json", "full_run.eval_in_steps_cpu", f2),
    ("benchmarks/README.md", "projected share **{}** of wall time", "benchmarks/results/eval_share.json", "full_run.eval_share_projected", lambda v: f"{100 * v:.1f}%"),
    ("benchmarks/README.md", "tiny forward still ranges {}-1.166", "benchmarks/results/zero_cost_hooks.json", "results[size=tiny].forward_ratio_per_process.0", f3),
    ("benchmarks/README.md", "the paper forward\n0.986-{}:", "benchmarks/results/zero_cost_hooks.json", "results[size=paper].forward_ratio_per_process.0", f3),
    ("benchmarks/README.md", "8 seeds' step took **{}x** one seed's", "benchmarks/results/ensemble_train_2threads.json", "results[threads=2].step_ratio", f2),
    ("benchmarks/README.md", "a projected full run {}x, i.e.", "benchmarks/results/ensemble_train_2threads.json", "results[threads=2].projected_run_ratio", f2),
    ("benchmarks/README.md", "i.e. {}x the time of", "benchmarks/results/ensemble_train_2threads.json", "results[threads=2].projected_ratio_vs_sequential", f2),
    ("benchmarks/README.md", "the fast path {} s end\nto end", PATCHING, "seconds_median.interp_fast", f2),
    ("benchmarks/README.md", "one hooked forward per cell {} s: ", PATCHING, "seconds_median.transformer_lens_one_forward_per_cell", f2),
    ("benchmarks/README.md", "per cell 1.36 s: **{}x**", PATCHING, "speedup_median_fast_vs_one_forward_per_cell", f2),
    ("benchmarks/README.md", "**{}x** given the same ready clean cache", PATCHING, "speedup_median_fast_with_clean_cache_vs_one_forward_per_cell", f2),
    ("benchmarks/README.md", "clean_cache_vs_one_forward_per_cell`;\n{}x in CPU time)", PATCHING, "speedup_cpu_fast_with_clean_cache_vs_one_forward_per_cell", f2),
    ("benchmarks/README.md", "`patching_sweep_block_function.json`): {}x end to end", "benchmarks/results/patching_sweep_block_function.json", "speedup_median_fast_vs_one_forward_per_cell", f2),
    ("benchmarks/README.md", "1.87x end to end, {}x given the clean cache", "benchmarks/results/patching_sweep_block_function.json", "speedup_median_fast_with_clean_cache_vs_one_forward_per_cell", f2),
]


def _select(rows: list[dict], selector: str) -> dict:
    """rows[key=value,...]: the one row whose fields match."""
    want = dict(part.split("=", 1) for part in selector.split(","))
    found = [r for r in rows if all(str(r.get(k)) == v for k, v in want.items())]
    assert len(found) == 1, f"{selector}: {len(found)} matching rows"
    return found[0]


def lookup(source: str, key: str) -> Any:
    path = ROOT / source
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        m = re.fullmatch(r"\[(.+?)\]\.(.+)", key)
        assert m, f"{key}: a CSV key is [column=value].column"
        value = _select(rows, m.group(1))[m.group(2)]
        return float(value) if re.fullmatch(r"-?[\d.]+(e-?\d+)?", value) else value
    data: Any = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    # dots separate keys, except inside [...] and in keys holding a colon (stage names: "train:comp-r4")
    for part in re.findall(r"[^.\[]+(?:\[[^\]]*\])?|\[[^\]]*\]", key):
        m = re.fullmatch(r"([^\[]*)(?:\[(.+)\])?", part)
        name, selector = m.group(1), m.group(2)
        if name and isinstance(data, list):
            data = data[int(name)]  # a list index: load_average_before.0
        elif name:
            data = data[name]
        if selector:
            data = _select(data, selector)
    return data


def _doc(doc: str) -> str:
    return (ROOT / doc).read_text(encoding="utf-8")


@pytest.mark.parametrize("doc, text, source, key, fmt",
                         [pytest.param(*q, id=f"{q[0]}:{q[3]}") for q in QUOTES])
def test_quoted_number_matches_its_results_file(doc, text, source, key, fmt):
    value = lookup(source, key)
    quote = " ".join(text.format(fmt(value)).split())
    body = " ".join(_doc(doc).split())  # line breaks in the doc do not matter
    assert quote in body, (
        f"{doc} should quote {source} {key} = {value!r} as {quote!r}; the doc says something else "
        "(re-measured? then update the doc; reworded? then update QUOTES)")


def _linked_docs(doc: str) -> list[str]:
    """The markdown files a doc links to (relative links), so a summary may cite through its details page."""
    base = (ROOT / doc).parent
    links = re.findall(r"\]\(([^)#\s]+\.md)\)", _doc(doc))
    return [str((base / link).resolve().relative_to(ROOT)) for link in links if (base / link).is_file()]


def test_docs_cite_the_benchmark_files_they_quote():
    for doc, _, source, _, _ in QUOTES:
        if source.startswith("benchmarks/results/"):
            name = Path(source).name
            assert name in _doc(doc) or any(name in _doc(d) for d in _linked_docs(doc)), (
                f"{doc} quotes {source} without naming it (or linking a page that does)")


def test_lookup_reads_json_csv_and_toml():
    assert lookup(THROUGHPUT_H100, "results[preset=paper-composition].device") == "cuda"
    assert lookup(GRID, "[run=docs/research/cpu-final/runs/vanilla-s0].final_ood") == 0.0
    assert lookup("models/presets/tiny-composition.toml", "model.n_blocks") == 1
    assert lookup(THROUGHPUT, "machine.load_average.0") == pytest.approx(1.7, abs=0.01)
    with pytest.raises(AssertionError, match="0 matching rows"):
        lookup(THROUGHPUT, "results[preset=nope].steps_per_s")
