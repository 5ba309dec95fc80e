"""Study "shortcut": how much the relation suffix alone tells about the answer, and what models learn.

In a random-tail world relations are many-to-one, so the last relation narrows the answer down to its
*range* (the tails it reaches); in a permutation world every relation reaches every entity. For each
run's world, on 2-hop queries:

- :func:`data.shortcut_rate` (suffix length 1): accuracy of the best last-relation-only predictor, its
  shuffled-answer chance level and the uniform baseline, on the training compositions and test splits;
- the range fraction: |range(last relation)| / n_entities, i.e. the share of entities a suffix leaves;
- the model (final checkpoint, training iteration count) on sampled test queries: accuracy, agreement
  with the suffix-majority predictor fitted on the training compositions, and the share of its *wrong*
  answers that fall inside the last relation's range (compare with the range fraction: above it means
  the model learnt the relation's range as a shortcut even where it cannot compose).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from looplens.analyses.figures import grouped_bars
from looplens.analyses.studies.base import StudyOptions, StudyResult, fmt, load_model, run_info, sample_split
from looplens.data import make_world, shortcut_rate

NAME = "shortcut"
TITLE = "Shortcuts: the relation suffix in random-tail vs permutation worlds"
CLAIMS = ()


def select(runs: Sequence) -> list:
    if not runs:
        raise ValueError(f"study {NAME} needs at least one run")
    return list(runs)


def test_splits(run) -> list[str]:
    names = run.dataset.split_names
    if run.config.data.task == "depth":
        return ["test"]
    return [s for s in ("test_inferred_id", "test_inferred_ood") if s in names]


def _two_hop(enc):
    return enc.subset(enc.hops == 2)


def _last_relation(enc, n_entities: int) -> np.ndarray:
    tokens = enc.tokens.numpy()
    return tokens[np.arange(len(enc)), enc.lengths.numpy() - 1] - 1 - n_entities


def relation_ranges(tails: np.ndarray) -> list[np.ndarray]:
    """Entity indices each relation reaches (its range), from the world's tails table (-1 = no edge).

    >>> [r.tolist() for r in relation_ranges(np.array([[1, 2], [1, -1], [0, 2]]))]
    [[0, 1], [2]]
    """
    return [np.unique(tails[tails[:, r] >= 0, r]) for r in range(tails.shape[1])]


def majority_by_relation(relations: np.ndarray, answers: np.ndarray, n_relations: int) -> np.ndarray:
    """Most frequent answer (entity index) per last relation among the rows; -1 for unseen relations.
    Ties go to the smallest entity index.

    >>> majority_by_relation(np.array([0, 0, 0, 1]), np.array([5, 5, 3, 2]), 3).tolist()
    [5, 2, -1]
    """
    out = np.full(n_relations, -1, dtype=np.int64)
    frame = pd.DataFrame({"r": relations, "a": answers})
    counts = frame.groupby(["r", "a"]).size().reset_index(name="c").sort_values(["r", "c", "a"],
                                                                                ascending=[True, False, True])
    best = counts.drop_duplicates("r")
    out[best["r"].to_numpy()] = best["a"].to_numpy()
    return out


def random_chains(world, n: int, hops: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` random ``hops``-hop chains along existing edges, as query / answer strings."""
    heads = rng.integers(0, world.n_entities, size=n)
    relations = np.empty((n, hops), dtype=np.int64)
    current = heads
    for j in range(hops):
        scores = rng.random((n, world.n_relations))
        scores[world.tails[current] < 0] = -1.0
        relations[:, j] = scores.argmax(1)
        current = world.tails[current, relations[:, j]]
    queries = [" ".join([f"e{h}"] + [f"r{r}" for r in rs]) for h, rs in zip(heads.tolist(), relations.tolist())]
    return pd.DataFrame({"query": queries, "answer": [f"e{a}" for a in current.tolist()]})


def world_comparison(config, n: int, seed: int) -> list[dict]:
    """The suffix shortcut in both world kinds at one run's sizes and seed, from the worlds alone (no model):
    ``n`` random 2-hop chains each."""
    rows = []
    for kind in ("random-tail", "permutation"):
        degree = min(config.out_degree, config.n_relations)
        world = make_world(kind, config.n_entities, config.n_relations, degree, config.seed)
        chains = random_chains(world, n, 2, np.random.default_rng(seed))
        rate = shortcut_rate(world, chains, suffix_len=1)
        sizes = np.array([len(x) for x in relation_ranges(np.asarray(world.tails))])
        rows.append({"world": kind, "n_entities": config.n_entities, "n_relations": config.n_relations,
                     "out_degree": world.n_facts // world.n_entities if kind == "permutation" else degree,
                     "seed": config.seed, "range_fraction": float(sizes.mean() / config.n_entities),
                     **{k: rate[k] for k in ("accuracy", "chance", "uniform", "shortcut", "n_rows")}})
    return rows


def run(runs: Sequence, options: StudyOptions) -> StudyResult:
    runs = select(runs)
    rate_rows, model_rows, found, notes = [], [], [], []
    for r in runs:
        info = run_info(r)
        ds = r.dataset
        world = ds.world
        n_ent, n_rel = world.n_entities, world.n_relations
        tails = np.asarray(world.tails)
        ranges = relation_ranges(tails)
        range_size = np.array([len(x) for x in ranges])
        train2 = _two_hop(ds.encode("train"))
        fit_rel = _last_relation(train2, n_ent)
        majority = majority_by_relation(fit_rel, train2.answers.numpy() - 1, n_rel)
        entry = {"run": r.name, "world": world.kind, "task": info["task"], "n_entities": n_ent,
                 "n_relations": n_rel, "range_fraction": float(range_size.mean() / n_ent), "splits": {}}
        for split, enc in [("train (2-hop)", train2)] + [(s, _two_hop(ds.encode(s))) for s in test_splits(r)]:
            if len(enc) == 0:
                continue
            rate = shortcut_rate(ds, enc, suffix_len=1)
            rate_rows.append({"run": r.name, "world": world.kind, "split": split,
                              **{k: rate[k] for k in ("accuracy", "chance", "uniform", "shortcut", "n_suffixes",
                                                      "n_rows")}})
        model = load_model(r, None, options)
        for split in test_splits(r):
            enc = sample_split(ds, split, options.n_queries, options.seed, hops=2)
            if len(enc) == 0:
                continue
            with torch.no_grad():
                pred = model.predict(enc.tokens.to(model.W_E.device)).argmax(-1).cpu().numpy() - 1
            answers = enc.answers.numpy() - 1
            rel = _last_relation(enc, n_ent)
            short = majority[rel]
            correct = pred == answers
            in_range = np.array([p in ranges[q] for p, q in zip(pred, rel)])
            wrong = ~correct
            row = {"run": r.name, "world": world.kind, "split": split, "n": len(enc),
                   "model_accuracy": float(correct.mean()), "shortcut_accuracy": float((short == answers).mean()),
                   "agreement_with_shortcut": float((pred == short).mean()),
                   "wrong_in_range": float(in_range[wrong].mean()) if wrong.any() else None,
                   "range_fraction": float((range_size[rel] / n_ent).mean())}
            model_rows.append(row)
            entry["splits"][split] = {k: v for k, v in row.items() if k not in ("run", "world", "split")}
        found.append(entry)
        parts = [f"{s}: model {fmt(v['model_accuracy'])}, suffix-majority {fmt(v['shortcut_accuracy'])}, "
                 f"agreement {fmt(v['agreement_with_shortcut'])}, wrong answers in the relation's range "
                 f"{fmt(v['wrong_in_range'])} (chance {fmt(v['range_fraction'])})" for s, v in entry["splits"].items()]
        notes.append(f"{info['label']}, {world.kind} world: a last relation leaves "
                     f"{fmt(100 * entry['range_fraction'], 0)}% of the entities; " + "; ".join(parts) + ".")
    # both world kinds at each run's sizes, from the worlds alone, so the comparison exists whatever worlds
    # the runs were trained on
    seen, world_rows = set(), []
    for r in runs:
        c = r.config.data
        key = (c.n_entities, c.n_relations, c.out_degree, c.seed)
        if key not in seen:
            seen.add(key)
            world_rows += [{"sizes_of": r.name, **row} for row in world_comparison(c, 20 * options.n_queries,
                                                                                  options.seed)]
    worlds = pd.DataFrame(world_rows)
    for row in world_rows:
        notes.append(f"{row['world']} world at {row['sizes_of']}'s sizes ({row['n_entities']} entities, "
                     f"{row['n_relations']} relations): the last relation alone predicts {fmt(row['accuracy'])} of "
                     f"random 2-hop answers (shuffled chance {fmt(row['chance'])}, uniform {fmt(row['uniform'], 3)}); "
                     f"a relation's range is {fmt(100 * row['range_fraction'], 0)}% of the entities.")
    rates = pd.DataFrame(rate_rows)
    behaviour = pd.DataFrame(model_rows)
    figures = {"suffix_predictor": grouped_bars(rates.assign(what=rates["run"] + " (" + rates["world"] + ")"),
                                                "split", "accuracy", "what", "Accuracy of the best last-relation-only "
                                                "predictor (fitted on the rows it scores)", "accuracy")}
    if len(behaviour):
        long = behaviour.melt(id_vars=["run", "world", "split"], value_vars=["model_accuracy", "agreement_with_shortcut",
                              "wrong_in_range", "range_fraction"], var_name="measure", value_name="value")
        long["what"] = long["run"] + " · " + long["split"]
        figures["model_behaviour"] = grouped_bars(long.dropna(subset=["value"]), "measure", "value", "what",
                                                  "What the models do on 2-hop test queries: accuracy, agreement with "
                                                  "the suffix shortcut, wrong answers inside the relation's range",
                                                  "fraction")
    figures["worlds"] = grouped_bars(worlds.assign(what=worlds["world"] + " (" + worlds["sizes_of"] + " sizes)"),
                                     "what", "accuracy", "world", "Last-relation-only predictor on random 2-hop chains: "
                                     "random-tail vs permutation worlds of the same sizes", "accuracy")
    return StudyResult(NAME, TITLE, [r.name for r in runs],
                       {"suffix_rate": rates, "model_behaviour": behaviour, "worlds": worlds}, figures,
                       {"runs": found, "worlds": world_rows}, notes, options.to_dict())
