"""Verdicts on PAPER.md's claims 1-6, decided by stated rules from the studies' numbers, never by hand.

Each claim has a ``judge_*`` function of a few plain numbers (tested both ways with fabricated values)
and a ``claim_*`` function that picks those numbers out of the studies' findings. A verdict is one of
``reproduced``, ``reproduced with modifications``, ``partly``, ``not reproduced``, ``not testable on these
runs`` (the runs cannot show it; the row says why) or ``not measured`` (the study did not run or had no
suitable run). Where several runs qualify, each is judged and the best verdict counts; the summary
names that run.

``reproduced`` also needs the paper's model, loss and world (:func:`run_differences`): the whole stack
looped, no readout feedback, the answer-only loss at the final iteration, softmax cross-entropy, and the
paper's world type for the task (random-tail for composition, permutation for depth). A run that differs
there gets ``reproduced with modifications``; smaller worlds, fewer steps and other recipe values are
allowed and listed in the row's ``differences``. Without run configs (``configs=None``) the differences
are not checked and the row says so; the report and ``looplens reproduce`` always pass them.

>>> judge_systematic(0.78, 0.01), judge_systematic(0.3, 0.05), judge_systematic(0.02, 0.0)
('reproduced', 'partly', 'not reproduced')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from looplens.analyses.studies.base import fmt

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_MEASURED = "reproduced", "partly", "not reproduced", "not measured"
REPRODUCED_MODIFIED, NOT_TESTABLE = "reproduced with modifications", "not testable on these runs"
VERDICTS = (REPRODUCED, REPRODUCED_MODIFIED, PARTLY, NOT_REPRODUCED, NOT_TESTABLE, NOT_MEASURED)
_RANK = {REPRODUCED: 0, REPRODUCED_MODIFIED: 1, PARTLY: 2, NOT_REPRODUCED: 3, NOT_TESTABLE: 4, NOT_MEASURED: 5}

# --- thresholds of the rules (each rule's text below quotes them) -----------------------------------
SYSTEMATIC_LOOPED_MIN = 0.5  # claim 1: looped OOD accuracy that counts as "answers OOD queries"
SYSTEMATIC_VANILLA_MAX = 0.1  # claim 1: vanilla OOD accuracy that counts as "does not"
SYSTEMATIC_GAP = 0.1  # claim 1, partly: looped minus vanilla
GROKKING_LATE = 2.0  # claim 2: OOD stage step >= this x the ID stage step ("long after")
DEPTH_EXTENSION = 1  # claim 3: hops gained with extra inference iterations
MARGIN_DROP = 0.1  # claim 4: relative fall of the margin from its peak
ACCURACY_DROP = 0.05  # claim 4: fall of accuracy from its peak
HALTING_TOLERANCE = 0.02  # claim 5: halting accuracy may trail the best fixed count by this much
HALTING_COMPUTE = 0.75  # claim 5: mean iterations <= this x the iteration cap
OVERTHINKING_LOSS = 0.02  # claim 5: accuracy lost at the iteration cap below which halting has nothing to recover
ANSWERED = 0.5  # claims 4-6: accuracy at which a model "answers" a split / hop count
BRIDGE_RESOLVED = 0.5  # claim 6: share of queries whose bridge entity is resolved
FIXED_POINT_RATIO = 0.1  # claim 6: last-iteration change <= this x the change at iteration 1

RULES = {
    1: f"Final test_inferred_ood accuracy (last evaluation, training iteration count), per looped run (R >= 2) "
       f"against the vanilla runs (one iteration) that share every setting of the looped run that applies to one "
       f"iteration (all but the iteration count, block count, readout feedback, input injection, intermediate "
       f"supervision and recurrence sampling); with no such vanilla run: not testable on these runs. Reproduced if "
       f"the looped run reaches >= {SYSTEMATIC_LOOPED_MIN} while the vanilla stays <= {SYSTEMATIC_VANILLA_MAX}; partly "
       f"if looped - vanilla >= {SYSTEMATIC_GAP}; otherwise not reproduced. The row names what the looped run has that "
       f"a one-iteration model cannot.",
    2: f"Per composition run (looped runs first), with stage thresholds train 0.9, ID 0.9, OOD 0.5 "
       f"(interp.grokking_stages), each stage at the first evaluation step that crosses it: reproduced if the three "
       f"are crossed at three distinct steps in order (train < ID < OOD; the same step is not in order) and OOD at "
       f"least {GROKKING_LATE:g}x later than ID; partly if one of the two transitions is shown (train < ID, or "
       f"OOD >= {GROKKING_LATE:g}x ID); otherwise not reproduced. The best run counts.",
    3: f"Answered depth at T iterations = largest k with test accuracy >= the depth threshold (default 0.9, quoted in 'ours') for all hop "
       f"counts 2..k. (a) More inference iterations extend some run's answered depth by >= {DEPTH_EXTENSION} hop "
       f"beyond its training T; (b) the dynamic-R run's reach (best answered depth over T) exceeds every fixed-R "
       f"run's. Reproduced if (a) and (b); partly if one; otherwise not reproduced.",
    4: f"Per looped run, margin and accuracy averaged over the hop counts it answers (accuracy >= {ANSWERED} at "
       f"some iteration count): (a) the margin peaks before the last iteration and ends >= {MARGIN_DROP:g} x "
       f"|peak| below it; (b) accuracy ends >= {ACCURACY_DROP} below its peak. Reproduced if a run shows (a) and "
       f"(b); partly if a run shows one; otherwise (or with no answered hop count) not reproduced.",
    5: f"Per looped run, on its test split, over the hop counts it answers at some fixed count (>= {ANSWERED}). "
       f"The paper's point needs accuracy lost to overthinking: if accuracy at the iteration cap is within "
       f"{OVERTHINKING_LOSS} of the best fixed count, not testable on these runs. Else (a) KL+entropy halting "
       f"accuracy >= best fixed-count accuracy - {HALTING_TOLERANCE} (it recovers the loss); (b) it uses <= "
       f"{HALTING_COMPUTE:g} x the iteration cap on average; (c) KL-only halting stops earlier and ends >= "
       f"{HALTING_TOLERANCE} below KL+entropy. Reproduced if (a), (b) and (c); partly if (a) or (b); otherwise not "
       f"reproduced.",
    6: f"Looped composition run on test_inferred_id queries, if it answers >= {ANSWERED} of them: (a) logit lens: "
       f"the bridge entity is resolved in >= {BRIDGE_RESOLVED} of queries and earlier (mean depth fraction) than "
       f"the answer; not counted for runs trained with intermediate supervision or readout feedback (their loss "
       f"builds it in); (b) patching (head corrupted, resid_pre at each iteration's first block): the position "
       f"restoring most is a first-hop position (before the readout) at the start of some iteration t >= 1 and the "
       f"readout position at a later one; (c) fixed points: the readout state's relative change at the last "
       f"iteration is <= {FIXED_POINT_RATIO:g} x its change at iteration 1. Reproduced if (a), (b) and (c); partly "
       f"if one or two; otherwise not reproduced.",
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
    differences: list[str] = field(default_factory=list)  # the judged runs' differences from the paper


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
    """Claim 2 from the first evaluation steps at which the train / ID / OOD thresholds are crossed (None:
    never). The same step for two stages is not "in order".

    >>> judge_grokking(100, 400, 5000), judge_grokking(100, 400, None), judge_grokking(None, 50, 60)
    ('reproduced', 'partly', 'not reproduced')
    >>> judge_grokking(1000, 1000, 2500), judge_grokking(100, 400, 700), judge_grokking(1000, 1000, 1500)
    ('partly', 'partly', 'not reproduced')
    """
    if step_train is None or step_id is None or step_id < step_train:  # ID before train: not the claim's order
        return NOT_REPRODUCED
    memorised_first = step_train < step_id
    late_ood = step_ood is not None and step_ood > step_id and step_ood >= GROKKING_LATE * max(step_id, 1)
    if memorised_first and late_ood:
        return REPRODUCED
    return PARTLY if memorised_first or late_ood else NOT_REPRODUCED


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
                  max_iterations: int, answered: bool = True, *, fixed_max_accuracy: float | None = None,
                  kl_accuracy: float | None = None, kl_mean_iterations: float | None = None) -> str:
    """Claim 5 for one run: halting must recover accuracy lost to overthinking at the iteration cap
    (``fixed_max_accuracy``), with fewer iterations, and KL-only halting must stop too early.

    >>> judge_halting(0.9, 0.89, 6.0, 32, fixed_max_accuracy=0.5, kl_accuracy=0.6, kl_mean_iterations=2.0)
    'reproduced'
    >>> judge_halting(0.9, 0.89, 6.0, 32, fixed_max_accuracy=0.5, kl_accuracy=0.9, kl_mean_iterations=6.0)
    'partly'
    >>> judge_halting(0.9, 0.89, 6.0, 32, fixed_max_accuracy=0.9)
    'not testable on these runs'
    >>> judge_halting(0.9, 0.7, 31.0, 32, fixed_max_accuracy=0.5)
    'not reproduced'
    """
    if not answered or best_fixed_accuracy < ANSWERED:
        return NOT_REPRODUCED
    if fixed_max_accuracy is None or best_fixed_accuracy - fixed_max_accuracy < OVERTHINKING_LOSS:
        return NOT_TESTABLE  # nothing lost at the cap: halting has nothing to recover
    recovers = halting_accuracy >= best_fixed_accuracy - HALTING_TOLERANCE
    saves = halting_mean_iterations <= HALTING_COMPUTE * max_iterations
    kl_early = (kl_accuracy is not None and kl_mean_iterations is not None
                and kl_mean_iterations < halting_mean_iterations and kl_accuracy <= halting_accuracy - HALTING_TOLERANCE)
    if recovers and saves and kl_early:
        return REPRODUCED
    return PARTLY if recovers or saves else NOT_REPRODUCED


def patching_moves(positions: list[int] | None, readout: int | None) -> bool:
    """Claim 6 (b): the best patched position is a first-hop position (< readout) at the start of some
    iteration t >= 1 and the readout position at a later iteration.

    >>> patching_moves([0, 1, 2, 2], 2), patching_moves([0, 2, 2, 2], 2), patching_moves([0], 2)
    (True, False, False)
    """
    if not positions or readout is None:
        return False
    for t in range(1, len(positions)):
        if positions[t] < readout and readout in positions[t + 1:]:
            return True
    return False


def judge_mechanism(accuracy: float | None, bridge_resolved: float | None, bridge_depth: float | None,
                    answer_depth: float | None, change_first: float | None, change_last: float | None,
                    patch_positions: list[int] | None = None, readout_position: int | None = None,
                    built_in: bool = False) -> str:
    """Claim 6 for one looped run. ``built_in``: the run's loss builds the lens evidence in (intermediate
    supervision or readout feedback), so the lens does not count.

    >>> judge_mechanism(0.95, 0.9, 0.3, 0.8, 0.5, 0.01, [0, 1, 2], 2), judge_mechanism(0.95, 0.9, 0.3, 0.8, 0.5, 0.01)
    ('reproduced', 'partly')
    >>> judge_mechanism(0.95, 0.9, 0.3, 0.8, 0.5, 0.01, [0, 1, 2], 2, built_in=True)
    'partly'
    >>> judge_mechanism(0.2, 0.9, 0.3, 0.8, 0.5, 0.01, [0, 1, 2], 2)
    'not reproduced'
    """
    if accuracy is None or accuracy < ANSWERED:
        return NOT_REPRODUCED
    lens = (not built_in and bridge_resolved is not None and bridge_resolved >= BRIDGE_RESOLVED
            and bridge_depth is not None and answer_depth is not None and bridge_depth < answer_depth)
    moves = patching_moves(patch_positions, readout_position)
    settles = (change_first is not None and change_last is not None and change_first > 0
               and change_last <= FIXED_POINT_RATIO * change_first)
    if lens and moves and settles:
        return REPRODUCED
    return PARTLY if lens or moves or settles else NOT_REPRODUCED


# ---------------------------------------------------------------------------------------------------
# Differences from the paper's model, task and recipe
# ---------------------------------------------------------------------------------------------------
PAPER_WORLD = {"composition": "random-tail", "depth": "permutation"}
PAPER_PRESETS = {"composition": ("paper-composition", "paper-composition-code"),
                 "depth": ("paper-depth", "paper-depth-r8", "paper-depth-dynamic")}
# the paper's vanilla baselines: 4 or 8 layers (composition), 8 / 16 / 24 layers (depth); looped: 4 blocks
PAPER_VANILLA_BLOCKS = {"composition": (4, 8), "depth": (8, 16, 24)}
# settings compared with the paper presets (their differences are listed, they do not block "reproduced")
_RECIPE_KEYS = {
    "composition": ("data.n_entities", "data.n_relations", "data.out_degree", "data.ood_fraction", "data.phi"),
    "depth": ("data.n_entities", "data.n_relations", "data.max_hops", "data.per_hop_train", "curriculum.enabled",
              "curriculum.threshold"),
}
_COMMON_KEYS = ("model.d_model", "model.n_heads", "model.d_head", "model.d_mlp", "model.act_fn", "model.positional",
                "model.ln_eps", "model.dropout", "model.embed_dropout", "model.init_std", "model.embed_init_std",
                "model.zero_init_out", "model.tie_embeddings", "model.unembed_bias", "optim.lr", "optim.betas",
                "optim.eps", "optim.weight_decay", "optim.no_decay", "optim.batch_size", "optim.warmup_steps",
                "optim.schedule", "optim.label_smoothing", "optim.grad_clip", "optim.atomic_share",
                "optim.grokfast_lambda", "optim.orthograd", "recurrence.mode", "recurrence.backprop_last")
# settings a one-iteration model cannot have (claim 1's vanilla need not share them)
LOOP_ONLY = ("model.n_iterations", "model.n_blocks", "model.feedback", "model.input_injection",
             "recurrence.supervise", "recurrence.mode", "recurrence.mean", "recurrence.min", "recurrence.max",
             "recurrence.sigma", "recurrence.backprop_last", "model.seed")
_DERIVED = ("model.d_head", "model.d_mlp", "model.embed_dropout")
_LOOP_ONLY_LABELS = {"model.feedback": "readout feedback", "recurrence.supervise": "intermediate supervision",
                     "model.input_injection": "input injection", "recurrence.mode": "sampled iteration counts",
                     "recurrence.backprop_last": "truncated backprop"}


@dataclass
class Differences:
    """A run's differences from the paper: ``core`` (model, loss, world type: these block "reproduced")
    and ``other`` (sizes, steps, recipe values: listed). ``known`` False: no config to compare."""

    core: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    known: bool = True

    def text(self) -> str:
        if not self.known:
            return "run config not given (differences not checked)"
        parts = []
        if self.core:
            parts.append("model/loss/world: " + ", ".join(self.core))
        if self.other:
            parts.append("sizes/recipe: " + ", ".join(self.other))
        return "; ".join(parts) or "none"


def _as_config(config: Any):
    from looplens.models.train.config import TrainConfig

    return config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))


def _effective(cfg: Any, key: str) -> Any:
    """A config value with its None defaults resolved (d_head, d_mlp, embed_dropout, embed_init_std)."""
    m = cfg.model
    if key == "model.d_head":
        return m.d_head or m.d_model // m.n_heads
    if key == "model.d_mlp":
        return m.d_mlp or 4 * m.d_model
    if key == "model.embed_dropout":
        return m.dropout if m.embed_dropout is None else m.embed_dropout
    if key == "model.embed_init_std":
        return m.init_std if m.embed_init_std is None else m.embed_init_std
    value = cfg.get(key)
    if key == "optim.no_decay":
        return sorted(value)
    if key == "optim.grad_clip" and not value:
        return None
    if key == "optim.decay_steps":
        return None
    return list(value) if isinstance(value, tuple) else value


def _short_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _paper_references(task: str) -> list:
    from looplens.models.train.presets import preset

    return [preset(name) for name in PAPER_PRESETS[task]]


def run_differences(config: Any) -> Differences:
    """The run's differences from the paper's model, task and recipe for its task (docs/analyses.md).

    Core (they make a "reproduced" verdict "reproduced with modifications"): readout feedback, intermediate
    supervision, blocks outside the loop (prelude / coda), input injection, a loss other than softmax
    cross-entropy, another world type. Listed: world sizes, model size, init, dropout, optimiser values,
    weight decay and its scope, batch composition, steps fewer than the paper's, ...
    """
    if config is None:
        return Differences(known=False)
    cfg = _as_config(config)
    task = cfg.data.task
    diff = Differences()
    m = cfg.model
    looped = cfg.train_iterations > 1 or cfg.recurrence.mode != "fixed"
    # feedback and per-iteration supervision act between iterations: inert in a one-iteration model
    if m.feedback and looped:
        diff.core.append(f"readout feedback (model.feedback={_short_value(m.feedback)})")
    if cfg.recurrence.supervise != "last" and looped:
        diff.core.append(f"intermediate supervision (recurrence.supervise={cfg.recurrence.supervise})")
    if m.n_prelude or m.n_coda:
        diff.core.append(f"blocks outside the loop (prelude {m.n_prelude}, coda {m.n_coda})")
    if m.input_injection != "none" and looped:
        diff.core.append(f"input injection ({m.input_injection})")
    if cfg.optim.loss != "softmax":
        diff.core.append(f"loss {cfg.optim.loss} (paper softmax cross-entropy)")
    if cfg.data.world != PAPER_WORLD[task]:
        diff.core.append(f"world {cfg.data.world} (paper {PAPER_WORLD[task]})")
    refs = _paper_references(task)
    for key in (*_RECIPE_KEYS[task], *_COMMON_KEYS):
        if getattr(m, key.removeprefix("model."), 0) is None and key in _DERIVED:
            continue  # follows another setting (d_head, d_mlp from d_model; embed_dropout from dropout)
        mine = _effective(cfg, key)
        paper = []
        for ref in refs:
            value = _effective(ref, key)
            if value not in paper:
                paper.append(value)
        if mine not in paper:
            diff.other.append(f"{key}={_short_value(mine)} (paper {' or '.join(_short_value(v) for v in paper)})")
    blocks = (4,) if looped else PAPER_VANILLA_BLOCKS[task]
    if m.n_blocks not in blocks:
        diff.other.append(f"model.n_blocks={m.n_blocks} (paper {' or '.join(map(str, blocks))})")
    paper_steps = min(ref.run.max_steps for ref in refs)
    if cfg.run.max_steps < paper_steps:
        diff.other.append(f"steps {cfg.run.max_steps:,} (paper presets {paper_steps:,}+)")
    return diff


def applicable_differences(looped: Any, vanilla: Any) -> list[str]:
    """Settings in which a vanilla run differs from a looped one, among those a one-iteration model can have
    (claim 1: the vanilla baseline must share every modification that applies to it)."""
    a, b = _as_config(looped), _as_config(vanilla)
    return [key for key in a.differences(b)
            if key == "run.max_steps" or (key not in LOOP_ONLY and not key.startswith(("eval.", "run.")))]


def loop_only_modifications(config: Any) -> list[str]:
    """The modifications of a looped run that a one-iteration model cannot have."""
    cfg = _as_config(config)
    out = []
    for key, label in _LOOP_ONLY_LABELS.items():
        value = cfg.get(key)
        default = {"model.feedback": 0.0, "recurrence.supervise": "last", "model.input_injection": "none",
                   "recurrence.mode": "fixed", "recurrence.backprop_last": None}[key]
        if value != default:
            out.append(f"{label} ({key}={_short_value(value)})")
    return out


def _with_fidelity(result: ClaimResult, configs: Mapping[str, Any] | None) -> ClaimResult:
    """Fill the row's differences from the judged runs' configs; a "reproduced" verdict on runs with a core
    difference becomes "reproduced with modifications"."""
    diffs = {name: run_differences(None if configs is None else configs.get(name)) for name in result.runs}
    grouped: dict[str, list[str]] = {}  # runs with the same differences share one entry
    for name, d in diffs.items():
        grouped.setdefault(d.text(), []).append(name)
    result.differences = [f"{', '.join(names)}: {text}" for text, names in grouped.items()]
    if result.verdict == REPRODUCED and any(d.core for d in diffs.values()):
        result.verdict = REPRODUCED_MODIFIED
    return result


# ---------------------------------------------------------------------------------------------------
# The numbers, from the studies' findings
# ---------------------------------------------------------------------------------------------------
def _result(n: int, verdict: str, ours: str, runs: list[str], **details: Any) -> ClaimResult:
    return ClaimResult(n, TITLES[n], PAPER[n], ours, runs, verdict, RULES[n], details)


def _not_measured(n: int, why: str) -> ClaimResult:
    return _result(n, NOT_MEASURED, why, [])


def claim_1(f: Mapping[str, Any], configs: Mapping[str, Any] | None = None) -> ClaimResult:
    runs = f.get("runs", [])
    looped = [r for r in runs if r["kind"] == "looped" and r["final"].get("test_inferred_ood") is not None]
    vanilla = [r for r in runs if r["kind"] == "vanilla" and r["final"].get("test_inferred_ood") is not None]
    if not looped or not vanilla:
        return _not_measured(1, "needs a looped and a vanilla composition run")
    judged, untestable = [], []
    for lr in looped:
        fair = vanilla
        if configs is not None and configs.get(lr["run"]) is not None:
            fair = [v for v in vanilla if configs.get(v["run"]) is not None
                    and not applicable_differences(configs[lr["run"]], configs[v["run"]])]
            for v in vanilla:
                if v not in fair:
                    missing = (applicable_differences(configs[lr["run"]], configs[v["run"]])
                               if configs.get(v["run"]) is not None else ["its config"])
                    untestable.append(f"vanilla {v['run']} differs from looped {lr['run']} in {', '.join(missing)}")
        if not fair:
            continue
        bv = max(fair, key=lambda r: r["final"]["test_inferred_ood"])
        lo, va = lr["final"]["test_inferred_ood"], bv["final"]["test_inferred_ood"]
        judged.append((judge_systematic(lo, va), (lr, bv, lo, va)))
    if not judged:
        result = _result(1, NOT_TESTABLE, "no vanilla run shares the looped runs' settings that apply to one "
                         "iteration: " + "; ".join(untestable), [r["run"] for r in looped + vanilla])
        return _with_fidelity(result, configs)
    verdict, (bl, bv, lo, va) = best(judged)
    ours = (f"looped OOD {fmt(lo)} ({bl['run']}, R={bl['R']}); vanilla OOD {fmt(va)} ({bv['run']}, "
            f"{bv['virtual_layers']} layer{'s' if bv['virtual_layers'] != 1 else ''})")
    if configs is not None and configs.get(bl["run"]) is not None:
        only = loop_only_modifications(configs[bl["run"]])
        ours += ("; the vanilla shares every setting that applies to one iteration"
                 + (f"; the looped run also has what one iteration cannot: {', '.join(only)}" if only else ""))
    result = _result(1, verdict, ours, [bl["run"], bv["run"]], looped_ood=lo, vanilla_ood=va)
    return _with_fidelity(result, configs)


def claim_2(f: Mapping[str, Any], configs: Mapping[str, Any] | None = None) -> ClaimResult:
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
    if steps[0] is not None and steps[0] == steps[1]:
        ours += " (train and ID at the same evaluation: no memorisation stage seen)"
    return _with_fidelity(_result(2, verdict, ours, [r["run"]], steps=steps), configs)


def claim_3(f: Mapping[str, Any], configs: Mapping[str, Any] | None = None) -> ClaimResult:
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
    return _with_fidelity(_result(3, verdict, thr + "; ".join(parts), [r["run"] for r in runs]), configs)


def claim_4(f: Mapping[str, Any], configs: Mapping[str, Any] | None = None) -> ClaimResult:
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
    return _with_fidelity(_result(4, verdict, ours, [r["run"]]), configs)


def claim_5(f: Mapping[str, Any], configs: Mapping[str, Any] | None = None) -> ClaimResult:
    runs = f.get("runs", [])
    if not runs:
        return _not_measured(5, "needs a looped run")
    judged = [(judge_halting(r["best_fixed_accuracy"], r["kl_entropy_accuracy"], r["kl_entropy_mean_iterations"],
                             r["max_iterations"], answered=bool(r["solved_hops"]),
                             fixed_max_accuracy=r.get("fixed_max_accuracy"), kl_accuracy=r.get("kl_accuracy"),
                             kl_mean_iterations=r.get("kl_mean_iterations")), r) for r in runs]
    verdict, r = best(judged)
    ours = (f"{r['run']} on {r['split']} (hops {r['solved_hops'] or 'none answered'}): best fixed T={r['best_fixed_T']} {fmt(r['best_fixed_accuracy'])}, "
            f"T={r['max_iterations']} {fmt(r['fixed_max_accuracy'])}; KL+entropy {fmt(r['kl_entropy_accuracy'])} "
            f"with {fmt(r['kl_entropy_mean_iterations'], 1)} iterations; KL only {fmt(r['kl_accuracy'])} with "
            f"{fmt(r['kl_mean_iterations'], 1)}")
    if verdict == NOT_TESTABLE:
        ours += (f"; no accuracy lost at T={r['max_iterations']} (within {OVERTHINKING_LOSS}), so halting has "
                 "nothing to recover")
    return _with_fidelity(_result(5, verdict, ours, [r["run"]]), configs)


def _built_in(config: Any) -> list[str]:
    """What in a run's loss builds claim 6's lens evidence in: intermediate supervision, readout feedback."""
    if config is None:
        return []
    cfg = _as_config(config)
    out = []
    if cfg.recurrence.supervise != "last":
        out.append(f"intermediate supervision ({cfg.recurrence.supervise})")
    if cfg.model.feedback:
        out.append("readout feedback")
    return out


def claim_6(f: Mapping[str, Any], configs: Mapping[str, Any] | None = None) -> ClaimResult:
    split = f.get("primary_split", "test_inferred_id")
    looped = [r for r in f.get("runs", []) if r["kind"] == "looped" and split in r["splits"]]
    if not looped:
        return _not_measured(6, "needs a looped composition run")
    judged = []
    for r in looped:
        s = r["splits"][split]
        fp = r.get("fixed_point", {})
        head = r.get("patching", {}).get("head", {})
        built_in = _built_in(None if configs is None else configs.get(r["run"]))
        judged.append((judge_mechanism(s["accuracy"], s["bridge_resolved"], s["bridge_depth"], s["answer_depth"],
                                       fp.get("change_first"), fp.get("change_last"),
                                       head.get("best_position_by_iteration"), head.get("readout_position"),
                                       built_in=bool(built_in)), (r, built_in)))
    verdict, (r, built_in) = best(judged)
    s, fp = r["splits"][split], r.get("fixed_point", {})
    head = r.get("patching", {}).get("head", {})
    positions = head.get("best_position_by_iteration")
    ours = (f"{r['run']} on {split}: accuracy {fmt(s['accuracy'])}; bridge resolved {fmt(s['bridge_resolved'])} at "
            f"depth {fmt(s['bridge_depth'])} vs answer {fmt(s['answer_resolved'])} at {fmt(s['answer_depth'])}"
            + (f" (built in by its loss: {', '.join(built_in)}; not counted)" if built_in else "")
            + "; head-corruption patching, best position per iteration "
            + (f"{positions} (readout {head.get('readout_position')}): "
               f"{'moves from a first-hop position to the readout' if patching_moves(positions, head.get('readout_position')) else 'no move across iterations'}"
               if positions else "not in the findings")
            + f"; state change {fmt(fp.get('change_first'), 3)} -> {fmt(fp.get('change_last'), 4)}")
    vanilla = [v for v in f.get("runs", []) if v["kind"] == "vanilla" and split in v["splits"]]
    if vanilla:
        v = vanilla[0]["splits"][split]
        ours += f"; vanilla ({vanilla[0]['run']}): bridge {fmt(v['bridge_resolved'])}, answer {fmt(v['answer_resolved'])}"
    result = _result(6, verdict, ours, [r["run"]] + [v["run"] for v in vanilla[:1]])
    return _with_fidelity(result, configs)


CLAIMS: dict[int, Callable[..., ClaimResult]] = {
    1: claim_1, 2: claim_2, 3: claim_3, 4: claim_4, 5: claim_5, 6: claim_6,
}


def judge_claims(findings: Mapping[str, Mapping[str, Any]], configs: Mapping[str, Any] | None = None
                 ) -> list[ClaimResult]:
    """Verdicts on claims 1-6 from ``{study name: findings}`` (a StudyResult's ``findings``; a study
    missing from the mapping gives "not measured"). ``configs``: ``{run name: TrainConfig or its dict}``,
    for each row's differences from the paper (None: not checked, and the rows say so)."""
    out = []
    for n, fn in CLAIMS.items():
        study = STUDY_OF[n]
        if study not in findings:
            out.append(_not_measured(n, f"study {study} did not run"))
        else:
            out.append(fn(findings[study], configs))
    return out


def run_configs(runs: Any) -> dict[str, Any]:
    """``{run name: TrainConfig}`` of models.train Run objects (for :func:`judge_claims`)."""
    return {run.name: run.config for run in runs}


def claims_table(claims: Any) -> Any:
    """tables/claims.csv: claim, verdict, runs, differences (one row per claim)."""
    import pandas as pd

    return pd.DataFrame([{"claim": c.claim, "verdict": c.verdict, "runs": ", ".join(c.runs),
                          "differences": " | ".join(c.differences)} for c in claims])
