"""`looplens data`: generate a dataset, or import / export the GrokkedTransformer JSON format.

    looplens data --task composition --world random-tail --entities 2000 --relations 200 --seed 0 --out DIR
    looplens data import-grokked SRC --out DIR
    looplens data export-grokked DIR --out DST

Generation is the default action; import-grokked / export-grokked are optional sub-actions. Heavy
imports (numpy, torch, pandas) happen inside the handlers so `looplens --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from types import SimpleNamespace
from typing import Any

from looplens.data.config import TASKS, WORLDS, DataConfig

# the defaults, read off the fields: building a DataConfig here would import pydantic on `--help`
_D = SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(DataConfig)})
# CLI flag of each DataConfig field, so validation errors name what the user typed
FLAGS = {
    "task": "--task", "world": "--world", "n_entities": "--entities", "n_relations": "--relations",
    "out_degree": "--out-degree", "ood_fraction": "--ood-fraction", "phi": "--phi",
    "test_id_fraction": "--test-id-fraction", "eval_max": "--eval-max", "max_hops": "--max-hops",
    "per_hop_train": "--per-hop-train", "per_hop_test": "--per-hop-test", "seed": "--seed",
}
_REQUIRED = {"task": "--task", "world": "--world", "entities": "--entities", "relations": "--relations",
             "seed": "--seed", "out": "--out"}  # argparse dest -> flag

EPILOG = """\
examples:
  paper section 5 (composition, 40,000 atomic + 273,600 2-hop training facts):
    looplens data --task composition --world random-tail --entities 2000 --relations 200 --seed 0 --out datasets/comp
  paper section 6 (depth, k = 2..40 hops on a permutation world):
    looplens data --task depth --world permutation --entities 200 --relations 10 --seed 0 --out datasets/depth
  the upstream JSON format:
    looplens data export-grokked datasets/comp --out grokked/comp
    looplens data import-grokked grokked/comp --out datasets/comp-imported
see docs/data.md for the splits and files."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "data",
        help="generate a knowledge-graph dataset, or import/export the GrokkedTransformer format",
        description="Generate a k-hop knowledge-graph dataset (the default action), or convert from/to the "
        "GrokkedTransformer / Loop-Think-Generalize JSON format.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("generate (the default action)")
    g.add_argument("--task", choices=TASKS, help="composition: 2-hop ID/OOD (paper section 5); depth: k-hop "
                   "chains for k = 2..--max-hops (section 6). Required")
    g.add_argument("--world", choices=WORLDS, help="random-tail: each entity has --out-degree relations to "
                   "random tails; permutation: every relation is a bijection. Required")
    g.add_argument("--entities", type=int, metavar="N", help=f"number of entities (>= 2; paper: {_D.n_entities} "
                   "composition, 200 depth). Required")
    g.add_argument("--relations", type=int, metavar="R", help=f"number of relations (paper: {_D.n_relations} "
                   "composition, 10 depth). Required")
    g.add_argument("--out-degree", type=int, metavar="D", help=f"relations per entity, random-tail only "
                   f"(default: {_D.out_degree}; permutation worlds always use all R)")
    g.add_argument("--ood-fraction", type=float, default=_D.ood_fraction, metavar="F",
                   help="composition: share of atomic facts that are OOD, per fact (default: %(default)s)")
    g.add_argument("--phi", type=float, default=_D.phi, metavar="PHI",
                   help="composition: trained 2-hop facts = round(PHI x ID atomic facts) (default: %(default)s)")
    g.add_argument("--test-id-fraction", type=float, default=_D.test_id_fraction, metavar="F",
                   help="composition: share of trainable 2-hop facts held out as test_inferred_id "
                   "(default: %(default)s)")
    g.add_argument("--max-hops", type=int, default=_D.max_hops, metavar="K",
                   help="depth: longest chain (default: %(default)s)")
    g.add_argument("--per-hop-train", type=int, default=_D.per_hop_train, metavar="M",
                   help="depth: train chains per k (default: %(default)s)")
    g.add_argument("--per-hop-test", type=int, default=_D.per_hop_test, metavar="M",
                   help="depth: test chains per k (default: %(default)s)")
    g.add_argument("--eval-max", type=int, default=_D.eval_max, metavar="M",
                   help="cap on each evaluation split (default: %(default)s)")
    g.add_argument("--seed", type=int, metavar="S", help="random seed (>= 0). Required")
    g.add_argument("--out", metavar="DIR", help="dataset directory to create. Required")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    p.set_defaults(func=generate_command)

    actions = p.add_subparsers(dest="data_action", metavar="{import-grokked,export-grokked}",
                               title="other actions")
    imp = actions.add_parser("import-grokked", help="convert a GrokkedTransformer / Loop-Think-Generalize "
                             "data directory (train.json, test.json, vocab.json) into a looplens dataset",
                             description="Convert a GrokkedTransformer / Loop-Think-Generalize data directory "
                             "into a looplens dataset directory. The world is rebuilt from the atomic facts.")
    imp.add_argument("source", metavar="SRC", help="directory with train.json, test.json (and vocab.json)")
    imp.add_argument("--out", metavar="DIR", required=True, help="dataset directory to create (required)")
    imp.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    imp.set_defaults(func=import_command)
    exp = actions.add_parser("export-grokked", help="write a looplens dataset in the GrokkedTransformer format",
                             description="Write a looplens dataset as train.json, valid.json, test.json, "
                             "vocab.json (+ looplens.json) in the GrokkedTransformer / Loop-Think-Generalize format.")
    exp.add_argument("dataset", metavar="DIR", help="looplens dataset directory")
    exp.add_argument("--out", metavar="DST", required=True, help="directory to create (required)")
    exp.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    exp.add_argument("--diagnostics", action="store_true", help="also write our first- and second-hop-OOD splits "
                     "to test.json (default: exactly the paper's types)")
    exp.set_defaults(func=export_command)


def config_from_args(args: argparse.Namespace) -> DataConfig:
    """The DataConfig of a generate command line; errors name the flag."""
    for dest, flag in _REQUIRED.items():
        if getattr(args, dest, None) is None:
            raise ValueError(f"{flag} is required to generate a dataset (or use import-grokked / export-grokked)")
    if args.world == "permutation" and args.out_degree not in (None, args.relations):
        raise ValueError(f"--out-degree applies to random-tail worlds only; a permutation world uses all "
                         f"{args.relations} relations (drop --out-degree)")
    fields = {
        "task": args.task, "world": args.world, "n_entities": args.entities, "n_relations": args.relations,
        "ood_fraction": args.ood_fraction, "phi": args.phi, "test_id_fraction": args.test_id_fraction,
        "eval_max": args.eval_max, "max_hops": args.max_hops, "per_hop_train": args.per_hop_train,
        "per_hop_test": args.per_hop_test, "seed": args.seed,
    }
    if args.out_degree is not None:
        fields["out_degree"] = args.out_degree
    try:
        return DataConfig(**fields)
    except ValueError as err:
        message = str(err)
        for name, flag in FLAGS.items():
            message = message.replace(f"DataConfig.{name} ", f"{flag} ")
        raise ValueError(message) from None


def generate_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from looplens.data.storage import build_dataset, load_dataset

    start = time.perf_counter()
    path = build_dataset(cfg, args.out, overwrite=args.overwrite)
    _summary(load_dataset(path), f"generated in {time.perf_counter() - start:.1f} s")
    return 0


def import_command(args: argparse.Namespace) -> int:
    from looplens.data.grokked import import_grokked
    from looplens.data.storage import load_dataset

    path = import_grokked(args.source, args.out, overwrite=args.overwrite)
    _summary(load_dataset(path), f"imported from {args.source}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from looplens.data.grokked import export_grokked

    dst = export_grokked(args.dataset, args.out, overwrite=args.overwrite, diagnostics=args.diagnostics)
    sizes = {name: len(json.loads((Path(dst) / name).read_text())) for name in
             ("train.json", "valid.json", "test.json", "vocab.json")}
    print(f"wrote {dst}: " + ", ".join(f"{name} {n:,}" for name, n in sizes.items()))
    return 0


def _summary(ds: Any, how: str) -> None:
    cfg = ds.config
    print(f"wrote {ds.path} ({cfg.task}, {ds.world.kind} world, {cfg.n_entities} entities x {cfg.n_relations} "
          f"relations, {ds.world.n_facts:,} atomic facts, seed {cfg.seed}; {how})")
    for name in ds.split_names:
        info = ds.meta["splits"][name]
        hops = ", ".join(f"{h}-hop {c:,}" for h, c in sorted(info["hops"].items(), key=lambda kv: int(kv[0])))
        if len(info["hops"]) > 4:
            keys = sorted(info["hops"], key=int)
            hops = f"{keys[0]}..{keys[-1]} hops"
        print(f"  {name:<26}{info['count']:>10,}  ({hops})" if info["count"] else f"  {name:<26}{0:>10}")
    print(f"  checksum {ds.checksum[:16]}")
