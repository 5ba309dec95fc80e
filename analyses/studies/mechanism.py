"""Study "mechanism" (claim 6): where hops are resolved, what patching moves, whether the loop settles.

For each composition run (a looped and a vanilla one, typically), at the final checkpoint:
- hop locator (:func:`interp.locate_hops`, logit lens at every position): how often, and how deep into
  the network, the bridge entity (hop 1) and the answer (hop 2) become and stay top-1, per split;
- residual activation patching (:func:`interp.activation_patching`, ``resid_pre``) over (iteration,
  block, position), corrupting the head entity and, separately, the second relation;
- fixed-point curves (looped runs): relative change of the state per iteration, run to
  ``options.fixed_point_iterations`` (:func:`interp.fixed_points`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from looplens.analyses.figures import grouped_bars
from looplens.analyses.studies.base import (
    COMPOSITION_CURVES,
    COMPOSITION_DIAGNOSTICS,
    StudyOptions,
    StudyResult,
    fmt,
    load_model,
    run_info,
    sample_split,
    select_task,
)
from looplens.interp import (
    activation_patching,
    fixed_points,
    locate_hops,
    make_patching_pairs,
    summarize_hops,
)
from looplens.interp.plots import fixed_points_figure, hop_resolution_figure, patching_heatmap

NAME = "mechanism"
TITLE = "Mechanism: hop locator, activation patching and fixed points (looped vs vanilla)"
CLAIMS = (6,)
PRIMARY_SPLIT = "test_inferred_id"
CORRUPTIONS = {"head": {"corrupt": "head"}, "relation2": {"corrupt": "relation", "position": 2}}


def select(runs: Sequence) -> list:
    return select_task(runs, "composition", NAME)


def _located(model, ds, split: str, options: StudyOptions) -> tuple[pd.DataFrame, float] | None:
    enc = sample_split(ds, split, options.n_queries, options.seed)
    if len(enc) == 0:
        return None
    tokens = enc.tokens.to(model.W_E.device)
    located = locate_hops(model, tokens, enc.answers, enc.bridges, positions="all", progress=options.progress)
    with torch.no_grad():
        acc = float((model.predict(tokens).argmax(-1).cpu() == enc.answers).double().mean())
    return located, acc


def run(runs: Sequence, options: StudyOptions) -> StudyResult:
    runs = select(runs)
    hop_rows, patch_rows, fp_rows, found, notes = [], [], [], [], []
    figures = {}
    for r in runs:
        info = run_info(r)
        ds = r.dataset
        model = load_model(r, None, options)
        entry = {"run": r.name, "kind": info["kind"], "R": info["R"], "virtual_layers": info["virtual_layers"],
                 "splits": {}}
        for split in (*COMPOSITION_CURVES, *COMPOSITION_DIAGNOSTICS):
            if split not in ds.split_names:
                continue
            got = _located(model, ds, split, options)
            if got is None:
                continue
            located, acc = got
            summary = summarize_hops(located)
            summary.insert(0, "split", split)
            summary.insert(0, "run", r.name)
            summary["accuracy"] = acc
            hop_rows.append(summary)
            by_hop = summary.set_index("hop")
            entry["splits"][split] = {
                "accuracy": acc,
                "bridge_resolved": float(by_hop.loc[1, "fraction_resolved"]) if 1 in by_hop.index else None,
                "answer_resolved": float(by_hop.loc[2, "fraction_resolved"]) if 2 in by_hop.index else None,
                "bridge_depth": float(by_hop.loc[1, "depth_fraction_mean"]) if 1 in by_hop.index else None,
                "answer_depth": float(by_hop.loc[2, "depth_fraction_mean"]) if 2 in by_hop.index else None,
                "bridge_iteration": float(by_hop.loc[1, "iteration_mean"]) if 1 in by_hop.index else None,
                "answer_iteration": float(by_hop.loc[2, "iteration_mean"]) if 2 in by_hop.index else None,
            }
            if split == PRIMARY_SPLIT:
                fig = hop_resolution_figure(located)
                fig.update_layout(title=f"Where hops resolve, {info['label']}, {split} queries")
                figures[f"hops_{r.name}"] = fig

        # activation patching on ID queries
        patch_split = PRIMARY_SPLIT if PRIMARY_SPLIT in ds.split_names else "train_inferred"
        entry["patching"] = {}
        for cname, kwargs in CORRUPTIONS.items():
            try:
                pairs = make_patching_pairs(ds, options.patch_pairs, hops=2, split=patch_split, seed=options.seed,
                                            **kwargs)
            except ValueError as err:
                notes.append(f"{r.name}: no {cname} patching pairs ({err}).")
                continue
            patch = activation_patching(model, pairs, hook="resid_pre", progress=options.progress)
            patch.insert(0, "corruption", cname)
            patch.insert(0, "run", r.name)
            patch_rows.append(patch)
            fig = patching_heatmap(patch)
            fig.update_layout(title=f"Residual patching ({cname} corrupted), {info['label']}: normalised logit "
                              "difference (1 = clean answer restored)")
            figures[f"patching_{cname}_{r.name}"] = fig
            eff = patch.dropna(subset=["effect"])
            late = eff[eff["layer"] == eff["layer"].max()] if len(eff) else eff
            entry["patching"][cname] = {
                "n_pairs": int(patch["n_pairs"].iloc[0]),
                "max_effect": float(eff["effect"].max()) if len(eff) else None,
                # the position whose last-layer patch restores most: where the answer is carried at the end
                "last_layer_best_position": int(late.loc[late["effect"].idxmax(), "position"]) if len(late) else None,
                # claim 6: where the effect sits at the start of each iteration (resid_pre of its first block)
                "best_position_by_iteration": _best_by_iteration(eff),
                "readout_position": int(eff["position"].max()) if len(eff) else None,
            }

        if info["kind"] == "looped":
            enc = sample_split(ds, patch_split, options.n_queries, options.seed)
            fp = fixed_points(model, enc.tokens.to(model.W_E.device), n_iterations=options.fixed_point_iterations,
                              positions="all", per_block=False, attention=False, progress=options.progress)
            fp = fp[fp["block"] == -1]
            curve = fp.groupby(["measure", "iteration", "is_readout"], as_index=False)["value"].mean()
            curve.insert(0, "run", r.name)
            fp_rows.append(curve)
            change = curve[(curve["measure"] == "relative_change") & curve["is_readout"]].set_index("iteration")["value"]
            entry["fixed_point"] = {"iterations": options.fixed_point_iterations,
                                    "change_first": float(change.loc[1]) if 1 in change.index else None,
                                    "change_last": float(change.iloc[-1])}
            fig = fixed_points_figure(fp, "relative_change")
            fig.update_layout(title=f"Fixed points, {info['label']}: relative change of the state per iteration "
                              f"(trained at R={info['R']}, run to {options.fixed_point_iterations})")
            figures[f"fixed_points_{r.name}"] = fig
        found.append(entry)
        s = entry["splits"].get(PRIMARY_SPLIT, {})
        fp_text = ""
        if "fixed_point" in entry:
            fp_text = (f"; state change at the readout {fmt(entry['fixed_point']['change_first'], 3)} at iteration 1 -> "
                       f"{fmt(entry['fixed_point']['change_last'], 4)} at iteration {options.fixed_point_iterations - 1}")
        notes.append(f"{info['label']} on {PRIMARY_SPLIT}: accuracy {fmt(s.get('accuracy'))}; bridge resolved in "
                     f"{fmt(s.get('bridge_resolved'))} of queries (mean depth {fmt(s.get('bridge_depth'))}), answer in "
                     f"{fmt(s.get('answer_resolved'))} (depth {fmt(s.get('answer_depth'))}){fp_text}.")
    tables = {"hop_summary": pd.concat(hop_rows, ignore_index=True)}
    hops = tables["hop_summary"]
    bars = hops.assign(what=hops["run"] + " · " + hops["target"])
    figures["resolved_by_split"] = grouped_bars(bars, "split", "fraction_resolved", "what",
                                                "Share of queries whose bridge / answer is resolved (logit lens)",
                                                "fraction of queries")
    if patch_rows:
        tables["patching"] = pd.concat(patch_rows, ignore_index=True)
    if fp_rows:
        tables["fixed_points"] = pd.concat(fp_rows, ignore_index=True)
    return StudyResult(NAME, TITLE, [r.name for r in runs], tables, figures,
                       {"runs": found, "primary_split": PRIMARY_SPLIT}, notes, options.to_dict())


def _best_by_iteration(effects: pd.DataFrame) -> list[int]:
    """Per loop iteration, the position whose resid_pre patch (first block of the iteration) restores most."""
    first = effects[(effects["stage"] == "loop") & (effects["block"] == 0)]
    if not len(first):
        return []
    best = first.loc[first.groupby("iteration")["effect"].idxmax()].sort_values("iteration")
    return [int(p) for p in best["position"]]
