"""The grokking-speed ablation ladder (issue 8): which intervention makes composition arrive sooner?

Trains a grid of short runs with looplens's own trainer: one base preset, a list of interventions (each a
set of ``section.key=value`` overrides), several seeds. Every intervention is compared against a control
with the *same learning rate* (Grokfast raises the effective lr, so it also gets an lr-matched control:
the control at ``lr * (1 + lambda)``). Per run it reads metrics.csv and reports the first step (and
wall-clock seconds, pro rata of the run's measured speed) at which test_inferred_id reaches ``id_target``
and test_inferred_ood reaches ``ood_target``; per intervention it aggregates over seeds.

It also settles whether the OOD phase is a matter of optimiser steps or of epochs: each row carries both
the step and the epoch of every milestone, and :func:`steps_or_epochs` compares batch sizes.

    looplens study grokking-speed --out studies/grokking-speed --base tiny-composition-paper --seeds 0,1,2 \
        --max-steps 4000 --interventions control,phi-high,weight-decay,grokfast --jobs 2

The grid is resumable: a run whose summary.json says it finished is not trained again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from looplens.data.provenance import atomic_write_text, provenance


@dataclass(frozen=True)
class Intervention:
    name: str
    overrides: tuple[str, ...]
    description: str
    control: str = "control"  # the lr-matched control it is compared against


# tiny-composition-paper + these = tiny-composition-feedback (issue 8's recipe, a modification of the paper's
# model: readout feedback and from-hops supervision; docs/research/README.md)
FAST_RECIPE = ("model.feedback=1", "recurrence.supervise=from_hops", "optim.weight_decay=1.0", "optim.atomic_share=0.4",
               "optim.schedule=cosine", "optim.min_lr_ratio=0.1")
# tiny-composition-paper + these = tiny-composition (issue 15's recipe for the paper's own model: recipe values
# only, no architecture or loss change; docs/research/paper-model/README.md)
PAPER_MODEL_RECIPE = ("data.world=random-tail", "optim.weight_decay=1.0", "optim.atomic_share=0.4", "optim.schedule=cosine",
                      "optim.decay_steps=9900", "optim.min_lr_ratio=0.1", "optim.label_smoothing=0.1",
                      "optim.betas=0.9,0.98")


def interventions_for(base_lr: float, base_phi: float, base_batch: int = 256, base_depth: int = 4,
                      max_phi: float | None = None) -> dict[str, Intervention]:
    """The ladder, cheapest first. ``base_depth`` is the base model's blocks x iterations (the vanilla
    baseline's layer count, iso-FLOP); ``max_phi`` caps phi-high at what the world allows."""
    phi_high = min(2.0 * base_phi, max_phi) if max_phi else 2.0 * base_phi
    grokfast_lambda = 2.0
    ladder = [
        Intervention("control", (), "the base preset unchanged"),
        Intervention("vanilla", (f"model.n_blocks={base_depth}", "model.n_iterations=1"),
                     f"iso-FLOP vanilla baseline: {base_depth} distinct blocks run once"),
        Intervention("supervise-from-hops", ("recurrence.supervise=from_hops",),
                     "answer loss after every iteration t >= the query's hop count (one hop per iteration)"),
        Intervention("feedback", ("model.feedback=1",),
                     "readout feedback: the model's soft answer, re-embedded, is added to the state before each iteration"),
        Intervention("feedback-from-hops", ("model.feedback=1", "recurrence.supervise=from_hops"),
                     "readout feedback and the from-hops answer loss together"),
        Intervention("weight-decay-1-feedback-from-hops",
                     ("optim.weight_decay=1.0", "model.feedback=1", "recurrence.supervise=from_hops"),
                     "weight decay 1.0 + readout feedback + from-hops loss"),
        Intervention("fast-recipe", FAST_RECIPE,
                     "issue 8's recipe (the tiny-composition-feedback preset, a modification): wd 1, feedback, "
                     "from-hops, 40% atomic, cosine lr"),
        Intervention("paper-model-recipe", PAPER_MODEL_RECIPE,
                     "issue 15's recipe (the tiny-composition preset, the paper's model): random-tail world, wd 1, "
                     "40% atomic, cosine lr over 10k steps, label smoothing 0.1, Adam beta2 0.98"),
        Intervention("batch-4x", (f"optim.batch_size={4 * base_batch}",),
                     f"batch {base_batch} -> {4 * base_batch}, same lr: 4x the epochs per step (steps or epochs?)"),
        Intervention("lr-half", (f"optim.lr={base_lr / 2:g}",), f"lr {base_lr:g} -> {base_lr / 2:g}"),
        Intervention("phi-high", (f"data.phi={phi_high:g}",), f"inferred/atomic ratio {base_phi:g} -> {phi_high:g} (Wang et al.: ID speed tracks phi)"),
        Intervention("atomic-share-0.5", ("optim.atomic_share=0.5",), "half of each batch atomic facts"),
        Intervention("weight-decay", ("optim.weight_decay=0.1",), "weight decay 0.1 (the paper's code)"),
        Intervention("weight-decay-1", ("optim.weight_decay=1.0",), "weight decay 1.0"),
        Intervention("code-regularisers", ("optim.label_smoothing=0.1", "model.dropout=0.1", "optim.weight_decay=0.1"),
                     "label smoothing 0.1 + dropout 0.1 + wd 0.1, as the paper's code"),
        Intervention("grokfast", ("optim.grokfast_alpha=0.98", f"optim.grokfast_lambda={grokfast_lambda:g}"),
                     "Grokfast EMA gradient filter (alpha 0.98, lambda 2)", control="control-lr-matched"),
        Intervention("control-lr-matched", (f"optim.lr={base_lr * (1 + grokfast_lambda):g}",),
                     f"control at lr x (1 + lambda) = {base_lr * (1 + grokfast_lambda):g}: Grokfast's effective lr"),
        Intervention("orthograd", ("optim.orthograd=true",), "gradients orthogonal to each weight (Prieto et al. 2025)"),
        Intervention("stablemax", ("optim.loss=stablemax",), "StableMax cross-entropy"),
        Intervention("nope", ("model.positional=none",), "no positional embedding (position-invariant lookups)"),
        Intervention("zero-init", ("model.zero_init_out=true",), "attention/MLP output projections start at zero"),
        Intervention("injection", ("model.input_injection=add",), "re-inject the embedded input every iteration"),
        Intervention("dynamic-r", ("recurrence.mode=poisson", "recurrence.mean=4", "recurrence.min=2", "recurrence.max=8"),
                     "dynamic recurrence clip(Poisson(4), 2, 8)"),
    ]
    return {i.name: i for i in ladder}


def first_reach(metrics: pd.DataFrame, split: str, target: float, iterations: int) -> tuple[float, float]:
    """(step, epoch) of the first evaluation where ``split`` accuracy >= target; NaNs when never."""
    rows = metrics[(metrics["split"] == split) & (metrics["iterations"] == iterations)]
    if "hops" in rows and rows["hops"].notna().any():
        rows = rows.groupby(["step", "epoch"], as_index=False).apply(
            lambda g: pd.Series({"accuracy": (g["accuracy"] * g["n"]).sum() / max(g["n"].sum(), 1)}), include_groups=False
        )
    hit = rows[rows["accuracy"] >= target].sort_values("step")
    if hit.empty:
        return math.nan, math.nan
    return float(hit["step"].iloc[0]), float(hit["epoch"].iloc[0])


def _ladder(base_cfg) -> dict[str, Intervention]:
    return interventions_for(base_cfg.optim.lr, base_cfg.data.phi, base_cfg.optim.batch_size,
                             base_cfg.model.n_blocks * base_cfg.train_iterations)


def plan_grid(out: str | Path, *, base: str = "tiny-composition-paper", interventions: Sequence[str] | None = None,
              seeds: Sequence[int] = (0,), max_steps: int | None = None, time_budget_minutes: float | None = None,
              extra_overrides: Sequence[str] = ()) -> list[tuple]:
    """The grid :func:`run_grid` trains: (intervention, seed, run_dir, config, overrides) per run, every
    intervention's control included."""
    from looplens.models.train import preset

    base_cfg = preset(base)
    ladder = _ladder(base_cfg)
    names = list(interventions or ladder)
    unknown = [n for n in names if n not in ladder]
    if unknown:
        raise ValueError(f"unknown intervention(s) {unknown}; known: {', '.join(ladder)}")
    for name in list(names):  # every intervention needs its control in the grid
        if ladder[name].control not in names:
            names.append(ladder[name].control)
    grid = []
    for name in names:
        for seed in seeds:
            overrides = [*extra_overrides, *ladder[name].overrides, f"run.seed={seed}"]
            if max_steps is not None:
                overrides.append(f"run.max_steps={max_steps}")
            if time_budget_minutes is not None:
                overrides.append(f"run.time_budget_minutes={time_budget_minutes}")
            grid.append((name, seed, Path(out) / "runs" / f"{name}-s{seed}", base_cfg.with_overrides(overrides),
                         overrides))
    return grid


def run_grid(
    out: str | Path,
    *,
    base: str = "tiny-composition-paper",
    interventions: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    max_steps: int | None = None,
    time_budget_minutes: float | None = None,
    extra_overrides: Sequence[str] = (),
    id_target: float = 0.9,
    ood_target: float = 0.5,
    jobs: int = 1,
    progress: bool = True,
    launcher=None,
    log=None,
) -> pd.DataFrame:
    """Train (or reuse) every (intervention, seed) run under ``out/runs`` and return the per-run table.

    ``jobs`` > 1 trains that many runs at once, each in its own process (spawned; on CPU give each one
    thread with ``extra_overrides=["run.threads=1"]``; on a GPU the runs share the device). Progress bars
    are off for parallel runs. ``extra_overrides`` apply to every run before the intervention's own.
    ``launcher`` (analyses.launch, e.g. Ray) replaces the local ``jobs`` processes; ``log`` gets its
    per-run lines and summary.

    Columns: intervention, control, seed, run, steps, epochs, wall_seconds, steps_per_second,
    steps_to_id, epochs_to_id, seconds_to_id, steps_to_ood, epochs_to_ood, seconds_to_ood,
    final_id, final_ood, final_first_ood, final_second_ood, final_train, final_ood_atomic, overrides.
    """
    from looplens.analyses.launch import LocalLauncher
    from looplens.models.train import load_run, preset

    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    launcher = launcher or LocalLauncher(jobs=jobs)
    grid = plan_grid(out, base=base, interventions=interventions, seeds=seeds, max_steps=max_steps,
                     time_budget_minutes=time_budget_minutes, extra_overrides=extra_overrides)
    ladder = _ladder(preset(base))
    out = Path(out)
    # finished runs are skipped, half-finished ones resume (analyses.launch.train_run)
    launcher.run([launcher.job(run_dir.name, run_dir, cfg) for _, _, run_dir, cfg, _ in grid], log=log,
                 progress=progress)
    rows = [_row(load_run(run_dir), name, ladder[name], seed, overrides, id_target, ood_target)
            for name, seed, run_dir, _, overrides in grid]
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "runs.csv", table.to_csv(index=False))
    return table


def _row(run, name: str, intervention: Intervention, seed: int, overrides: list[str], id_target: float,
         ood_target: float) -> dict:
    metrics = run.metrics
    summary = run.summary
    T = run.config.train_iterations
    steps = int(summary.get("final_step", metrics["step"].max()))
    wall = float(summary.get("wall_seconds", math.nan))
    speed = steps / wall if wall and wall > 0 else math.nan
    s_id, e_id = first_reach(metrics, "test_inferred_id", id_target, T)
    s_ood, e_ood = first_reach(metrics, "test_inferred_ood", ood_target, T)
    final = summary.get("final_accuracy", {})
    return {
        "intervention": name, "control": intervention.control, "seed": seed, "run": str(run.path),
        "steps": steps, "epochs": float(summary.get("epoch", math.nan)), "wall_seconds": wall, "steps_per_second": speed,
        "steps_to_id": s_id, "epochs_to_id": e_id, "seconds_to_id": s_id / speed if speed else math.nan,
        "steps_to_ood": s_ood, "epochs_to_ood": e_ood, "seconds_to_ood": s_ood / speed if speed else math.nan,
        "final_id": final.get("test_inferred_id"), "final_ood": final.get("test_inferred_ood"),
        "final_first_ood": final.get("test_inferred_first_ood"), "final_second_ood": final.get("test_inferred_second_ood"),
        "final_train": final.get("train_inferred"), "final_ood_atomic": final.get("ood_atomic"),
        "overrides": " ".join(overrides),
    }


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per intervention over seeds: runs, medians of steps/seconds to each target (NaN if any seed never
    reached it), how many seeds reached it, mean final accuracies, and the speed-up of steps-to-ID against
    the intervention's control (control median / intervention median; > 1 means faster)."""
    def med(s: pd.Series) -> float:
        return float(s.median()) if s.notna().all() else math.nan

    agg = table.groupby(["intervention", "control"], sort=False).agg(
        runs=("seed", "count"),
        id_reached=("steps_to_id", lambda s: int(s.notna().sum())),
        steps_to_id=("steps_to_id", med), seconds_to_id=("seconds_to_id", med), epochs_to_id=("epochs_to_id", med),
        ood_reached=("steps_to_ood", lambda s: int(s.notna().sum())),
        steps_to_ood=("steps_to_ood", med), seconds_to_ood=("seconds_to_ood", med),
        final_id=("final_id", "mean"), final_ood=("final_ood", "mean"), final_first_ood=("final_first_ood", "mean"),
        final_second_ood=("final_second_ood", "mean"), final_ood_atomic=("final_ood_atomic", "mean"),
    ).reset_index()
    by_name = agg.set_index("intervention")
    agg["id_speedup_vs_control"] = [
        by_name.loc[c, "steps_to_id"] / s if c in by_name.index and s and not math.isnan(s) else math.nan
        for c, s in zip(agg["control"], agg["steps_to_id"])
    ]
    return agg


def steps_or_epochs(table: pd.DataFrame, a: str = "control", b: str = "batch-4x") -> pd.DataFrame:
    """Is a milestone a matter of optimiser steps or of epochs? Compares two interventions that differ in
    batch size only (default: the control and ``batch-4x``), per milestone (ID, OOD): the median steps and
    epochs to reach it in each, and their ratios b / a. A steps ratio near 1 means the milestone is a
    matter of steps (more data per step does not help); an epochs ratio near 1 means it is a matter of
    epochs (a 4x batch gets there in ~1/4 of the steps). Empty when either intervention is missing."""
    have = set(table["intervention"])
    if a not in have or b not in have:
        return pd.DataFrame(columns=["milestone", f"steps_{a}", f"steps_{b}", "steps_ratio", f"epochs_{a}",
                                     f"epochs_{b}", "epochs_ratio", "verdict"])

    def med(name: str, col: str) -> float:
        v = table.loc[table["intervention"] == name, col]
        return float(v.median()) if len(v) and v.notna().all() else math.nan

    rows = []
    for milestone in ("id", "ood"):
        sa, sb = med(a, f"steps_to_{milestone}"), med(b, f"steps_to_{milestone}")
        ea, eb = med(a, f"epochs_to_{milestone}"), med(b, f"epochs_to_{milestone}")
        steps_ratio, epochs_ratio = sb / sa, eb / ea
        if math.isnan(steps_ratio) or math.isnan(epochs_ratio):
            verdict = "not reached in both"
        else:  # which of the two quantities stayed closer to constant (log distance from 1)
            verdict = "steps" if abs(math.log(steps_ratio)) < abs(math.log(epochs_ratio)) else "epochs"
        rows.append({"milestone": milestone, f"steps_{a}": sa, f"steps_{b}": sb, "steps_ratio": steps_ratio,
                     f"epochs_{a}": ea, f"epochs_{b}": eb, "epochs_ratio": epochs_ratio, "verdict": verdict})
    return pd.DataFrame(rows)


def figure(out: str | Path, table: pd.DataFrame, split: str = "test_inferred_id", x: str = "step"):
    """Accuracy of ``split`` over training (``x`` "step" or "epoch"), one line per run, coloured by
    intervention."""
    import plotly.express as px
    from looplens.models.train import load_run

    if x not in ("step", "epoch"):
        raise ValueError(f"x must be 'step' or 'epoch', got {x!r}")
    frames = []
    for row in table.itertuples():
        run = load_run(row.run)
        m = run.metrics
        m = m[(m["split"] == split) & (m["iterations"] == run.config.train_iterations)]
        frames.append(m.assign(intervention=row.intervention, seed=row.seed)[["step", "epoch", "accuracy", "intervention", "seed"]])
    data = pd.concat(frames) if frames else pd.DataFrame(columns=["step", "epoch", "accuracy", "intervention", "seed"])
    fig = px.line(data, x=x, y="accuracy", color="intervention", line_group="seed",
                  title=f"{split} accuracy over training, per intervention")
    fig.update_layout(xaxis_title="optimizer step" if x == "step" else "epoch", yaxis_title=f"{split} accuracy",
                      yaxis_range=[0, 1])
    return fig


FIGURES = (("test_inferred_id", "step"), ("test_inferred_ood", "step"), ("test_inferred_first_ood", "step"),
           ("test_inferred_second_ood", "step"), ("test_inferred_ood", "epoch"))


def write_report(out: str | Path, table: pd.DataFrame, command: str, png: bool = False) -> Path:
    """summary.csv, runs.csv, steps_or_epochs.csv, summary.md (tables + the exact command), and one HTML
    page per figure (offline: they share one plotly.min.js beside them). ``png`` also screenshots each
    page with headless Chromium (see :func:`analyses.report.export_png`)."""
    from plotly.offline import get_plotlyjs

    out = Path(out)
    summary = summarize(table)
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    atomic_write_text(out / "plotly.min.js", get_plotlyjs())
    pages = []
    for split, x in FIGURES:
        name = split if x == "step" else f"{split}_by_{x}"
        html = figure(out, table, split, x=x).to_html(include_plotlyjs="directory", full_html=True)
        atomic_write_text(out / f"{name}.html", html)
        pages.append(out / f"{name}.html")
    if png:
        from looplens.analyses.report import export_png

        export_png(pages)
    se = steps_or_epochs(table)
    atomic_write_text(out / "steps_or_epochs.csv", se.to_csv(index=False))
    cols = ["intervention", "control", "runs", "id_reached", "steps_to_id", "seconds_to_id", "id_speedup_vs_control",
            "ood_reached", "steps_to_ood", "final_id", "final_first_ood", "final_second_ood", "final_ood", "final_ood_atomic"]
    lines = [
        "# Grokking-speed ladder",
        "",
        f"Command: `{command}`",
        "",
        f"Provenance: `{json.dumps(provenance())}`",
        "",
        "Steps/seconds are medians over seeds (NaN when some seed never reached the target); speed-up is the",
        "control's steps-to-ID over the intervention's (> 1: faster). Seconds are pro rata of each run's speed.",
        "",
        _markdown(summary[cols]),
    ]
    if len(se):
        lines += ["", "Steps or epochs? (control vs batch-4x: same lr, 4x the examples per step; ratios are batch-4x / control)",
                  "", _markdown(se)]
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    return out / "summary.md"


def _markdown(df: pd.DataFrame) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.3g}"
        return str(v)

    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])
