"""`looplens import-checkpoint`: a trained checkpoint of the paper's code (or its predecessor) as a run.

    looplens import-checkpoint SRC --iterations R --out RUN_DIR --data DATASET_DIR
                               [--n-heads H] [--step N] [--overwrite]

SRC: a state-dict file (.safetensors, .pt, .bin) of the paper's RecurrentGPT2Block, a checkpoint its
training scripts wrote (``model_state_dict`` inside), or a transformers GPT2LMHeadModel directory. The
run directory opens in ``looplens eval``, ``looplens app``, ``looplens report`` and every interp function.
DATASET_DIR: the paper's data directory (train.json, test.json, vocab.json; imported with
``looplens data import-grokked`` into RUN_DIR/../.datasets) or a looplens dataset directory. Token ids
map through its vocab.json (or, for a GPT2LMHeadModel, the checkpoint's added_tokens.json).

Nothing heavy is imported at module import time (``looplens --help`` stays fast).
"""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """\
examples:
  looplens import-checkpoint checkpoints/systematicity/r4/checkpoint_epoch_2001.pt --iterations 4 \\
      --n-heads 12 --data data/composition.2000.200.7.2 --out runs/paper-r4
  looplens import-checkpoint grokked/composition_0.1_8/checkpoint-1500000 --iterations 1 \\
      --data data/composition.2000.200.18.0 --out runs/grokked-8l
see docs/fidelity.md for the layouts read and what is checked."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "import-checkpoint", help="import a checkpoint of the paper's code (or a GPT2LMHeadModel) as a run directory",
        description="Convert a trained checkpoint of Loop-Think-Generalize (RecurrentGPT2Block state dict or "
        "training checkpoint) or GrokkedTransformer (GPT2LMHeadModel directory) into a looplens run directory.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SRC", help="weights file (.safetensors/.pt/.bin) or transformers model directory")
    p.add_argument("--iterations", type=int, required=True, metavar="R",
                   help="how many times the checkpoint's blocks are looped (the run's training iteration count)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create")
    p.add_argument("--data", metavar="DATASET_DIR", required=True,
                   help="the paper's data directory (vocab.json, train.json, test.json) or a looplens dataset")
    p.add_argument("--n-heads", type=int, metavar="H",
                   help="attention heads, when no GPT2Config config.json lies beside SRC (the paper's code: 12)")
    p.add_argument("--step", type=int, default=0, metavar="N", help="the step the run's checkpoint is labelled with")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    p.set_defaults(func=import_checkpoint_command)


def import_checkpoint_command(args: argparse.Namespace) -> int:
    from looplens.models.pretrained import import_run

    run_dir = import_run(args.source, args.out, args.iterations, data=args.data, n_heads=args.n_heads,
                         step=args.step, overwrite=args.overwrite, command=["import-checkpoint", args.source])
    print(f"wrote {run_dir} (imported from {args.source}, looped {args.iterations}x)")
    return 0
