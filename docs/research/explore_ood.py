"""Throwaway exploration for issue 8 (not project code): how fast does strict OOD arrive? --deep is the
from-hops loss (--only-last: last iteration only), --feedback the readout feedback (both now trainer options)."""
import argparse, json, time, sys
import numpy as np, torch
sys.path.insert(0, "/work/main")
torch.set_num_threads(1)
from looplens.data.config import DataConfig
from looplens.data.tasks import generate
from looplens.models import LoopedConfig, LoopedTransformer

ap = argparse.ArgumentParser()
ap.add_argument("--entities", type=int, default=200); ap.add_argument("--relations", type=int, default=20)
ap.add_argument("--out-degree", type=int, default=20); ap.add_argument("--ood", type=float, default=0.1)
ap.add_argument("--phi", type=float, default=7.2); ap.add_argument("--world", default="random-tail")
ap.add_argument("--d", type=int, default=128); ap.add_argument("--heads", type=int, default=4)
ap.add_argument("--blocks", type=int, default=1); ap.add_argument("--iters", type=int, default=4)
ap.add_argument("--pos", default="learned"); ap.add_argument("--zero-init", action="store_true")
ap.add_argument("--lr", type=float, default=1e-3); ap.add_argument("--wd", type=float, default=0.1)
ap.add_argument("--batch", type=int, default=256); ap.add_argument("--atomic-share", type=float, default=0.25)
ap.add_argument("--steps", type=int, default=20000); ap.add_argument("--minutes", type=float, default=12)
ap.add_argument("--eval-every", type=int, default=500); ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--ls", type=float, default=0.0); ap.add_argument("--dropout", type=float, default=0.0)
ap.add_argument("--out", required=True); ap.add_argument("--deep", action="store_true"); ap.add_argument("--only-last", action="store_true"); ap.add_argument("--feedback", type=float, default=0.0); ap.add_argument("--test-id", type=float, default=0.005); ap.add_argument("--eval-max", type=int, default=3000)
a = ap.parse_args()

cfg = DataConfig(task="composition", world=a.world, n_entities=a.entities, n_relations=a.relations,
                 out_degree=a.out_degree, ood_fraction=a.ood, phi=a.phi, seed=a.seed, test_id_fraction=a.test_id, eval_max=a.eval_max)
g = generate(cfg)
N, R = a.entities, a.relations
def enc(f):
    k = f.relations.shape[1]
    toks = np.zeros((len(f), 1 + k), np.int64)
    toks[:, 0] = 1 + f.heads
    toks[:, 1:] = np.where(np.arange(k)[None] < f.hops[:, None], 1 + N + f.relations, 0)
    return torch.tensor(toks), torch.tensor(1 + f.answers)
sp = {k: enc(v) for k, v in g.splits.items()}
tr_t, tr_y = sp["train"]
hops = (tr_t != 0).sum(1) - 1
atom_idx = torch.nonzero(hops == 1).squeeze(1); inf_idx = torch.nonzero(hops == 2).squeeze(1)
print({k: len(v[0]) for k, v in sp.items()}, flush=True)
torch.manual_seed(a.seed)
mcfg = LoopedConfig(d_vocab=1 + N + R, n_ctx=3, d_model=a.d, n_heads=a.heads, n_blocks=a.blocks, n_iterations=a.iters,
                    positional=a.pos, zero_init_out=a.zero_init, dropout=a.dropout, seed=a.seed)
m = LoopedTransformer(mcfg)
decay = [p for n, p in m.named_parameters() if p.ndim >= 2 and "W_E" not in n]
nodecay = [p for n, p in m.named_parameters() if not (p.ndim >= 2 and "W_E" not in n)]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": nodecay, "weight_decay": 0.0}], lr=a.lr)
gen = torch.Generator().manual_seed(a.seed)
n_atom = int(round(a.batch * a.atomic_share))
@torch.no_grad()
def acc(name):
    t, y = sp[name]
    m.eval()
    if a.feedback:
        T = a.iters; pos = m.readout_positions(t); st = m.embed_tokens(t); inj = st
        for it in range(T):
            st = m.iterate(st, it, inj); full = m.readout(st, T)
            if it < T - 1: st = st + a.feedback * (full.float().softmax(-1) @ m.W_E)
        p = full[torch.arange(len(t)), pos].argmax(-1)
    else:
        p = m.predict(t).argmax(-1)
    m.train()
    return float((p == y).float().mean())
log = []; t0 = time.time(); step = 0
while step < a.steps and time.time() - t0 < a.minutes * 60:
    lr = a.lr * min(1.0, (step + 1) / 200)
    for gr in opt.param_groups: gr["lr"] = lr
    bi = torch.cat([atom_idx[torch.randint(len(atom_idx), (n_atom,), generator=gen)],
                    inf_idx[torch.randint(len(inf_idx), (a.batch - n_atom,), generator=gen)]])
    if a.deep:
        tk = tr_t[bi]; y = tr_y[bi]; T = a.iters
        m._grow(T); m._bind(T)
        pos = m.readout_positions(tk); hk = (tk != 0).sum(1) - 1
        st = m.embed_tokens(tk); inj = st; tot = 0.0; cnt = 0
        for t in range(T):
            st = m.iterate(st, t, inj)
            full = m.readout(st, T)
            lg = full[torch.arange(len(tk)), pos]
            if a.feedback and t < T - 1:
                st = st + a.feedback * (full.float().softmax(-1) @ m.W_E)
            ce = torch.nn.functional.cross_entropy(lg.float(), y, reduction="none", label_smoothing=a.ls)
            w = (hk <= t + 1).float() if not a.only_last else torch.full_like(hk, float(t == T - 1), dtype=torch.float)
            tot = tot + (ce * w).sum(); cnt = cnt + w.sum()
        loss = tot / cnt
    else:
        loss = m(tr_t[bi], return_type="loss", targets=tr_y[bi], label_smoothing=a.ls)
    opt.zero_grad(); loss.backward(); opt.step(); step += 1
    if step % a.eval_every == 0:
        r = {"step": step, "min": round((time.time() - t0) / 60, 2), "loss": round(float(loss), 4)}
        for s in ["id_atomic", "ood_atomic", "train_inferred", "test_inferred_id", "test_inferred_first_ood", "test_inferred_second_ood", "test_inferred_ood"]:
            r[s.replace("test_inferred_", "t_")] = round(acc(s), 3)
        log.append(r); print(json.dumps(r), flush=True)
json.dump({"args": vars(a), "log": log}, open(a.out, "w"))
