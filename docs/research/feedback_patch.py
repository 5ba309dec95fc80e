"""Does the second hop read the bridge through the readout-feedback channel? (issue 8; run from the repo root)

    python docs/research/feedback_patch.py

On the shipped looped model (tiny-composition recipe): 1) evaluate with feedback switched off at inference;
2) for 2-hop queries, overwrite the fed-back vector at the bridge position (position 1, hook
loop.1.hook_feedback, i.e. before iteration 2) with the re-embedding of another entity b', and count how
often the model then answers r2(b') instead of its own answer.
"""

import torch

from looplens.analyses import shipped_run_path
from looplens.models.train import load_run

torch.set_num_threads(1)
run = load_run(shipped_run_path() / "looped")
model = run.load_model().eval()
ds = run.dataset
train = ds.encode("train")
atomic = train.hops == 1
fact = {(t[0], t[1]): a for t, a in zip(train.tokens[atomic].tolist(), train.answers[atomic].tolist())}
entities = sorted({k[0] for k in fact})


def accuracy(split: str) -> float:
    e = ds.encode(split)
    with torch.no_grad():
        return float((model.predict(e.tokens).argmax(-1) == e.answers).float().mean())


splits = ["id_atomic", "ood_atomic", "test_inferred_id", "test_inferred_ood"]
print("feedback on :", {s: round(accuracy(s), 3) for s in splits})
model.cfg.feedback = 0.0
print("feedback off:", {s: round(accuracy(s), 3) for s in splits})
model.cfg.feedback = 1.0

g = torch.Generator().manual_seed(0)
for split in ["test_inferred_id", "test_inferred_ood"]:
    e = ds.encode(split)
    tokens, answers = e.tokens[:, :3], e.answers
    bridge = torch.tensor([fact[(t[0], t[1])] for t in tokens.tolist()])
    other = torch.tensor([entities[i] for i in torch.randint(len(entities), (len(tokens),), generator=g).tolist()])
    other = torch.where(other == bridge, torch.tensor(entities[0] if entities[0] != int(bridge[0]) else entities[1]), other)
    wanted = torch.tensor([fact.get((b, t[2]), -1) for b, t in zip(other.tolist(), tokens.tolist())])

    def swap_bridge(x, hook):
        x = x.clone()
        x[:, 1] = model.cfg.feedback * model.W_E.detach()[other]
        return x

    with torch.no_grad():
        patched = model.run_with_hooks(tokens, fwd_hooks=[("loop.1.hook_feedback", swap_bridge)])[:, 2].argmax(-1)
    print(f"{split}: with b' fed back at the bridge position the model answers r2(b') for "
          f"{float((patched == wanted).float().mean()):.3f} of {len(tokens)} queries "
          f"(its own answer for {float((patched == answers).float().mean()):.3f})")
