"""Verdicts on PAPER.md's claims 1-6, decided by stated rules from the studies' numbers, never by hand.

Each claim has a ``judge_*`` function of a few plain numbers (tested both ways with fabricated values)
and a ``claim_*`` function that picks those numbers out of the studies' findings. A verdict is one of
``reproduced``, ``partly``, ``not reproduced``, or ``not measured`` (the study did not run or had no
suitable run). Where several runs qualify, each is judged and the best verdict counts; the summary
names that run.

>>> judge_systematic(0.78, 0.01), judge_systematic(0.3, 0.05), judge_systematic(0.02, 0.0)
('reproduced', 'partly', 'not reproduced')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from looplens.analyses.studies.base import fmt

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_MEASURED = "reproduced", "partly", "not reproduced", "not measured"
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_MEASURED)
_RANK = {REPRODUCED: 0, PARTLY: 1, NOT_REPRODUCED: 2, NOT_MEASURED: 3}

# --- thresholds of the rules (each rule's text below quotes them) -----------------------------------
SYSTEMATIC_LOOPED_MIN = 0.5  # claim 1: looped OOD accuracy that counts as "answers OOD queries"
SYSTEMATIC_VANILLA_MAX = 0.1  # claim 1: vanilla OOD accuracy that counts as "does not"
SYSTEMATIC_GAP = 0.1  # claim 1, partly: looped minus vanilla
GROKKING_LATE = 2.0  # claim 2: OOD stage step >= this x the train stage step ("long after")
DEPTH_EXTENSION = 1  # claim 3: hops gained with extra inference iterations
MARGIN_DROP = 0.1  # claim 4: relative fall of the margin from its peak
ACCURACY_DROP = 0.05  # claim 4: fall of accuracy from its peak
HALTING_TOLERANCE = 0.02  # claim 5: halting accuracy may trail the best fixed count by this much
HALTING_COMPUTE = 0.75  # claim 5: mean iterations <= this x the iteration cap
ANSWERED = 0.5  # claims 4-6: accuracy at which a model "answers" a split / hop count
BRIDGE_RESOLVED = 0.5  # claim 6: share of queries whose bridge entity is resolved
FIXED_POINT_RATIO = 0.1  # claim 6: last-iteration change <= this x the change at iteration 1

RULES = {
    1: f"Final test_inferred_ood accuracy (last evaluation, training iteration count). Reproduced if the best "
       f"looped run (R >= 2) reaches >= {SYSTEMATIC_LOOPED_MIN} while every vanilla run (one iteration: same "
       f"physical depth or iso-FLOP) stays <= {SYSTEMATIC_VANILLA_MAX}; partly if looped - vanilla >= "
       f"{SYSTEMATIC_GAP}; otherwise not reproduced.",
    2: f"Per composition run (looped runs first), with stage thresholds train 0.9, ID 0.9, OOD 0.5 "
       f"(interp.grokking_stages): reproduced if the three stages are reached in order at strictly increasing "
       f"steps and OOD at least {GROKKING_LATE:g}x later than train; partly if train then ID are reached in order; "
       f"otherwise not reproduced. The best run counts.",
    3: f"Answered depth at T iterations = largest k with test accuracy >= the depth threshold (default 0.9, quoted in 'ours') for all hop "
       f"counts 2..k. (a) More inference iterations extend some run's answered depth by >= {DEPTH_EXTENSION} hop "
       f"beyond its training T; (b) the dynamic-R run's reach (best answered depth over T) exceeds every fixed-R "
       f"run's. Reproduced if (a) and (b); partly if one; otherwise not reproduced.",
    4: f"Per looped run, margin and accuracy averaged over the hop counts it answers (accuracy >= {ANSWERED} at "
       f"some iteration count): (a) the margin peaks before the last iteration and ends >= {MARGIN_DROP:g} x "
       f"|peak| below it; (b) accuracy ends >= {ACCURACY_DROP} below its peak. Reproduced if a run shows (a) and "
       f"(b); partly if a run shows one; otherwise (or with no answered hop count) not reproduced.",
    5: f"Per looped run, on its test split, over the hop counts it answers at some fixed count (>= {ANSWERED}): "
       f"(a) KL+entropy halting accuracy >= best fixed-count accuracy - {HALTING_TOLERANCE}; (b) it uses <= "
       f"{HALTING_COMPUTE:g} x the iteration cap on average. Reproduced if (a) and (b); partly if one; otherwise "
       f"(or with no answered hop count) not reproduced.",
    6: f"Looped composition run on test_inferred_id queries, if it answers >= {ANSWERED} of them: (a) logit lens: "
       f"the bridge entity is resolved in >= {BRIDGE_RESOLVED} of queries and earlier (mean depth fraction) than "
       f"the answer; (b) fixed points: the readout state's relative change at the last iteration is <= "
       f"{FIXED_POINT_RATIO:g} x its change at iteration 1. Reproduced if (a) and (b); partly if one; otherwise "
       f"not reproduced.",
}

PAPER = {
    1: "looped R=2/4/8 plateau at ~0.75-0.80 OOD; R=1 ~0.01; 8-layer vanilla (iso-FLOP) 0",
    2: "train saturates first, ID next, OOD jumps much later (R=4: ~2k epochs, R=2: ~7k)",
    3: "learnable depth R4 10, R8 16, dynamic R 22; extra iterations help only for R > 4 (R=6 -> 17, R=8 -> 24 hops)",
    4: "margin rises, peaks and decays over ~50 iterations; lower peak for deeper hops; dynamic R decays slower",
    5: "KL (0.01) + entropy (3.0 nats) halting recovers accuracy lost to overthinking with fewer iterations; "
       "KL alone stops too early",
    6: "logit lens decodes the bridge (first hop) before the answer; patching localises hops over (iteration, "
       "layer, position); iterations converge towards fixed points",
}

TITLES = {
    1: "Systematic (OOD) generalization: looped vs vanilla",
    2: "Three-stage grokking",
    3: "Depth extrapolation with more iterations; dynamic R furthest",
    4: "Overthinking",
    5: "Adaptive halting",
    6: "Mechanism: hop resolution and fixed points",
}
STUDY_OF = {1: "systematic", 2: "grokking", 3: "depth", 4: "overthinking", 5: "halting", 6: "mechanism"}


@dataclass
class ClaimResult:
    claim: int
    title: str
    paper: str
    ours: str
    runs: list[str]
    verdict: str
    rule: str
    details: dict[str, Any] = field(default_factory=dict)


def _both(a: bool, b: bool) -> str:
    return REPRODUCED if a and b else PARTLY if a or b else NOT_REPRODUCED


def best(results: list[tuple[str, Any]]) -> tuple[str, Any]:
    """The (verdict, payload) with the best verdict; the first such on ties."""
    return min(results, key=lambda vr: _RANK[vr[0]])


# ---------------------------------------------------------------------------------------------------
# The rules, as functions of plain numbers
# ---------------------------------------------------------------------------------------------------
def judge_systematic(looped_ood: float | None, vanilla_ood: float | None) -> str:
    """Claim 1 from the best looped and the best vanilla final OOD accuracy."""
    if looped_ood is None or vanilla_ood is None:
        return NOT_MEASURED
    if looped_ood >= SYSTEMATIC_LOOPED_MIN and vanilla_ood <= SYSTEMATIC_VANILLA_MAX:
        return REPRODUCED
    if looped_ood - vanilla_ood >= SYSTEMATIC_GAP:
        return PARTLY
    return NOT_REPRODUCED


def judge_grokking(step_train: int | None, step_id: int | None, step_ood: int | None) -> str:
    """Claim 2 from the first steps at which the train / ID / OOD thresholds are reached (None: never).

    >>> judge_grokking(100, 400, 5000), judge_grokking(100, 400, None), judge_grokking(None, 50, 60)
    ('reproduced', 'partly', 'not reproduced')
    """
    if step_train is None or step_id is None or step_id < step_train:
        return NOT_REPRODUCED
    three = step_ood is not None and step_train < step_id < step_ood
    if three and step_ood >= GROKKING_LATE * max(step_train, 1):
        return REPRODUCED
    return PARTLY


def judge_depth(extensions: list[int | None], dynamic_reach: int | None, fixed_reaches: list[int]) -> str:
    """Claim 3 from every run's extension (hops gained with extra iterations), the dynamic-R run's reach
    and the fixed-R runs' reaches.

    >>> judge_depth([0, 3], 12, [9, 10]), judge_depth([0, 0], 12, [10]), judge_depth([0], None, [4])
    ('reproduced', 'partly', 'not reproduced')
    """
    if not extensions:
        return NOT_MEASURED
    a = any((e or 0) >= DEPTH_EXTENSION for e in extensions)
    b = dynamic_reach is not None and bool(fixed_reaches) and dynamic_reach > max(fixed_reaches)
    return _both(a, b)


def judge_overthinking(peak_margin: float, final_margin: float, peak_iteration: int, max_iterations: int,
                       peak_accuracy: float, final_accuracy: float, answered: bool = True) -> str:
    """Claim 4 for one run (mean curves over its answered hop counts).

    >>> judge_overthinking(8.0, 2.0, 6, 32, 0.99, 0.6), judge_overthinking(8.0, 2.0, 6, 32, 0.99, 0.98)
    ('reproduced', 'partly')
    >>> judge_overthinking(8.0, 8.0, 32, 32, 0.99, 0.99)
    'not reproduced'
    """
    if not answered:
        return NOT_REPRODUCED
    falls = peak_iteration < max_iterations and final_margin <= peak_margin - MARGIN_DROP * abs(peak_margin)
    degrades = peak_accuracy - final_accuracy >= ACCURACY_DROP
    return _both(falls, degrades)


def judge_halting(best_fixed_accuracy: float, halting_accuracy: float, halting_mean_iterations: float,
                  max_iterations: int, answered: bool = True) -> str:
    """Claim 5 for one run.

    >>> judge_halting(0.9, 0.89, 6.0, 32), judge_halting(0.9, 0.7, 6.0, 32), judge_halting(0.9, 0.7, 31.0, 32)
    ('reproduced', 'partly', 'not reproduced')
    """
    if not answered or best_fixed_accuracy < ANSWERED:
        return NOT_REPRODUCED
    recovers = halting_accuracy >= best_fixed_accuracy - HALTING_TOLERANCE
    saves = halting_mean_iterations <= HALTING_COMPUTE * max_iterations
    return _both(recovers, saves)


def judge_mechanism(accuracy: float | None, bridge_resolved: float | None, bridge_depth: float | None,
                    answer_depth: float | None, change_first: float | None, change_last: float | None) -> str:
    """Claim 6 for one looped run.

    >>> judge_mechanism(0.95, 0.9, 0.3, 0.8, 0.5, 0.01), judge_mechanism(0.95, 0.9, 0.3, 0.8, 0.5, 0.4)
    ('reproduced', 'partly')
    >>> judge_mechanism(0.2, 0.9, 0.3, 0.8, 0.5, 0.01)
    'not reproduced'
    """
    if accuracy is None or accuracy < ANSWERED:
        return NOT_REPRODUCED
    lens = (bridge_resolved is not None and bridge_resolved >= BRIDGE_RESOLVED and bridge_depth is not None
            and answer_depth is not None and bridge_depth < answer_depth)
    settles = (change_first is not None and change_last is not None and change_first > 0
               and change_last <= FIXED_POINT_RATIO * change_first)
    return _both(lens, settles)


# ---------------------------------------------------------------------------------------------------
# The numbers, from the studies' findings
# ---------------------------------------------------------------------------------------------------
def _result(n: int, verdict: str, ours: str, runs: list[str], **details: Any) -> ClaimResult:
    return ClaimResult(n, TITLES[n], PAPER[n], ours, runs, verdict, RULES[n], details)


def _not_measured(n: int, why: str) -> ClaimResult:
    return _result(n, NOT_MEASURED, why, [])


def claim_1(f: Mapping[str, Any]) -> ClaimResult:
    runs = f.get("runs", [])
    looped = [r for r in runs if r["kind"] == "looped" and r["final"].get("test_inferred_ood") is not None]
    vanilla = [r for r in runs if r["kind"] == "vanilla" and r["final"].get("test_inferred_ood") is not None]
    if not looped or not vanilla:
        return _not_measured(1, "needs a looped and a vanilla composition run")
    bl = max(looped, key=lambda r: r["final"]["test_inferred_ood"])
    bv = max(vanilla, key=lambda r: r["final"]["test_inferred_ood"])
    lo, va = bl["final"]["test_inferred_ood"], bv["final"]["test_inferred_ood"]
    ours = (f"looped best OOD {fmt(lo)} ({bl['run']}, R={bl['R']}); vanilla best OOD {fmt(va)} ({bv['run']}, "
            f"{bv['virtual_layers']} layer{'s' if bv['virtual_layers'] != 1 else ''})")
    return _result(1, judge_systematic(lo, va), ours, [bl["run"], bv["run"]], looped_ood=lo, vanilla_ood=va)


def claim_2(f: Mapping[str, Any]) -> ClaimResult:
    runs = f.get("runs", [])
    if not runs:
        return _not_measured(2, "needs a composition run with train / ID / OOD evaluations")
    pool = [r for r in runs if r["kind"] == "looped"] or runs
    judged = []
    for r in pool:
        s = r["stages"]
        steps = [s[k]["step"] if s[k]["reached"] else None for k in ("train", "test_id", "test_ood")]
        judged.append((judge_grokking(*steps), (r, steps)))
    verdict, (r, steps) = best(judged)
    names = ("train", "ID", "OOD")
    ours = f"{r['run']}: " + ", ".join(f"{n} at step {s}" if s is not None else f"{n} never"
                                       for n, s in zip(names, steps))
    return _result(2, verdict, ours, [r["run"]], steps=steps)


def claim_3(f: Mapping[str, Any]) -> ClaimResult:
    runs = f.get("runs", [])
    if not runs:
        return _not_measured(3, "needs depth-task runs")
    dyn = [r["reach"] for r in runs if r["recurrence"] == "dynamic"]
    fixed = [r["reach"] for r in runs if r["recurrence"] == "fixed"]
    ext = [r["extension"] for r in runs]
    verdict = judge_depth(ext, max(dyn) if dyn else None, fixed)
    parts = [f"{r['run']}: learnable {fmt(r['learnable_depth'])}, answered {fmt(r['answered_depth_train_T'])} at "
             f"T={r['train_T']}, reach {r['reach']} at T={r['best_T']}" for r in runs]
    thr = f"threshold {fmt(f['threshold'])}: " if f.get("threshold") is not None else ""
    return _result(3, verdict, thr + "; ".join(parts), [r["run"] for r in runs])


def claim_4(f: Mapping[str, Any]) -> ClaimResult:
    runs = f.get("runs", [])
    if not runs:
        return _not_measured(4, "needs a looped run")
    judged = [(judge_overthinking(r["peak_margin"], r["final_margin"], r["peak_iteration"], r["max_iterations"],
                                  r["peak_accuracy"], r["final_accuracy"], answered=bool(r["solved_hops"])), r)
              for r in runs]
    verdict, r = best(judged)
    ours = (f"{r['run']} (hops {r['solved_hops'] or 'none answered'}): margin peak {fmt(r['peak_margin'])} at "
            f"{r['peak_iteration']} -> {fmt(r['final_margin'])} at {r['max_iterations']}; accuracy "
            f"{fmt(r['peak_accuracy'])} -> {fmt(r['final_accuracy'])}")
    return _result(4, verdict, ours, [r["run"]])


def claim_5(f: Mapping[str, Any]) -> ClaimResult:
    runs = f.get("runs", [])
    if not runs:
        return _not_measured(5, "needs a looped run")
    judged = [(judge_halting(r["best_fixed_accuracy"], r["kl_entropy_accuracy"], r["kl_entropy_mean_iterations"],
                             r["max_iterations"], answered=bool(r["solved_hops"])), r) for r in runs]
    verdict, r = best(judged)
    ours = (f"{r['run']} on {r['split']} (hops {r['solved_hops'] or 'none answered'}): best fixed T={r['best_fixed_T']} {fmt(r['best_fixed_accuracy'])}, "
            f"T={r['max_iterations']} {fmt(r['fixed_max_accuracy'])}; KL+entropy {fmt(r['kl_entropy_accuracy'])} "
            f"with {fmt(r['kl_entropy_mean_iterations'], 1)} iterations; KL only {fmt(r['kl_accuracy'])} with "
            f"{fmt(r['kl_mean_iterations'], 1)}")
    return _result(5, verdict, ours, [r["run"]])


def claim_6(f: Mapping[str, Any]) -> ClaimResult:
    split = f.get("primary_split", "test_inferred_id")
    looped = [r for r in f.get("runs", []) if r["kind"] == "looped" and split in r["splits"]]
    if not looped:
        return _not_measured(6, "needs a looped composition run")
    judged = []
    for r in looped:
        s = r["splits"][split]
        fp = r.get("fixed_point", {})
        judged.append((judge_mechanism(s["accuracy"], s["bridge_resolved"], s["bridge_depth"], s["answer_depth"],
                                       fp.get("change_first"), fp.get("change_last")), r))
    verdict, r = best(judged)
    s, fp = r["splits"][split], r.get("fixed_point", {})
    ours = (f"{r['run']} on {split}: accuracy {fmt(s['accuracy'])}; bridge resolved {fmt(s['bridge_resolved'])} at "
            f"depth {fmt(s['bridge_depth'])} vs answer {fmt(s['answer_resolved'])} at {fmt(s['answer_depth'])}; state "
            f"change {fmt(fp.get('change_first'), 3)} -> {fmt(fp.get('change_last'), 4)}")
    vanilla = [v for v in f.get("runs", []) if v["kind"] == "vanilla" and split in v["splits"]]
    if vanilla:
        v = vanilla[0]["splits"][split]
        ours += f"; vanilla ({vanilla[0]['run']}): bridge {fmt(v['bridge_resolved'])}, answer {fmt(v['answer_resolved'])}"
    return _result(6, verdict, ours, [r["run"]] + [v["run"] for v in vanilla[:1]])


CLAIMS: dict[int, Callable[[Mapping[str, Any]], ClaimResult]] = {
    1: claim_1, 2: claim_2, 3: claim_3, 4: claim_4, 5: claim_5, 6: claim_6,
}


def judge_claims(findings: Mapping[str, Mapping[str, Any]]) -> list[ClaimResult]:
    """Verdicts on claims 1-6 from ``{study name: findings}`` (a StudyResult's ``findings``; a study
    missing from the mapping gives "not measured")."""
    out = []
    for n, fn in CLAIMS.items():
        study = STUDY_OF[n]
        if study not in findings:
            out.append(_not_measured(n, f"study {study} did not run"))
        else:
            out.append(fn(findings[study]))
    return out
