"""Cached access to runs, checkpoints, datasets and analyses.

Models and datasets are resources (``st.cache_resource``: one object shared by every session, never
copied); DataFrames are data (``st.cache_data``: keyed by their arguments, copied per reader). Every
analysis is a call into ``interp``; nothing here computes anything itself. Files that grow while a
run trains (metrics.csv, checkpoints/) are keyed by their modification time, so a rerun sees new rows.

Exceptions are not cached by Streamlit: a failed load is retried on the next interaction.

Importing this module is cheap (streamlit only): pandas, plotly, torch, TransformerLens and ``interp``
are imported by :func:`libraries`, once per server process, under a spinner; the page's title, the
navigation and the sidebar are on screen before that (issue 13; tests/test_app.py checks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st
from looplens.app.runs import check_run_dir

if TYPE_CHECKING:  # pandas is imported where it is used: the sidebar draws before it is loaded
    import pandas as pd


def _stamp(path: Path) -> tuple[float, int]:
    """(mtime, size) of a file or folder, (0, 0) when absent: a cache key that changes when it does."""
    try:
        st_ = path.stat()
    except OSError:
        return (0.0, 0)
    return (st_.st_mtime, st_.st_size)


# ---------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------
@st.cache_resource(show_spinner="Loading torch, TransformerLens and the looplens analyses "
                   "(first visit after the server starts: a few seconds)...")
def libraries() -> bool:
    """Import the heavy libraries once per server process, with a spinner where it is called (app/main.py
    calls it under the page's title; :func:`open_run` too, for callers outside the app's pages)."""
    import looplens.analyses.claims  # noqa: F401 - the run labels (differences from the paper)
    import looplens.app.figures  # noqa: F401 - pandas, plotly
    import looplens.interp  # noqa: F401 - torch, TransformerLens
    import looplens.models.train  # noqa: F401

    return True


@st.cache_resource(show_spinner=False, max_entries=64)
def _open_run(path: str, stamp: tuple[float, int]) -> Any:
    from looplens.models.train import load_run

    check_run_dir(Path(path))
    return load_run(path)


def open_run(path: str) -> Any:
    """The run at ``path`` (models.train.Run); raises with a readable message when it is not one."""
    libraries()
    return _open_run(path, _stamp(Path(path) / "config.json"))


def run_problem(path: str) -> str | None:
    """None when the run opens, else what is wrong with it (one line, with the fix)."""
    try:
        open_run(path)
    except Exception as err:  # noqa: BLE001 - every failure becomes a sidebar message
        from looplens.app.ui import error_message

        return error_message(err)
    return None


@st.cache_data(show_spinner=False, max_entries=64)
def _metrics(path: str, stamp: tuple[float, int]) -> pd.DataFrame:
    return open_run(path).metrics


def metrics(path: str) -> pd.DataFrame:
    """metrics.csv of a run (re-read when the file changes)."""
    return _metrics(path, _stamp(Path(path) / "metrics.csv"))


def summary(path: str) -> dict:
    return open_run(path).summary


def train_iterations(path: str) -> int:
    """The iteration count the run's evaluations call "training" (models.train.TrainConfig)."""
    return int(open_run(path).config.train_iterations)


def max_query_hops(path: str) -> int | None:
    """The most relations a query may have for this run's model (its context is n_ctx tokens)."""
    n_ctx = open_run(path).meta.get("model_config", {}).get("n_ctx")
    return None if n_ctx is None else int(n_ctx) - 1


def describe(path: str) -> dict:
    """Model shape and recurrence of a run, for tables and legends."""
    cfg = open_run(path).config
    m, r = cfg.model, cfg.recurrence
    recurrence = "fixed" if r.mode == "fixed" else f"{r.mode} (mean {r.mean:g}, {r.min}..{r.max})"
    return {"task": cfg.data.task, "blocks": m.n_blocks, "iterations": m.n_iterations,
            "recurrence": recurrence, "d_model": m.d_model}


@st.cache_data(show_spinner=False, max_entries=64)
def _differences(path: str, stamp: tuple[float, int]) -> dict[str, list[str]]:
    from looplens.analyses.claims import run_differences

    diff = run_differences(open_run(path).config)
    return {"core": list(diff.core), "other": list(diff.other)}


def differences(path: str) -> dict[str, list[str]]:
    """How the run departs from the paper (analyses.claims.run_differences of its config.json, no checkpoint
    read): {"core": [...], "other": [...]}. A core difference (readout feedback, intermediate supervision,
    prelude / coda, input injection, another loss or world type) makes the run a modification of the
    paper's model; "other" lists recipe values beside the paper's (sizes, lr, weight decay, steps...)."""
    return _differences(path, _stamp(Path(path) / "config.json"))


def checkpoint_steps(path: str) -> list[int]:
    return list(open_run(path).checkpoints)


@st.cache_resource(show_spinner="Loading the run's dataset...", max_entries=16)
def _dataset(path: str, stamp: tuple[float, int]) -> Any:
    return open_run(path).dataset


def dataset(path: str) -> Any:
    """The run's data.Dataset (checksum verified against the run)."""
    return _dataset(path, _stamp(Path(path) / "config.json"))


@st.cache_resource(show_spinner="Loading checkpoint...", max_entries=24)
def _model(path: str, step: int, stamp: tuple[float, int]) -> Any:
    model = open_run(path).load_model(step)
    if getattr(model, "vocab", None) is None:
        model.vocab = dataset(path).vocab
    return model.eval()


def model(path: str, step: int) -> Any:
    """The model at checkpoint ``step`` of a run (eval mode, vocab attached). Shared, do not modify."""
    run = open_run(path)
    return _model(path, int(step), _stamp(run.paths.checkpoint(int(step)).with_suffix(".safetensors")))


# ---------------------------------------------------------------------------------------------------
# Evaluations (Depth page)
# ---------------------------------------------------------------------------------------------------
def eval_files(path: str) -> list[str]:
    """CSV files `looplens eval` wrote under RUN/eval/, newest step first."""
    folder = Path(path) / "eval"
    if not folder.is_dir():
        return []
    return sorted((p.name for p in folder.glob("*.csv")), key=lambda n: (-_step_of(n), n))


def _step_of(name: str) -> int:
    digits = name.removeprefix("step_").split("_")[0].split(".")[0]
    return int(digits) if digits.isdigit() else -1


EVAL_NEEDED = ("split", "hops", "iterations", "accuracy")


@st.cache_data(show_spinner=False, max_entries=64)
def _eval_table(path: str, name: str, stamp: tuple[float, int]) -> pd.DataFrame:
    import pandas as pd

    file = Path(path) / "eval" / name
    try:
        table = pd.read_csv(file)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not a readable CSV ({str(err).splitlines()[0]})") from None
    missing = [c for c in EVAL_NEEDED if c not in table.columns]
    if missing:
        raise ValueError(f"{file} lacks the columns {missing}; is it a `looplens eval` table?")
    return table


def eval_table(path: str, name: str) -> pd.DataFrame:
    return _eval_table(path, name, _stamp(Path(path) / "eval" / name))


@st.cache_data(show_spinner=False, max_entries=32)
def evaluate(path: str, step: int, max_iterations: int) -> pd.DataFrame:
    """Accuracy per split x hops at 1..max_iterations for one checkpoint (models.train.evaluate)."""
    from looplens.models.train import evaluate as evaluate_run

    return evaluate_run(open_run(path), checkpoint=int(step), iterations=range(1, int(max_iterations) + 1))


def task(path: str) -> str | None:
    """The run's task ("composition" or "depth"), None if the run does not open."""
    try:
        return open_run(path).config.data.task
    except Exception:  # noqa: BLE001 - the sidebar shows why
        return None


# ---------------------------------------------------------------------------------------------------
# Queries and the world (Query explorer, Patching)
# ---------------------------------------------------------------------------------------------------
def parse_query(path: str, query: str) -> dict:
    """Validate a typed query against the run's vocab and world.

    Returns {"query", "tokens" (list of ids), "head", "relations" (indices), "chain" (entity indices
    visited, answer last) or None when the chain leaves the world, "problem" (why, or None)}. Raises
    ValueError naming the bad token for a malformed query or an unknown entity / relation.
    """
    ds = dataset(path)
    query = " ".join(str(query).split())
    if not query:
        raise ValueError("the query is empty: type an entity followed by relations, e.g. 'e3 r1 r2'")
    ids = ds.vocab.encode(query)  # ValueError: "query 'e3 x': token 'x' at position 1 is not a known token"
    if len(ids) < 2:
        raise ValueError(f"query {query!r} has no relation: add at least one, e.g. '{query} r0'")
    limit = max_query_hops(path)
    if limit is not None and len(ids) - 1 > limit:
        raise ValueError(f"query {query!r} has {len(ids) - 1} hops; this run's model reads at most {limit} "
                         f"(its context is {limit + 1} tokens)")
    head = int(ds.vocab.entity_index(ids[0]))
    relations = [int(ds.vocab.relation_index(i)) for i in ids[1:]]
    try:
        answers, bridges = ds.world.follow([head], [relations])
        chain, problem = [*bridges[0].tolist(), int(answers[0])], None
    except ValueError as err:  # a valid query whose chain has no fact at some hop
        chain, problem = None, str(err).removeprefix("follow: ").replace("chain 0 ", "the chain ")
    return {"query": query, "tokens": ids, "head": head, "relations": relations, "chain": chain, "problem": problem}


def entity_relations(path: str, entity: int) -> list[int]:
    """Relations entity ``entity`` has in the run's world (all of them in a permutation world)."""
    tails = dataset(path).world.tails
    return [int(r) for r in (tails[entity] >= 0).nonzero()[0]]


@st.cache_data(show_spinner=False, max_entries=16)
def split_rows(path: str, split: str) -> pd.DataFrame:
    """A split of the run's dataset: query, answer, hops, bridges."""
    return dataset(path).rows(split)


def sample_rows(path: str, split: str, n: int, seed: int = 0) -> pd.DataFrame:
    rows = split_rows(path, split)
    return rows.sample(min(int(n), len(rows)), random_state=seed) if len(rows) > n else rows


# ---------------------------------------------------------------------------------------------------
# Analyses: one cached call into interp each
# ---------------------------------------------------------------------------------------------------
def _targets(path: str, query: dict) -> dict | None:
    from looplens.interp import hop_targets

    if query["chain"] is None:
        return None
    vocab = dataset(path).vocab
    ids = [int(vocab.entity_token(e)) for e in query["chain"]]
    return hop_targets([ids[-1]], [ids[:-1]] if len(ids) > 1 else None)


@st.cache_data(show_spinner=False, max_entries=128)
def logit_lens(path: str, step: int, query: str, n_iterations: int) -> pd.DataFrame:
    """interp.logit_lens of one query at every position, for its chain's entities (or the prediction)."""
    from looplens import interp
    q = parse_query(path, query)
    return interp.logit_lens(model(path, step), [q["query"]], _targets(path, q), n_iterations=n_iterations,
                             positions="all", entities_only=True, progress=False)


@st.cache_data(show_spinner=False, max_entries=128)
def locate_hops(path: str, step: int, query: str, n_iterations: int) -> pd.DataFrame:
    import pandas as pd

    from looplens import interp

    q = parse_query(path, query)
    if q["chain"] is None:
        return pd.DataFrame()
    vocab = dataset(path).vocab
    ids = [int(vocab.entity_token(e)) for e in q["chain"]]
    return interp.locate_hops(model(path, step), [q["query"]], [ids[-1]], [ids[:-1]] if len(ids) > 1 else None,
                              n_iterations=n_iterations, entities_only=True, progress=False)


@st.cache_data(show_spinner=False, max_entries=64)
def attention(path: str, step: int, query: str, n_iterations: int) -> pd.DataFrame:
    from looplens import interp
    q = parse_query(path, query)
    return interp.attention_by_iteration(model(path, step), [q["query"]], n_iterations=n_iterations, progress=False)


@st.cache_data(show_spinner=False, max_entries=64)
def patching_pairs(path: str, split: str | None, hops: int, corrupt: str, position: int | None, n: int,
                   seed: int) -> pd.DataFrame:
    from looplens import interp
    return interp.make_patching_pairs(dataset(path), n, hops=hops, corrupt=corrupt, position=position,
                                      split=split, seed=seed)


@st.cache_data(show_spinner=False, max_entries=64)
def patching(path: str, step: int, clean: tuple[str, ...], corrupted: tuple[str, ...], clean_answers: tuple[str, ...],
             corrupted_answers: tuple[str, ...] | None, hook: str, n_iterations: int) -> pd.DataFrame:
    """interp.activation_patching of clean -> corrupted pairs, one cell per (layer, position[, head])."""
    from looplens import interp
    return interp.activation_patching(model(path, step), list(clean), list(corrupted), list(clean_answers),
                                      None if corrupted_answers is None else list(corrupted_answers),
                                      hook=hook, n_iterations=n_iterations, progress=False)


# ---------------------------------------------------------------------------------------------------
# Iterations page
# ---------------------------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=32)
def fixed_points(path: str, step: int, split: str, n: int, n_iterations: int) -> pd.DataFrame:
    from looplens import interp
    rows = sample_rows(path, split, n)
    return interp.fixed_points(model(path, step), rows["query"].tolist(), n_iterations=n_iterations,
                               positions="all", progress=False)


@st.cache_data(show_spinner=False, max_entries=32)
def spectral_radius(path: str, step: int, split: str, n: int, n_iterations: int) -> pd.DataFrame:
    from looplens import interp
    rows = sample_rows(path, split, n)
    return interp.spectral_radius(model(path, step), rows["query"].tolist(), n_iterations=n_iterations,
                                  n_steps=40, progress=False)


@st.cache_data(show_spinner=False, max_entries=32)
def overthinking(path: str, step: int, split: str, n: int, max_iterations: int) -> pd.DataFrame:
    from looplens import interp
    rows = sample_rows(path, split, n)
    return interp.overthinking(model(path, step), rows["query"].tolist(), rows["answer"].tolist(),
                               max_iterations=max_iterations, progress=False)


@st.cache_data(show_spinner=False, max_entries=256)
def halting(path: str, step: int, split: str, rule: str, eps: float, entropy: float,
            max_iterations: int) -> pd.DataFrame:
    """Accuracy and mean iterations used under an adaptive halting rule (models.train.evaluate)."""
    from looplens.models.train import evaluate as evaluate_run

    return evaluate_run(open_run(path), checkpoint=int(step), iterations=[], splits=[split], halting=rule,
                        eps=eps, entropy=entropy, max_iterations=max_iterations)


@st.cache_data(show_spinner=False, max_entries=32)
def fixed_iterations(path: str, step: int, split: str, max_iterations: int) -> pd.DataFrame:
    """Accuracy at each fixed iteration count 1..max_iterations (models.train.evaluate)."""
    from looplens.models.train import evaluate as evaluate_run

    return evaluate_run(open_run(path), checkpoint=int(step), iterations=range(1, max_iterations + 1),
                        splits=[split])
