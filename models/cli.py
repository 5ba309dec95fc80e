"""`looplens train` and `looplens eval`.

    looplens train (--preset NAME | --config FILE.toml) --out runs/NAME [--set section.key=value ...]
                   [--max-steps N] [--time-budget MINUTES] [--seed S] [--device cpu|cuda] [--resume]
                   [--overwrite] [--quiet]
    looplens train --list-presets
    looplens eval RUN [--checkpoint STEP] [--iterations 1:32] [--hops 2:K] [--splits a,b]
                  [--halting kl+entropy --eps 0.01 --entropy 3.0 --max-iterations 32] [--out FILE.csv]

Heavy imports (torch, pandas) happen inside the handlers so `looplens --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

TRAIN_EPILOG = """\
examples:
  looplens train --list-presets
  looplens train --preset tiny-composition --out runs/tiny-comp
  looplens train --preset tiny-depth --out runs/tiny-depth --set recurrence.mode=poisson --seed 1
  looplens train --out runs/tiny-comp --resume --max-steps 20000
  looplens train --config my.toml --out runs/mine --device cuda --time-budget 60
--set takes any config key (section.key=value; sections data, model, optim, recurrence, curriculum,
eval, run); see docs/training.md."""

EVAL_EPILOG = """\
examples:
  looplens eval runs/tiny-depth --iterations 1:16 --hops 2:12
  looplens eval runs/tiny-depth --halting kl+entropy --eps 0.01 --entropy 3.0 --max-iterations 32
  looplens eval runs/tiny-comp --checkpoint 2048 --out comp-2048.csv"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train a looped transformer (presets, TOML configs, resumable run directories)",
        description="Train a looped (or, at one iteration, vanilla) transformer on a knowledge-graph task and "
        "write a run directory: config.json, metrics.csv, summary.json, checkpoints/.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", metavar="NAME", help="a named preset (see --list-presets)")
    src.add_argument("--config", metavar="FILE", help="a TOML config file ([data], [model], [optim], ...)")
    src.add_argument("--list-presets", action="store_true", help="print the presets, one line each, and exit")
    p.add_argument("--out", metavar="DIR", help="run directory to create (or continue with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set optim.lr=3e-4")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps (run.max_steps)")
    p.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="stop after this much wall-clock time (run.time_budget_minutes)")
    p.add_argument("--seed", type=int, metavar="S", help="training seed: init, batches, recurrence, dropout (run.seed)")
    p.add_argument("--seeds", metavar="A-B", help="train one run per seed (A-B inclusive, or a comma list) as one "
                   "batched model in this process, writing the run directory --out/seed-<s> for each")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--resume", action="store_true", help="continue --out from its last saved state")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="no progress bar; print only the final one-line result")
    p.set_defaults(func=train_command)

    e = subparsers.add_parser(
        "eval", help="evaluate a run's checkpoint over hops x iterations, or with adaptive halting",
        description="Evaluate one checkpoint of a run on its dataset's evaluation splits; write a tidy CSV "
        "(default: RUN/eval/step_<N>[...].csv) and print accuracy tables.",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("run", metavar="RUN", help="run directory")
    e.add_argument("--checkpoint", metavar="STEP", help="step number, 'final' or 'latest' (default: final, "
                   "or latest for an unfinished run)")
    e.add_argument("--iterations", metavar="A:B", help="fixed iteration counts: N, A:B (inclusive) or a comma "
                   "list (default: the run's evaluation counts; with --halting, 1:--max-iterations)")
    e.add_argument("--hops", metavar="A:B", help="hop counts to evaluate (default: all)")
    e.add_argument("--splits", metavar="A,B", help="comma list of splits (default: every evaluation split)")
    e.add_argument("--halting", choices=("kl", "entropy", "kl+entropy", "latent"),
                   help="also evaluate adaptive halting with this rule")
    e.add_argument("--eps", type=float, default=0.01, help="KL threshold (default: %(default)s)")
    e.add_argument("--entropy", type=float, default=3.0, help="entropy threshold in nats (default: %(default)s)")
    e.add_argument("--max-iterations", type=int, default=32, help="halting: iteration cap (default: %(default)s)")
    e.add_argument("--batch-size", type=int, default=4096, help="evaluation batch size (default: %(default)s)")
    e.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="default: %(default)s")
    e.add_argument("--out", metavar="FILE", help="CSV to write (default: RUN/eval/step_<N>[_halting-RULE].csv)")
    e.add_argument("--quiet", action="store_true", help="do not print the tables")
    e.set_defaults(func=eval_command)


def _config_from_args(args: argparse.Namespace):
    from looplens.models.train import TrainConfig, preset

    if args.preset:
        cfg = preset(args.preset)
    elif args.config:
        cfg = TrainConfig.from_toml(args.config)
    else:
        return None
    return cfg.with_overrides(_flag_overrides(args, args.overrides))


def _flag_overrides(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    out = list(overrides)
    if args.max_steps is not None:
        out.append(f"run.max_steps={args.max_steps}")
    if args.time_budget is not None:
        out.append(f"run.time_budget_minutes={args.time_budget}")
    if args.seed is not None:
        out.append(f"run.seed={args.seed}")
    if args.device is not None:
        out.append(f"run.device={args.device}")
    return out


def train_command(args: argparse.Namespace) -> int:
    from looplens.models.train import load_run, preset_summaries, train

    if args.list_presets:
        summaries = preset_summaries()
        width = max(map(len, summaries))
        for name, summary in summaries.items():
            print(f"{name:<{width}}  {summary}")
        return 0
    if not args.out:
        raise ValueError("--out is required (the run directory)")
    cfg = _config_from_args(args)
    if args.seeds is not None:
        return _train_seeds(args, cfg)
    if cfg is None:
        if not args.resume:
            raise ValueError("one of --preset or --config is required (or --resume to continue --out)")
        saved = load_run(args.out).config
        cfg = saved.with_overrides(_flag_overrides(args, args.overrides))
    command = ["looplens", *sys.argv[1:]] if sys.argv and Path(sys.argv[0]).name == "looplens" else None
    result = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                   command=command)
    accs = " ".join(f"{k}={v:.3f}" for k, v in result.final.items())
    depth = f" learnable_depth={result.learnable_depth}" if result.learnable_depth is not None else ""
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone reports (docs/scale.md)
        print(f"{result.path}: step {result.step} ({result.stop_reason}){depth} {accs}")
    return 0


def _train_seeds(args: argparse.Namespace, cfg: Any) -> int:
    from looplens.models.train.ensemble import parse_seeds, train_ensemble

    if args.seed is not None or args.resume:
        raise ValueError("--seeds excludes --seed and --resume (resume one seed: --out DIR/seed-<s> --resume)")
    if cfg is None:
        raise ValueError("--seeds needs --preset or --config")
    command = ["looplens", *sys.argv[1:]] if sys.argv and Path(sys.argv[0]).name == "looplens" else None
    results = train_ensemble(cfg, parse_seeds(args.seeds), args.out, overwrite=args.overwrite,
                             progress=not args.quiet, command=command)
    for result in results:
        accs = " ".join(f"{k}={v:.3f}" for k, v in result.final.items())
        print(f"{result.path}: step {result.step} ({result.stop_reason}) {accs}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from looplens.models.train import evaluate, format_tables, load_run
    from looplens.models.train.evaluate_run import default_output, write_csv
    from looplens.models.train.evaluation import parse_range

    run = load_run(args.run)
    iterations = parse_range(args.iterations, "--iterations") if args.iterations else None
    hops = parse_range(args.hops, "--hops") if args.hops else None
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    if args.max_iterations < 2:
        raise ValueError("--max-iterations must be >= 2")
    frame = evaluate(run, checkpoint=args.checkpoint, iterations=iterations, hops=hops, splits=splits,
                     halting=args.halting, eps=args.eps, entropy=args.entropy, max_iterations=args.max_iterations,
                     batch_size=args.batch_size, device=args.device)
    step = int(frame["step"].iloc[0])
    out = Path(args.out) if args.out else default_output(run, step, args.halting)
    write_csv(frame, out)
    if not args.quiet:
        print(f"{run.path} step {step}")
        print(format_tables(frame), end="")
    print(f"wrote {out}")
    return 0
