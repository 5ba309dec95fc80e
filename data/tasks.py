"""The two tasks of the paper, as pure functions ``(world, config) -> splits``. Nothing here touches disk.

Composition (paper section 5, GrokkedTransformer's recipe):
    atomic facts are split per fact into ID and OOD; a 2-hop fact (h, r1, r2) -> t through bridge b is
    "trainable" when both of its atomic facts are ID. Trainable facts give the train compositions (after
    holding out ``test_id_fraction`` as the ID test); facts whose two hops are both OOD give the OOD test.
Depth (paper section 6, Loop-Think-Generalize's recipe):
    for every k = 2..max_hops, unique k-hop chains split into train and test.

Everything is vectorised: a 2-hop fact is addressed by its rank within its category, so sampling never
materialises all 2-hop facts (800,000 at paper scale, 80 million in a 2000 x 200 permutation world).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from looplens.data.config import DataConfig
from looplens.data.facts import Facts
from looplens.data.sampling import rng_for, sample_rows, sample_without_replacement
from looplens.data.worlds import World, make_world

COMPOSITION_SPLITS = (
    "train",
    "id_atomic",
    "ood_atomic",
    "train_inferred",
    "test_inferred_id",
    "test_inferred_ood",
    "test_inferred_first_ood",
    "test_inferred_second_ood",
)
DEPTH_SPLITS = ("train", "test", "train_eval")
# Evaluation splits that are, by design, samples of "train" (all other splits are disjoint from it).
TRAIN_SAMPLES = frozenset({"id_atomic", "ood_atomic", "train_inferred", "train_eval"})

# Enumerate every k-hop chain (instead of rejection sampling) when there are at most this many, or
# when the request is a large share of them (rejection would then need many rounds).
_ENUMERATE_LIMIT = 1_000_000


@dataclass
class Generated:
    """What a task produced: the world, the splits in canonical order, and population counts."""

    world: World
    splits: dict[str, Facts]
    counts: dict = field(default_factory=dict)
    max_hops: int = 2
    ood_atomic: Facts | None = None  # composition: every OOD atomic fact (the split only holds a sample)


def generate(cfg: DataConfig) -> Generated:
    """Build the world and every split of ``cfg`` in memory (deterministic in ``cfg``)."""
    world = make_world(cfg.world, cfg.n_entities, cfg.n_relations, cfg.out_degree, cfg.seed)
    if cfg.task == "composition":
        return composition_splits(world, cfg)
    return depth_splits(world, cfg)


# ----------------------------------------------------------------------------------------------
# composition


class _TwoHopIndex:
    """Addresses the 2-hop facts of one (first-hop status, second-hop status) category by rank.

    Ranks run over first facts in (head, relation) order, then over the bridge's second facts of the
    wanted status in relation order, so sorted ranks give rows in canonical order.
    """

    def __init__(self, world: World, ood: np.ndarray, first_ood: bool, second_ood: bool) -> None:
        self.fh, self.fr, self.ft = world.facts()
        status = ood.astype(np.int64)
        # atomic facts grouped by (head, status), relation order inside a group
        self.by_group = np.lexsort((self.fr, status, self.fh))
        group = self.fh * 2 + status
        size = np.bincount(group, minlength=2 * world.n_entities)
        self.group_start = np.cumsum(size) - size
        self.second = int(second_ood)
        self.first = np.flatnonzero(status == int(first_ood))
        self.fanout = size[self.ft[self.first] * 2 + self.second]  # 2-hop facts per first fact
        self.cum = np.cumsum(self.fanout)
        self.total = int(self.cum[-1]) if len(self.cum) else 0

    def facts(self, ranks: np.ndarray) -> Facts:
        ranks = np.asarray(ranks, dtype=np.int64)
        i = np.searchsorted(self.cum, ranks, side="right")
        within = ranks - (self.cum[i] - self.fanout[i])
        first = self.first[i]
        second = self.by_group[self.group_start[self.ft[first] * 2 + self.second] + within]
        relations = np.stack([self.fr[first], self.fr[second]], axis=1)
        return Facts(self.fh[first], relations, np.full(len(ranks), 2, np.int64), self.ft[second],
                     self.ft[first][:, None].copy())


def composition_splits(world: World, cfg: DataConfig) -> Generated:
    """Paper section 5. Departures from GrokkedTransformer's notebook (all deliberate):

    - OOD atomic facts: exactly ``round(ood_fraction * |atomic|)`` (as the notebook); the ID test is
      exactly ``round(test_id_fraction * |trainable|)`` facts, not a Bernoulli(0.005) draw per fact,
      so split sizes are a function of the config alone.
    - 2-hop facts with one OOD hop are kept as diagnostic splits (first / second hop OOD), not dropped:
      reporting them separately is what shows where a model fails.
    """
    rng_ood = rng_for(cfg.seed, "composition/ood")
    atomic = Facts.atomic(world)
    n_atomic = len(atomic)
    n_ood = round(cfg.ood_fraction * n_atomic)
    ood = np.zeros(n_atomic, dtype=bool)
    ood[sample_without_replacement(rng_ood, n_atomic, n_ood)] = True

    cat = {(a, b): _TwoHopIndex(world, ood, a, b) for a in (False, True) for b in (False, True)}
    trainable = cat[False, False]
    n_heldout = round(cfg.test_id_fraction * trainable.total)
    _check_world_size(world, cfg, n_atomic, cat[True, True].total, trainable.total, n_heldout)
    n_id_atomic = n_atomic - n_ood
    n_train = round(cfg.phi * n_id_atomic)
    available = trainable.total - n_heldout
    if n_train > available:
        raise ValueError(
            f"phi={cfg.phi} asks for {n_train} trained 2-hop facts (phi x {n_id_atomic} ID atomic facts) but only "
            f"{available} trainable ones exist after holding out {n_heldout}; lower --phi "
            f"(at most {math.floor(1000 * available / max(n_id_atomic, 1)) / 1000} here)"
        )
    ranks = sample_without_replacement(rng_for(cfg.seed, "composition/inferred"), trainable.total,
                                       n_heldout + n_train)
    heldout, trained = np.sort(ranks[:n_heldout]), np.sort(ranks[n_heldout:])

    def cap(name: str, n: int) -> np.ndarray:
        return sample_rows(rng_for(cfg.seed, f"composition/eval/{name}"), n, cfg.eval_max)

    trained_facts = trainable.facts(trained)
    id_idx, ood_idx = np.flatnonzero(~ood), np.flatnonzero(ood)
    splits = {
        "train": Facts.concat([atomic, trained_facts]),
        "id_atomic": atomic.take(id_idx[cap("id_atomic", len(id_idx))]),
        "ood_atomic": atomic.take(ood_idx[cap("ood_atomic", len(ood_idx))]),
        "train_inferred": trained_facts.take(cap("train_inferred", len(trained_facts))),
        "test_inferred_id": trainable.facts(heldout[cap("test_inferred_id", len(heldout))]),
        "test_inferred_ood": _sample_category(cat[True, True], cap("test_inferred_ood", cat[True, True].total)),
        "test_inferred_first_ood": _sample_category(
            cat[True, False], cap("test_inferred_first_ood", cat[True, False].total)),
        "test_inferred_second_ood": _sample_category(
            cat[False, True], cap("test_inferred_second_ood", cat[False, True].total)),
    }
    counts = {
        "atomic": n_atomic,
        "id_atomic": n_id_atomic,
        "ood_atomic": n_ood,
        "inferred_trainable": trainable.total,
        "inferred_trained": n_train,
        "inferred_heldout_id": n_heldout,
        "inferred_ood": cat[True, True].total,
        "inferred_first_ood": cat[True, False].total,
        "inferred_second_ood": cat[False, True].total,
    }
    splits = {name: splits[name].sorted() for name in COMPOSITION_SPLITS}
    return Generated(world, splits, counts, max_hops=2, ood_atomic=atomic.take(ood_idx))


def _smallest_fraction(n: int, works) -> float | None:
    """The smallest fraction f on a 0.001 grid (as --ood-fraction / --test-id-fraction take it) with
    ``works(round(f * n))``; ``works`` must be monotone in its count. None when no f < 1 works."""
    lo, hi = 1, n
    if n < 1 or not works(hi):
        return None
    while lo < hi:  # smallest count that works (binary search: the samples are nested prefixes)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if works(mid) else (mid + 1, hi)
    for k in range(max(1, math.floor(1000 * (lo - 0.5) / n) - 1), 1000):
        if round(k / 1000 * n) >= lo:
            return k / 1000
    return None


def _entities_for_ood(cfg: DataConfig, tries: int = 40) -> int | None:
    """A world size that gives a non-empty OOD test at cfg's fraction and seed (checked, not estimated:
    the count is not monotone in the size, so sizes grow by 10% until one works)."""
    n = cfg.n_entities
    for _ in range(tries):
        n = max(n + 1, math.ceil(n * 1.1))
        world = make_world(cfg.world, n, cfg.n_relations, cfg.out_degree, cfg.seed)
        n_atomic = len(world.facts()[0])
        mask = np.zeros(n_atomic, dtype=bool)
        count = round(cfg.ood_fraction * n_atomic)
        mask[sample_without_replacement(rng_for(cfg.seed, "composition/ood"), n_atomic, count)] = True
        if _TwoHopIndex(world, mask, True, True).total > 0:
            return n
    return None


def _check_world_size(world: World, cfg: DataConfig, n_atomic: int, n_ood_2hop: int, n_trainable: int,
                      n_heldout: int) -> None:
    """Refuse a world too small for the requested OOD / held-out fractions (they would give an empty
    OOD or ID test split, silently), naming the smallest fraction that works for this world and seed."""
    if cfg.ood_fraction > 0 and n_ood_2hop == 0:
        def ood_works(count: int) -> bool:
            mask = np.zeros(n_atomic, dtype=bool)
            mask[sample_without_replacement(rng_for(cfg.seed, "composition/ood"), n_atomic, count)] = True
            return _TwoHopIndex(world, mask, True, True).total > 0

        smallest = _smallest_fraction(n_atomic, ood_works)
        fix = (f"raise --ood-fraction to at least {smallest} (data.ood_fraction)" if smallest is not None
               else "no --ood-fraction below 1 gives one")
        entities = _entities_for_ood(cfg)
        bigger = f", or a bigger world (--entities {entities} works at this fraction)" if entities else ""
        raise ValueError(
            f"world too small for --ood-fraction {cfg.ood_fraction}: {round(cfg.ood_fraction * n_atomic)} of "
            f"{n_atomic} atomic facts are OOD and no 2-hop fact has both hops OOD, so test_inferred_ood would be "
            f"empty; {fix}{bigger}")
    if cfg.test_id_fraction > 0 and n_heldout == 0 and n_trainable > 0:
        smallest = _smallest_fraction(n_trainable, lambda count: count >= 1)
        raise ValueError(
            f"world too small for --test-id-fraction {cfg.test_id_fraction}: round({cfg.test_id_fraction} x "
            f"{n_trainable} trainable 2-hop facts) = 0, so test_inferred_id would be empty; raise "
            f"--test-id-fraction to at least {smallest} (data.test_id_fraction)")


def _sample_category(index: _TwoHopIndex, ranks: np.ndarray) -> Facts:
    return index.facts(ranks) if len(ranks) else Facts.empty(2)


# ----------------------------------------------------------------------------------------------
# depth


class _ChainCounter:
    """Counts of k-hop chains from every entity, for exact counts and uniform chain sampling.

    ``norm[m][e]`` is proportional to the number of m-hop chains starting at e (rescaled per level so
    it never overflows; ``log_scale[m]`` keeps the factor).
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.fh, self.fr, self.ft = world.facts()
        self.degree = world.out_degrees()
        self.start = np.cumsum(self.degree) - self.degree
        self.norm = [np.ones(world.n_entities)]
        self.log_scale = [0.0]
        self._edge_cdf: dict[int, np.ndarray] = {}

    def _level(self, m: int) -> np.ndarray:
        while len(self.norm) <= m:
            raw = np.bincount(self.fh, weights=self.norm[-1][self.ft], minlength=self.world.n_entities)
            top = raw.max() if len(raw) else 0.0
            self.norm.append(raw / top if top > 0 else raw)
            self.log_scale.append(self.log_scale[-1] + (math.log(top) if top > 0 else 0.0))
        return self.norm[m]

    def total(self, k: int) -> float:
        """Number of distinct k-hop chains (exact while below 2**53; a float above)."""
        s = float(self._level(k).sum())
        if s == 0:
            return 0.0
        log_total = math.log(s) + self.log_scale[k]
        return float(round(math.exp(log_total))) if log_total < 700 else math.inf

    def _cdf(self, m: int) -> np.ndarray:
        """[entity, slot] cumulative probability of taking each of the entity's edges (in relation order)
        as the next step of a uniform chain with m hops left; +inf from the last edge on."""
        if m not in self._edge_cdf:
            w = self._level(m - 1)[self.ft]
            seg = np.bincount(self.fh, weights=w, minlength=self.world.n_entities)[self.fh]
            slot = np.arange(len(self.fh)) - self.start[self.fh]
            p = np.zeros((self.world.n_entities, max(int(self.degree.max(initial=0)), 1)))
            p[self.fh, slot] = np.divide(w, seg, out=np.zeros_like(w), where=seg > 0)
            cdf = np.cumsum(p, axis=1)
            cdf[np.arange(p.shape[1])[None, :] >= self.degree[:, None] - 1] = np.inf
            self._edge_cdf[m] = cdf
        return self._edge_cdf[m]

    def sample(self, k: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` k-hop chains drawn uniformly (with replacement) from all distinct k-hop chains."""
        weights = self._level(k)
        heads = rng.choice(self.world.n_entities, size=n, p=weights / weights.sum())
        relations = np.empty((n, k), dtype=np.int64)
        current = heads
        alive = np.ones(n, dtype=bool)
        for hop in range(k):
            cdf = self._cdf(k - hop)[current]  # k - hop hops left, this one included
            slot = (rng.random(n)[:, None] >= cdf).sum(axis=1)  # inverse CDF within the entity's edges
            degree = self.degree[current]
            alive &= degree > 0  # a dead end is reachable only through float round-off; dropped below
            edge = np.minimum(self.start[current] + np.minimum(slot, np.maximum(degree - 1, 0)), len(self.fh) - 1)
            relations[:, hop] = self.fr[edge]
            current = self.ft[edge]
        return heads[alive], relations[alive]

    def enumerate(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Every distinct k-hop chain, in canonical (head, relations) order."""
        keep = self._level(k - 1)[self.ft] > 0
        heads, relations, ends = self.fh[keep], self.fr[keep][:, None], self.ft[keep]
        for hop in range(1, k):
            deg = self.degree[ends]
            rows = np.repeat(np.arange(len(ends)), deg)
            offset = np.arange(len(rows)) - np.repeat(np.cumsum(deg) - deg, deg)
            edge = self.start[ends][rows] + offset
            live = self._level(k - hop - 1)[self.ft[edge]] > 0  # drop continuations that dead-end
            rows, edge = rows[live], edge[live]
            heads, ends = heads[rows], self.ft[edge]
            relations = np.concatenate([relations[rows], self.fr[edge][:, None]], axis=1)
        return heads, relations


def _unique_chains(counter: _ChainCounter, k: int, need: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``need`` distinct k-hop chains, a uniform random ordered sample of all of them."""
    total = counter.total(k)
    if total <= max(_ENUMERATE_LIMIT, 4 * need):
        heads, relations = counter.enumerate(k)
        pick = sample_without_replacement(rng, len(heads), need)
        return heads[pick], relations[pick]
    # i.i.d. uniform draws; the distinct values in order of first appearance are a uniform ordered sample.
    # Duplicates are found by a 64-bit hash of the chain (sorting uint64 is far faster than sorting rows);
    # a hash collision could only drop a chain, never keep a duplicate.
    chains = np.empty((0, k + 1), dtype=np.int64)
    while len(chains) < need:
        heads, relations = counter.sample(k, int((need - len(chains)) * 1.05) + 64, rng)
        chains = np.concatenate([chains, np.column_stack([heads, relations])])
        _, first = np.unique(_chain_hash(chains), return_index=True)
        chains = chains[np.sort(first)]
    chains = chains[:need]
    return chains[:, 0].copy(), chains[:, 1:].copy()


_HASH_MULTIPLIERS = np.random.default_rng(20260407).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)


def _chain_hash(chains: np.ndarray) -> np.ndarray:
    """A 64-bit hash per row (random odd multipliers, wrapping arithmetic)."""
    mult = _HASH_MULTIPLIERS[: chains.shape[1]]
    with np.errstate(over="ignore"):
        return ((chains.astype(np.uint64) + np.uint64(1)) * mult).sum(axis=1, dtype=np.uint64)


def depth_splits(world: World, cfg: DataConfig) -> Generated:
    """Paper section 6. Chains are drawn uniformly from all distinct k-hop chains of the world.

    Loop-Think-Generalize draws random walks (uniform start fact, uniform next edge) and drops repeats;
    in worlds where every entity has the same out-degree (every world `make_world` builds) that is the
    same distribution. Where degrees differ (imported worlds) uniform-over-chains keeps hubs from
    dominating, and sampling it exactly lets us say when a world has too few chains instead of looping.
    """
    counter = _ChainCounter(world)
    need = cfg.per_hop_train + cfg.per_hop_test
    atomic = Facts.atomic(world)
    train, test, train_eval = [atomic], [], [atomic.take(
        sample_rows(rng_for(cfg.seed, "depth/train_eval/atomic"), len(atomic), cfg.eval_max))]
    available = {}
    for k in range(2, cfg.max_hops + 1):
        total = counter.total(k)
        available[str(k)] = int(total) if total < 2**53 else total
        if total < need:
            raise ValueError(
                f"depth task, k={k}: the world has only {int(total)} distinct {k}-hop chains but "
                f"per_hop_train + per_hop_test = {need}; lower them or use a larger world"
            )
        heads, relations = _unique_chains(counter, k, need, rng_for(cfg.seed, f"depth/chains/{k}"))
        chains = Facts.from_chains(world, heads, relations)
        # sort per k: parts appended in increasing k then concatenate into canonical order
        train_k = chains.take(np.arange(cfg.per_hop_train)).sorted()
        train.append(train_k)
        test.append(chains.take(np.arange(cfg.per_hop_train, need)).sorted())
        train_eval.append(train_k.take(
            sample_rows(rng_for(cfg.seed, f"depth/train_eval/{k}"), cfg.per_hop_train, cfg.per_hop_test)))
    splits = {"train": Facts.concat(train), "test": Facts.concat(test), "train_eval": Facts.concat(train_eval)}
    counts = {"atomic": len(atomic), "chains_available": available}
    return Generated(world, splits, counts, max_hops=cfg.max_hops)
