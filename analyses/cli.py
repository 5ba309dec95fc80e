"""The `looplens` console script.

Each verb lives beside the code it drives and registers itself here: ``data/cli.py`` (data),
``models/cli.py`` (train, eval), ``analyses/`` (study, reproduce), ``app/cli.py`` (app). This module
only wires them together, so importing it stays cheap and a broken verb cannot break the others' --help.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb module -> the function that adds its sub-commands to the parser
_VERB_MODULES = ["looplens.data.cli", "looplens.models.cli", "looplens.models.import_cli",
                 "looplens.analyses.commands", "looplens.app.cli"]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2, no traceback."""


def _version() -> str:
    from looplens import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="looplens",
        description="Looped transformers: knowledge-graph data, training, interpretability, reports.",
    )
    parser.add_argument("--version", action="version", version=f"looplens {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name in _VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a verb not written yet
            if err.name == name:
                continue
            raise
        module.register(sub)
    return parser


def _one_line(err: BaseException) -> str:
    """The error as one line: a bad file or a full disk is one line naming the path, not a traceback."""
    if isinstance(err, KeyError) and err.args:
        msg = str(err.args[0])
    elif isinstance(err, OSError) and type(err).__str__ is OSError.__str__ and err.filename and err.strerror:
        # a raw OSError from the OS (read-only folder, full disk, ...): name the path and the reason
        msg = f"{err.filename}: {err.strerror}"
    else:
        msg = str(err)
    return " ".join(line.strip() for line in msg.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (CLIError, ValueError, OSError, KeyError) as err:
        print(f"looplens {args.verb}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"looplens {args.verb}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
