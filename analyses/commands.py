"""`looplens study`, `looplens reproduce` and `looplens report`.

    looplens study NAME --run RUN [--run RUN ...] --out DIR [--n-queries N] [--max-iterations N] ...
    looplens study --list
    looplens reproduce --preset smoke|tiny|paper --out DIR [--set section.key=value ...] [--dry-run]
                       [--overwrite] [--quiet]
    looplens report RUN [RUN ...] [--out DIR] [--studies a,b] [--png]

Heavy imports (torch, pandas, plotly) happen inside the handlers so `looplens --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

STUDY_EPILOG = """\
examples:
  looplens study --list
  looplens study systematic --run runs/comp-r4 --run runs/comp-vanilla --out studies/systematic
  looplens study depth --run runs/depth-fixed --run runs/depth-dynamic --out studies/depth --max-iterations 32
Writes DIR/result.json (headline numbers, notes), DIR/tables/*.csv, DIR/figures/*.json and *.html."""

REPRODUCE_EPILOG = """\
examples:
  looplens reproduce --preset smoke --out runs/repro-smoke      # CI plumbing check, ~1-2 minutes on CPU
  looplens reproduce --preset tiny --out runs/repro             # ~30 minutes on 2 CPU cores
  looplens reproduce --preset paper --out runs/paper --set run.time_budget_minutes=600   # GPU
  looplens reproduce --preset tiny --out runs/repro --dry-run   # list the runs and stages
  looplens reproduce --preset paper --out /shared/paper --launcher ray --address auto --device cuda  # docs/scale.md
Rerun the same command after an interruption: finished stages are skipped, a half-finished training resumes.
Report: OUT/report/index.html (offline), OUT/report/summary.md (claims, verdicts, rules)."""

REPORT_EPILOG = """\
examples:
  looplens report runs/comp-r4                        # -> runs/comp-r4/report/
  looplens report runs/comp-r4 runs/comp-vanilla --out reports/comp
  looplens report analyses/shipped_run --out /tmp/shipped-report --png    # a folder of runs
Runs every study that applies to the given runs (or --studies), then writes index.html, summary.md,
figures/, tables/ and the study results (studies/NAME/). A RUN that is a folder of run directories
stands for every run inside it."""


def _add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("study options")
    g.add_argument("--n-queries", type=int, default=None, metavar="N",
                   help="queries sampled per split / hop count for model-level analyses (default 256)")
    g.add_argument("--max-iterations", type=int, default=None, metavar="N",
                   help="largest inference iteration count (depth heatmap, overthinking, halting cap; default 32)")
    g.add_argument("--patch-pairs", type=int, default=None, metavar="N", help="activation-patching pairs (default 64)")
    g.add_argument("--fixed-point-iterations", type=int, default=None, metavar="N",
                   help="iterations for the fixed-point curves (default 32)")
    g.add_argument("--depth-threshold", type=float, default=None, metavar="A",
                   help="accuracy at which a hop count counts as answered (depth study; default 0.9)")
    g.add_argument("--halting-eps", type=float, default=None, metavar="EPS", help="KL threshold (default 0.01)")
    g.add_argument("--halting-entropy", type=float, default=None, metavar="H",
                   help="entropy threshold in nats (default 3.0)")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="sampling seed (default 0)")
    g.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None, help="default: cpu")


def _options(args: argparse.Namespace, base: Any = None) -> Any:
    from looplens.analyses.studies.base import StudyOptions

    base = base or StudyOptions()
    keys = ("n_queries", "max_iterations", "patch_pairs", "fixed_point_iterations", "depth_threshold", "halting_eps",
            "halting_entropy", "seed", "device")
    changes = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    return base.replace(progress=not getattr(args, "quiet", False), **changes)


def register(subparsers: Any) -> None:
    s = subparsers.add_parser(
        "study", help="run one scripted study (tables + figures) on one or more run directories",
        description="Run one study of the paper's claims on trained run directories and write its tables, "
        "figures and headline numbers.", epilog=STUDY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("name", nargs="?", metavar="NAME", help="study name (see --list)")
    s.add_argument("--list", action="store_true", help="print the studies, one line each, and exit")
    s.add_argument("--run", dest="runs", action="append", default=[], metavar="RUN", help="run directory (repeatable)")
    s.add_argument("--out", metavar="DIR", help="directory to write the study result to")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s.add_argument("--quiet", action="store_true", help="no progress bars, no notes; one line at the end")
    _add_options(s)
    g = s.add_argument_group("grokking-speed options (the study that trains its own grid of runs)")
    g.add_argument("--base", default="tiny-composition-paper", metavar="PRESET", help="trainer preset the ladder starts from (default: tiny-composition-paper, the paper's recipe)")
    g.add_argument("--interventions", metavar="A,B", help="comma list (default: the whole ladder)")
    g.add_argument("--seeds", default="0", metavar="S,S", help="comma list of training seeds (default 0)")
    g.add_argument("--max-steps", type=int, default=None, metavar="N", help="steps per run (default: the preset's)")
    g.add_argument("--time-budget", type=float, default=None, metavar="MIN", help="minutes per run")
    g.add_argument("--png", action="store_true", help="also write PNG figures (needs headless Chromium)")
    g.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs trained at once, one process each (CPU: one thread each; GPU: sharing the device)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="trainer override applied to every run before the intervention's own (repeatable)")
    g.add_argument("--dry-run", action="store_true", help="print the grid's runs and expected GPU time, train nothing")
    from looplens.analyses.launch import add_launcher_arguments  # stdlib only: cheap

    add_launcher_arguments(s.add_argument_group("launcher (where the grid's runs train; docs/scale.md)"))
    s.set_defaults(func=study_command)

    r = subparsers.add_parser(
        "reproduce", help="train the runs, run every study, write the report (resumable)",
        description="Reproduce the paper's claims: train the runs a preset plans (under OUT/runs), run the studies "
        "(OUT/studies), write OUT/report/index.html and OUT/report/summary.md. Resumable: rerun to continue.",
        epilog=REPRODUCE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--preset", required=True, choices=("smoke", "tiny", "paper"), help="which plan")
    r.add_argument("--out", required=True, metavar="DIR", help="output directory (created, or continued)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="trainer override applied to every run (repeatable), e.g. run.time_budget_minutes=600")
    r.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None,
                   help="device for training (run.device) and the studies (default: the plan's)")
    r.add_argument("--overwrite", action="store_true", help="delete an existing reproduce --out and start over")
    r.add_argument("--dry-run", action="store_true",
                   help="print the runs, stages and each run's expected GPU-hours (docs/scale.md); do nothing")
    r.add_argument("--quiet", action="store_true", help="no progress bars or stage lines; one line at the end")
    from looplens.analyses.launch import add_launcher_arguments  # stdlib only: cheap

    add_launcher_arguments(r.add_argument_group("launcher (where the runs train; docs/scale.md)"), jobs=True)
    r.set_defaults(func=reproduce_command)

    p = subparsers.add_parser(
        "report", help="run the applicable studies on run directories and write an HTML report + summary",
        description="Build a report for any run directories (a shipped run included): every applicable study, "
        "then index.html (offline), summary.md (claims and verdicts), figures/ and tables/.",
        epilog=REPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories, or folders of run directories")
    p.add_argument("--out", metavar="DIR", help="report directory (default: RUN/report for a single run)")
    p.add_argument("--studies", metavar="A,B", help="comma list of studies (default: every applicable one)")
    p.add_argument("--png", action="store_true", help="also write figures/*.png (needs headless Chromium)")
    p.add_argument("--quiet", action="store_true", help="no progress; one line at the end")
    _add_options(p)
    p.set_defaults(func=report_command)


GROKKING_SPEED = "grokking-speed"


def grokking_speed_command(args: argparse.Namespace) -> int:
    """`looplens study grokking-speed --out DIR [--base PRESET] [--interventions A,B] [--seeds 0,1,2] ...`"""
    import shlex
    import sys

    from looplens.analyses import grokking_speed

    if not args.out:
        raise ValueError("--out DIR is required")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of integers, got {args.seeds!r}") from None
    names = [x.strip() for x in args.interventions.split(",")] if args.interventions else None
    extra = list(args.overrides)
    if args.device is not None:
        extra.append(f"run.device={args.device}")
    if args.jobs > 1:  # one CPU thread per run process (ignored for CUDA training)
        extra.append("run.threads=1")
    from looplens.analyses.launch import launcher_from_args

    launcher = launcher_from_args(args, check=not args.dry_run)
    if args.dry_run:
        grid = grokking_speed.plan_grid(args.out, base=args.base, interventions=names, seeds=seeds,
                                        max_steps=args.max_steps, time_budget_minutes=args.time_budget,
                                        extra_overrides=extra)
        jobs = [launcher.job(run_dir.name, run_dir, cfg) for _, _, run_dir, cfg, _ in grid]
        for (_, _, run_dir, _, overrides), job in zip(grid, jobs):
            print(f"  run {run_dir.name}: looplens train --preset {args.base} "
                  + " ".join(f"--set {o}" for o in overrides) + f"   # {job.cpus:g} CPU, {job.gpus:g} GPU")
        _print_gpu_hours(jobs)
        return 0
    log = None if args.quiet else (lambda line: print(line, flush=True))
    table = grokking_speed.run_grid(args.out, base=args.base, interventions=names, seeds=seeds,
                                    max_steps=args.max_steps, time_budget_minutes=args.time_budget,
                                    extra_overrides=extra, jobs=args.jobs, progress=not args.quiet,
                                    launcher=launcher, log=log)
    summary = grokking_speed.write_report(args.out, table, "looplens " + shlex.join(sys.argv[1:]), png=args.png)
    print(f"{summary}: {len(table)} runs")
    return 0


def study_command(args: argparse.Namespace) -> int:
    from looplens.analyses.studies import STUDIES, SUMMARIES

    if args.list:
        width = max(map(len, [*STUDIES, GROKKING_SPEED]))
        for name in STUDIES:
            print(f"{name:<{width}}  {SUMMARIES[name]}")
        print(f"{GROKKING_SPEED:<{width}}  trains a grid of short runs: which intervention makes composition arrive sooner")
        return 0
    if not args.name:
        raise ValueError("a study NAME is required (see looplens study --list)")
    if args.name == GROKKING_SPEED:
        return grokking_speed_command(args)
    if args.name not in STUDIES:
        raise ValueError(f"unknown study {args.name!r}; studies: {', '.join(STUDIES)}")
    if not args.runs:
        raise ValueError("at least one --run RUN is required")
    if not args.out:
        raise ValueError("--out DIR is required")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")
    from looplens.analyses.studies import run_study

    result = run_study(args.name, args.runs, _options(args))
    result.save(out, overwrite=True)
    if not args.quiet:
        for note in result.notes:
            print(f"  {note}")
    print(f"{out}: study {args.name} on {', '.join(result.runs)}: {len(result.tables)} tables, "
          f"{len(result.figures)} figures")
    return 0


def reproduce_command(args: argparse.Namespace) -> int:
    from looplens.analyses.reproduce import ReproduceInterrupted, plan_for, reproduce

    plan = plan_for(args.preset)
    extra = list(args.overrides)
    options = {}
    if args.device:
        extra.append(f"run.device={args.device}")
        options["device"] = args.device
    if extra or options:
        plan = plan.with_extra(extra, options)
    for spec in plan.runs:  # fail early on a bad --set or a missing trainer preset
        spec.config(plan.extra_overrides)
    from looplens.analyses.launch import launcher_from_args

    launcher = launcher_from_args(args, check=not args.dry_run, default_jobs=plan.jobs)
    if args.dry_run:
        print(f"reproduce preset {plan.name}: {plan.description}")
        print(f"budget: {plan.budget}")
        for spec in plan.runs:
            sets = " ".join(f"--set {o}" for o in (*spec.overrides, *plan.extra_overrides))
            print(f"  run {spec.name:<16} looplens train --preset {spec.preset} {sets}".rstrip() + f"   # {spec.role}")
        for study, runs in plan.studies:
            print(f"  study {study:<14} on {', '.join(runs)}")
        print(f"  stages: {len(plan.stages())} ({', '.join(plan.stages())})")
        _print_gpu_hours([launcher.job(s.name, Path(args.out) / "runs" / s.name, s.config(plan.extra_overrides))
                          for s in plan.runs])
        return 0
    try:
        result = reproduce(plan, args.out, progress=not args.quiet, overwrite=args.overwrite,
                           log=None if args.quiet else lambda line: print(line, flush=True), launcher=launcher)
    except ReproduceInterrupted as err:
        print(f"looplens reproduce: {err}", file=sys.stderr)
        return 3
    verdicts = ", ".join(f"{n}: {v}" for n, v in result.verdicts.items())
    print(f"{result.report} ({len(result.executed)} stages run, {len(result.skipped)} skipped, "
          f"{result.seconds:.0f} s); claims {verdicts}; summary {result.summary}")
    return 0


def _print_gpu_hours(jobs: list) -> None:
    """The dry run's GPU-time plan: per run and in total, at the measured throughput (analyses.launch)."""
    from looplens.analyses.launch import format_plan, load_throughput, plan_table

    try:
        throughput = load_throughput()
    except (FileNotFoundError, ValueError) as err:
        print(f"  (no GPU-time estimate: {err})")
        return
    for line in format_plan(plan_table(jobs, throughput), throughput):
        print(line)


def expand_runs(paths: list[str]) -> list[Path]:
    """Run directories from the arguments: a run directory itself, or a folder of run directories (every
    direct subdirectory with a config.json, e.g. analyses/shipped_run/)."""
    out = []
    for text in paths:
        path = Path(text)
        inside = sorted(p for p in path.iterdir() if (p / "config.json").is_file()) if path.is_dir() else []
        out.extend(inside if not (path / "config.json").exists() and inside else [path])
    return out


def report_command(args: argparse.Namespace) -> int:
    from looplens.analyses.report import report_runs

    if args.out:
        out = Path(args.out)
    elif len(args.runs) == 1:
        out = Path(args.runs[0]) / "report"
    else:
        raise ValueError("--out is required with several runs")
    if out.exists() and any(out.iterdir()) and not (out / "index.html").exists():
        raise FileExistsError(f"--out {out} exists and is not a report directory; refusing to write into it")
    studies = [s.strip() for s in args.studies.split(",") if s.strip()] if args.studies else None
    index = report_runs(expand_runs(args.runs), out, studies=studies, options=_options(args), png=args.png,
                        log=None if args.quiet else lambda line: print(line, flush=True))
    print(f"{index} (summary: {out / 'summary.md'})")
    return 0
