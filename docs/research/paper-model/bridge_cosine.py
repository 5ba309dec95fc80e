"""Does the state after iteration 1 look like the bridge's input embedding? (issue 15; run from the repo root)

    python docs/research/paper-model/bridge_cosine.py RUN_DIR [--out DIR] [--steps 1000,2000,...] [--n 500]

For 2-hop queries ``h r1 r2`` (bridge b = r1(h), answer r2(b)) of a paper-model run (no readout feedback),
at every saved checkpoint:
- cos: cosine between ln_final(resid after iteration 1) at a position (1 = the first relation, 2 = the
  readout) and the bridge's input embedding W_E[b]; "cos_other" is the mean cosine with every other
  entity's embedding (the baseline a random entity gets);
- top1: the bridge is the logit lens's top-1 entity there (tied unembedding, so top1 and cos are related);
- both after every iteration t = 1..R (column ``iteration``; the figure shows t = 1);
for ID bridges (test_inferred_id: both facts composed in training), OOD first hops
(test_inferred_first_ood: the bridge comes from a fact seen only as an atomic fact) and strict OOD
(test_inferred_ood), beside the split's accuracy at the training iteration count from metrics.csv.
Writes bridge_cosine.csv and bridge_cosine.png (if matplotlib is present) to --out.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from looplens.models.train import load_run

SPLITS = ["test_inferred_id", "test_inferred_first_ood", "test_inferred_ood"]


def measure(model, tokens: torch.Tensor, bridges: torch.Tensor, entity_ids: torch.Tensor, n_iterations: int) -> list[dict]:
    """cos / cos_other / top1 at positions 1 and 2 after every iteration t = 1..n_iterations."""
    n_blocks = model.cfg.n_blocks
    names = {f"blocks.{t * n_blocks - 1}.hook_resid_post": t for t in range(1, n_iterations + 1)}  # no prelude here
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, n_iterations=n_iterations, names_filter=lambda n: n in names)
        emb = model.W_E[entity_ids]  # [E, d]
        rows = []
        for name, t in names.items():
            state = model.ln_final(cache[name])  # [n, pos, d]
            for pos in (1, 2):
                s = state[:, pos]
                cos_all = F.normalize(s, dim=-1) @ F.normalize(emb, dim=-1).T  # [n, E]
                is_b = entity_ids[None, :] == bridges[:, None]
                cos_b = cos_all[is_b].reshape(-1)
                cos_other = cos_all.masked_fill(is_b, 0).sum(-1) / (len(entity_ids) - 1)
                logits = model.unembed(s[:, None])[:, 0][:, entity_ids]
                top1 = entity_ids[logits.argmax(-1)] == bridges
                rows.append({"iteration": t, "position": pos, "cos": float(cos_b.mean()),
                             "cos_other": float(cos_other.mean()), "top1": float(top1.float().mean())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--steps", default=None, help="comma list of checkpoint steps (default: every saved step >= 250)")
    ap.add_argument("--n", type=int, default=500, help="queries per split")
    a = ap.parse_args()
    torch.set_num_threads(1)
    run = load_run(a.run)
    out = a.out or a.run
    out.mkdir(parents=True, exist_ok=True)
    ds = run.dataset
    steps = [int(s) for s in a.steps.split(",")] if a.steps else [s for s in run.checkpoints if s >= 250]
    R = run.config.model.n_iterations
    m = run.metrics
    m = m[m["iterations"] == R]
    enc = {s: ds.encode(s) for s in SPLITS}
    vocab_entities = None
    rows = []
    for step in steps:
        model = run.load_model(step)
        if vocab_entities is None:
            atomic = ds.encode("id_atomic")
            vocab_entities = torch.unique(torch.cat([atomic.tokens[:, 0], atomic.answers,
                                                     ds.encode("ood_atomic").answers]))
        for split, e in enc.items():
            tokens = e.tokens[: a.n, :3]
            bridges = e.bridges[: a.n, 0]
            acc = m[(m["step"] == step) & (m["split"] == split)]["accuracy"]
            for r in measure(model, tokens, bridges, vocab_entities, R):
                rows.append({"step": step, "split": split, "accuracy": float(acc.iloc[0]) if len(acc) else None, **r})
        print(f"step {step} done", flush=True)
    df = pd.DataFrame(rows)
    tmp = out / "bridge_cosine.csv.tmp"
    df.to_csv(tmp, index=False)
    tmp.rename(out / "bridge_cosine.csv")
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for split, c in zip(SPLITS, ["tab:blue", "tab:orange", "tab:red"]):
        df1 = df[df["iteration"] == 1]
        d = df1[(df1["split"] == split) & (df1["position"] == 2)]
        axes[0].plot(d["step"], d["cos"], color=c, label=split)
        axes[0].plot(d["step"], d["cos_other"], color=c, ls=":")
        d1 = df1[(df1["split"] == split) & (df1["position"] == 1)]
        axes[1].plot(d1["step"], d1["cos"], color=c, label=split)
        axes[1].plot(d1["step"], d1["cos_other"], color=c, ls=":")
        da = d.dropna(subset=["accuracy"])
        axes[2].plot(da["step"], da["accuracy"], color=c, label=split)
    axes[0].set_title("cos(LN(state it.1), W_E[bridge]) readout pos")
    axes[1].set_title("same at the first relation's position")
    axes[2].set_title("accuracy at training R")
    for ax in axes:
        ax.set_xlabel("step")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bridge_cosine.png", dpi=80)


if __name__ == "__main__":
    main()
