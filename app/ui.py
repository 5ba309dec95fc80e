"""Page furniture shared by every page: error boxes instead of tracebacks, the run picker, sliders.

Every call that can fail on user input (a run directory, a checkpoint, a query) runs inside
:func:`guard`, which turns the exception into an ``st.error`` naming what failed and what to do, and
lets the rest of the page (and the other pages) keep working.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import streamlit as st
from looplens.app import state
from looplens.app.runs import quick_problem, run_dirs_from_env, run_label, shipped_run_dir

log = logging.getLogger("looplens.app")

# Errors whose message is written for the user (our code raises these with the fix in the text).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, IndexError, NotADirectoryError,
               PermissionError, UnicodeDecodeError)


class Guard:
    """Result of :func:`guard`: ``ok`` is False when the block failed (its error is on the page)."""

    ok = True


def error_message(err: BaseException) -> str:
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return str(msg).strip() or type(err).__name__


@contextlib.contextmanager
def guard(what: str, hint: str = "") -> Iterator[Guard]:
    """Run a block; on error show ``what: message`` (+ ``hint``) in the page instead of a traceback.

    Streamlit's own control flow (st.stop, st.rerun) passes through: it is a BaseException.
    """
    result = Guard()
    try:
        yield result
    except USER_ERRORS as err:
        result.ok = False
        st.error(f"**{what}**: {error_message(err)}" + (f"\n\n{hint}" if hint else ""), icon=":material/error:")
    except Exception as err:  # a bug, not bad input: still no traceback in the page, but logged in full
        result.ok = False
        log.exception("%s failed", what)
        st.error(f"**{what}** failed unexpectedly ({type(err).__name__}: {error_message(err)}). The rest of the "
                 "app still works; the full traceback is in the terminal running `looplens app`.",
                 icon=":material/bug_report:")


# ---------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------
def all_run_dirs() -> list[Path]:
    """Runs given on the command line, then runs opened in the sidebar during this session."""
    extra = [Path(p) for p in st.session_state.get("extra_runs", [])]
    out = run_dirs_from_env()
    for p in extra:
        if p not in out:
            out.append(p)
    return out


def sidebar() -> dict[Path, Any]:
    """The sidebar every page shares: the runs (with their problems) and a box to open another.

    It checks the runs without opening them (:func:`runs.quick_problem`: no torch import), so it is on
    screen at once; a run that reads but does not open is reported by :func:`good_runs`, on the page.
    Returns the run list's line of each run that passed the check, for :func:`label_sidebar` to name
    the modifications of the paper's model once the libraries are loaded."""
    lines: dict[Path, Any] = {}
    with st.sidebar:
        st.markdown("### Runs")
        dirs = all_run_dirs()
        if not dirs:
            st.info(f"No run given. Start the app with `looplens app RUN_DIR`, or open one below "
                    f"(no shipped run at `{shipped_run_dir()}`).")
        for path in dirs:
            problem = quick_problem(path)
            label = run_label(path, dirs)
            if problem:
                st.error(f"**{label}**: {problem}", icon=":material/error:")
            else:
                lines[path] = st.empty()
                lines[path].caption(f":material/check_circle: **{label}** - `{path}`")
        with st.form("open_run", clear_on_submit=True, border=False):
            typed = st.text_input("Open another run directory", placeholder="runs/my-run", key="open_run_path",
                                  help="A folder written by `looplens train --out`, or a folder of such runs.")
            if st.form_submit_button("Open", icon=":material/folder_open:") and typed.strip():
                extra = st.session_state.setdefault("extra_runs", [])
                path = str(Path(typed.strip()).expanduser().resolve())
                if path not in extra:
                    extra.append(path)
                st.rerun()
    return lines


# ---------------------------------------------------------------------------------------------------
# The paper's model, or a modification of it (the fidelity rule: docs/app.md, "Modification labels")
# ---------------------------------------------------------------------------------------------------
MODIFIED = "modified"
MODIFIED_VERDICT = "Verdicts on this run are at best 'reproduced with modifications'."


def fidelity(path: Path | str) -> tuple[dict[str, list[str]] | None, str | None]:
    """(the run's differences from the paper, None), or (None, why they cannot be told).

    From config.json alone (:func:`state.differences`), never a checkpoint."""
    try:
        return state.differences(str(path)), None
    except Exception as err:  # noqa: BLE001 - a run that does not open is reported where it is listed
        return None, error_message(err)


def choice_label(label: str, path: Path | str) -> str:
    """A run's name where runs are chosen: ``label — modified`` for a modification of the paper's model
    (a core difference: readout feedback, intermediate supervision, another world type, ...)."""
    diff, problem = fidelity(path)
    if problem:
        return f"{label} — not checked"
    return f"{label} — {MODIFIED}" if diff["core"] else label


def fidelity_banner(path: Path | str, label: str | None = None) -> None:
    """The line every page shows under a chosen run: a warning naming its core differences when it is a
    modification of the paper's model (recipe differences in an expander), else a caption saying it is
    the paper's model, with its recipe differences."""
    diff, problem = fidelity(path)
    who = f"**{label}**: " if label else ""
    if problem:
        st.caption(f":material/help: {who}differences from the paper's model not checked ({problem})")
        return
    other = "; ".join(diff["other"]) or "none"
    if not diff["core"]:
        st.caption(f":material/verified: {who}the paper's model; recipe differences: {other}")
        return
    st.warning(f"{who}Modification of the paper's model: {', '.join(diff['core'])}. {MODIFIED_VERDICT}",
               icon=":material/science:")
    if diff["other"]:
        with st.expander(f"Recipe differences from the paper ({len(diff['other'])})"):
            st.caption(other)


def label_sidebar(lines: dict[Path, Any]) -> None:
    """Name the modifications of the paper's model in the sidebar's run list (:func:`sidebar`'s lines),
    once the libraries are loaded. Runs that do not open keep their line: the page says why."""
    dirs = all_run_dirs()
    for path, line in lines.items():
        diff, problem = fidelity(path)
        if problem:
            continue
        label = run_label(path, dirs)
        if diff["core"]:
            line.caption(f":material/science: **{label} — {MODIFIED}** - `{path}`",
                         help="Modification of the paper's model: " + ", ".join(diff["core"]))
        else:
            line.caption(f":material/verified: **{label}** (the paper's model) - `{path}`")


def good_runs() -> list[Path]:
    """The runs that open without error. The first call after the server starts imports torch (with a
    spinner: :func:`state.libraries`). Problems the sidebar's quick check saw are shown there; a run
    that passed it but does not open gets an error box here."""
    dirs, good = all_run_dirs(), []
    for path in dirs:
        if quick_problem(path):
            continue
        problem = state.run_problem(str(path))
        if problem:
            st.error(f"**{run_label(path, dirs)}** does not open: {problem}", icon=":material/error:")
        else:
            good.append(path)
    return good


def no_usable_run() -> None:
    st.warning("No usable run: give a run directory to `looplens app`, or open one in the sidebar. "
               "Problems with the runs given are listed in the sidebar.", icon=":material/folder_off:")


def _persistent(key: str, options: list, default):
    """Keep a widget's choice across pages: Streamlit forgets the state of widgets a page does not
    draw, so the choice lives under ``key`` and the widget under ``_w:key``."""
    value = st.session_state.get(key)
    if value not in options:
        value = default
    st.session_state[key] = value
    st.session_state[f"_w:{key}"] = value

    def keep() -> None:
        st.session_state[key] = st.session_state[f"_w:{key}"]

    return f"_w:{key}", keep


def pick_run(key: str = "run", label: str = "Run", prefer: str | None = None) -> Path | None:
    """A run selector whose choice is shared by the pages; None (with a message) when there is none.

    ``prefer``: a task ("composition", "depth") whose first run is the default."""
    runs = good_runs()
    if not runs:
        no_usable_run()
        return None
    labels = {run_label(p, runs): p for p in runs}
    default = next((lbl for lbl, p in labels.items() if prefer and state.task(str(p)) == prefer), next(iter(labels)))
    widget_key, keep = _persistent(key, list(labels), default)
    choice = st.selectbox(label, list(labels), key=widget_key, on_change=keep,
                          format_func=lambda lbl: choice_label(lbl, labels[lbl]),
                          help="Runs given to `looplens app` or opened in the sidebar. \"modified\": not "
                          "the paper's model (see the line below the selector).")
    fidelity_banner(labels[choice])
    return labels[choice]


def pick_step(run_path: Path, key: str = "step", label: str = "Checkpoint (training step)") -> int | None:
    """A slider over the run's saved checkpoint steps (the last by default); None when there is none."""
    steps = state.checkpoint_steps(str(run_path))
    if not steps:
        st.warning(f"Run {run_path.name} has no checkpoints yet (training saves step_<N> files under "
                   "checkpoints/ as it goes); pick another run or wait.", icon=":material/hourglass_empty:")
        return None
    if len(steps) == 1:
        st.caption(f"{label}: {steps[0]} (the only checkpoint)")
        return steps[0]
    widget_key, keep = _persistent(f"{key}:{run_path}", steps, steps[-1])
    return st.select_slider(label, options=steps, key=widget_key, on_change=keep,
                            help="Checkpoints are log-spaced: slide left to go back to before the model grokked.")
