"""Seed ensembles: N runs of one config, differing only in ``run.seed``, trained as one batched model.

``train_ensemble(cfg, seeds=[0, 1, ..., 7], out_dir="runs/E")`` writes ``runs/E/seed-<s>`` for every
seed, each an ordinary run directory (config.json with provenance, metrics.csv, summary.json,
checkpoints/, a resumable state), equal within float tolerance to ``train(cfg with run.seed=s)``:

- every seed keeps its own :class:`~looplens.models.train.trainer.Trainer` (data, samplers, init,
  evaluation, curriculum-free stop checks, run-directory writing): only the optimisation step is shared;
- the N models' weights are stacked into one tensor per parameter ([seed, ...]); each model's own
  parameters are *views* of its slice, so evaluation and checkpoints read the live weights;
- the step runs the N forwards as one with :func:`torch.func.vmap` over
  :func:`torch.func.functional_call` of the same model code (the step-level API ``embed_tokens`` ->
  ``iterate`` -> ``readout``), sums the N losses (so each slice gets exactly its own gradient), and
  takes one AdamW step on the stacked tensors (AdamW is elementwise, so slice s moves as seed s's own
  optimizer would). Per-model operations (gradient clipping, OrthoGrad) act per slice; Grokfast is
  elementwise.
- before each save the stacked optimizer (and Grokfast) state is sliced into the seed's own optimizer,
  so any ``seed-<s>`` directory resumes alone with ``looplens train --out DIR/seed-<s> --resume``.

Not batched (a clear error): sampled recurrence (each seed would draw its own iteration count per
batch), the curriculum (stages advance per seed), and dropout (masks come from one global RNG).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from looplens.models.train.config import TrainConfig
from looplens.models.train.optim import answer_loss, parameter_group
from looplens.models.train.sampling import to_device
from looplens.models.train.trainer import FINAL_STOPS, RunResult, Trainer, _check_out_dir, resolve_device
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

SEED_DIR = "seed-{seed}"


def parse_seeds(text: str) -> list[int]:
    """``"0-7"`` -> [0..7] (inclusive), ``"0,3,5"`` -> [0, 3, 5], ``"0-3,8"`` -> [0, 1, 2, 3, 8].

    >>> parse_seeds("0-3,8")
    [0, 1, 2, 3, 8]
    """
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-"))
                if hi < lo:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected A-B (inclusive), a comma list, or both (0-3,8)") from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds {text!r}: seeds must be integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: a seed is listed twice")
    return seeds


def check_batchable(cfg: TrainConfig) -> None:
    """Raise ValueError naming the first setting a seed ensemble cannot batch."""
    if cfg.recurrence.mode != "fixed":
        raise ValueError(f"--seeds: recurrence.mode {cfg.recurrence.mode!r} draws an iteration count per seed and "
                         "batch; ensembles need recurrence.mode = \"fixed\" (train the seeds one by one)")
    if cfg.curriculum.enabled:
        raise ValueError("--seeds: curriculum.enabled advances stages per seed; train the seeds one by one")
    model = cfg.model
    dropout = model.dropout if model.embed_dropout is None else max(model.dropout, model.embed_dropout)
    if model.dropout or dropout:
        raise ValueError("--seeds: model.dropout > 0 draws masks from one global RNG; ensembles need dropout 0")
    if model.hyper_streams > 1 or model.slow_period:
        raise ValueError(f"--seeds: model.hyper_streams={model.hyper_streams} / model.slow_period={model.slow_period} "
                         "carry state between iterations that the batched step does not thread; train the seeds one by one")


class _Member(nn.Module):
    """One seed's loss on its batch, written with the model's step-level API so it runs under vmap
    (``steps()``/``forward`` validate token ids on the host, which vmap cannot do)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, tokens: Tensor, targets: Tensor, positions: Tensor, weight: Tensor | None,
                n_iter: int, backprop: int | None) -> tuple[Tensor, Tensor]:
        model, cfg = self.model, self.cfg
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        every = cfg.recurrence.supervise == "from_hops"
        state = model.embed_tokens(tokens)
        loop_input = state
        per_iter = []
        for t in range(n_iter):
            if backprop is not None and t == n_iter - backprop:
                state = state.detach()
            state = model.iterate(state, t, loop_input)
            if every:  # LoopStep.answer_logits: without a coda only the answer positions are decoded
                if model.cfg.n_coda:
                    per_iter.append(model.readout(state, n_iter)[rows, positions])
                else:
                    per_iter.append(model.readout(state[rows, positions][:, None], n_iter)[:, 0])
        if every:  # Trainer._loss_from_hops
            logits = torch.stack(per_iter).float()
            nll = answer_loss(logits.flatten(0, 1), targets.repeat(n_iter), cfg.optim.loss,
                              cfg.optim.label_smoothing, reduction="none").view(n_iter, -1)
            return (nll * weight).sum() / tokens.shape[0], logits[-1]
        answer_logits = model.readout(state, n_iter)[rows, positions].float()  # as Trainer.train_step
        return answer_loss(answer_logits, targets, cfg.optim.loss, cfg.optim.label_smoothing), answer_logits


class SeedEnsemble:
    """N trainers of one config (seeds differ) whose optimisation step is one batched step."""

    def __init__(self, cfg: TrainConfig, seeds: Sequence[int], out_dir: Path, progress: bool,
                 command: list[str] | None):
        check_batchable(cfg)
        self.cfg = cfg
        self.seeds = list(seeds)
        self.progress = progress
        self.trainers = [
            Trainer(cfg.with_overrides([f"run.seed={s}"]), Path(out_dir) / SEED_DIR.format(seed=s), False, command)
            for s in self.seeds
        ]
        self.device = self.trainers[0].device
        self.bf16 = self.trainers[0].bf16
        models = [tr.model for tr in self.trainers]
        names = [name for name, _ in models[0].named_parameters()]
        stacked, _ = stack_module_state(models)  # copies: {name: [seed, ...]} leaves with requires_grad
        self.params: dict[str, Tensor] = {n: stacked[n] for n in names}
        for s, tr in enumerate(self.trainers):  # each model now computes with views of its slice
            for name in names:
                module_name, _, leaf = name.rpartition(".")
                module = tr.model.get_submodule(module_name) if module_name else tr.model
                setattr(module, leaf, nn.Parameter(self.params[name].detach()[s], requires_grad=True))
            tr.params = [p for p in tr.model.parameters() if p.requires_grad]
            tr.optimizer = tr._new_optimizer()  # its state is filled from the stacked one before each save
        self.member = _Member(models[0], cfg)
        self.optimizer = self._new_optimizer()
        self.grokfast_ema: dict[str, Tensor] = {}
        self.frozen: dict[int, dict[str, Tensor]] = {}  # seed index -> its final weights (stopped early)

    # ------------------------------------------------------------------------------------------------
    def _new_optimizer(self) -> torch.optim.AdamW:
        """make_optimizer's two groups, over the stacked tensors (same order, so slices map by name)."""
        o = self.cfg.optim
        decay = [p for n, p in self.params.items() if parameter_group(n) not in o.no_decay]
        no_decay = [p for n, p in self.params.items() if parameter_group(n) in o.no_decay]
        groups = [{"params": decay, "weight_decay": o.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        kwargs = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **kwargs)

    def _active(self) -> list[int]:
        return [i for i, tr in enumerate(self.trainers) if i not in self.frozen]

    def train_step(self) -> None:
        """One step of every seed: each trainer draws its batch; one batched forward/backward/AdamW."""
        cfg = self.cfg
        draws = []
        for i, tr in enumerate(self.trainers):
            if i in self.frozen:  # a finished seed trains on a repeat of its last batch; its weights are restored
                draws.append(draws[-1] if draws else None)
                continue
            draws.append((tr.batches.next_batch(), tr.iterations.sample(), tr._lr()))
        live = next(d for d in draws if d is not None)
        draws = [d if d is not None else live for d in draws]
        n_iter, lr = live[1], live[2]
        if any(d[1] != n_iter for d in draws) or any(d[2] != lr for d in draws):
            raise RuntimeError("seed ensemble: the seeds' iteration counts or learning rates diverged")
        width = max(int(tr.train_lengths[d[0]].max()) for tr, d in zip(self.trainers, draws))
        rows = np.stack([d[0] for d in draws])  # [seed, batch]
        index = to_device(rows, self.device)
        first = self.trainers[0]
        tokens = first.train_tokens[index, :width]  # every trainer holds the same dataset
        targets = first.train_answers[index]
        positions = first.model.readout_positions(tokens.flatten(0, 1)).view(index.shape)
        weight = None
        if cfg.recurrence.supervise == "from_hops":
            hops = to_device(first.train_hops[rows], self.device).clamp(max=n_iter)
            weight = (torch.arange(1, n_iter + 1, device=self.device)[None, :, None] >= hops[:, None, :]).float()
            weight = weight / weight.sum(1, keepdim=True)  # [seed, T, batch]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        backprop = None if cfg.recurrence.backprop_last is None else min(cfg.recurrence.backprop_last, n_iter)

        def one(params, tokens, targets, positions, weight):
            prefixed = {f"model.{n}": p for n, p in params.items()}
            return functional_call(self.member, prefixed, (tokens, targets, positions, weight, n_iter, backprop))

        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16
                    else torch.autocast(self.device.type, enabled=False))
        with autocast, warnings.catch_warnings():
            # CPU SDPA has no vmap batching rule: torch loops over the seeds there (correct, and warns)
            warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
            loss, answer_logits = vmap(one, in_dims=(0, 0, 0, 0, 0 if weight is not None else None))(
                self.params, tokens, targets, positions, weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # slice s of every gradient is seed s's own gradient
        grads = {n: p.grad for n, p in self.params.items() if p.grad is not None}
        with torch.no_grad():
            if cfg.optim.grokfast_lambda > 0:  # Grokfast.filter, elementwise
                for n, g in grads.items():
                    if n not in self.grokfast_ema:
                        self.grokfast_ema[n] = g.detach().clone()
                    else:
                        self.grokfast_ema[n].mul_(cfg.optim.grokfast_alpha).add_(g, alpha=1.0 - cfg.optim.grokfast_alpha)
                    g.add_(self.grokfast_ema[n], alpha=cfg.optim.grokfast_lambda)
            if cfg.optim.orthograd:
                _orthogonalize(grads, self.params)
            if cfg.optim.grad_clip:
                self._clip(grads, cfg.optim.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            for i, weights in self.frozen.items():
                for n, w in weights.items():
                    self.params[n][i].copy_(w)
            correct = (answer_logits.detach().argmax(-1) == targets).sum(-1).double()
            loss_sum = loss.detach().double() * index.shape[1]
        for i in self._active():
            tr = self.trainers[i]
            tr.step += 1
            w = tr.window
            w["loss"] += loss_sum[i]
            w["correct"] += correct[i]
            w["n"] += index.shape[1]
            w["steps"] += 1
            w["iterations"] += n_iter

    def _clip(self, grads: dict[str, Tensor], max_norm: float) -> None:
        """clip_grad_norm_ per seed: each seed's global gradient norm over its own parameters."""
        n_seeds = len(self.seeds)
        sq = torch.zeros(n_seeds, dtype=torch.float32, device=self.device)
        for g in grads.values():
            sq += g.reshape(n_seeds, -1).float().pow(2).sum(-1)
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads.values():
            g.mul_(coef.view(-1, *([1] * (g.ndim - 1))).to(g.dtype))

    # ------------------------------------------------------------------------------------------------
    def _sync_optimizer(self, i: int) -> None:
        """Copy slice ``i`` of the stacked AdamW (and Grokfast) state into trainer i's own optimizer."""
        tr = self.trainers[i]
        own = dict(tr.model.named_parameters())
        for name, stacked in self.params.items():
            state = self.optimizer.state.get(stacked)
            if not state:
                continue
            tr.optimizer.state[own[name]] = {k: (v[i].clone() if k != "step" else v.clone()) for k, v in state.items()}
        if tr.grokfast is not None:
            tr.grokfast.ema = {n: e[i].clone() for n, e in self.grokfast_ema.items()}

    def _save_state(self, i: int) -> None:
        self._sync_optimizer(i)
        self.trainers[i].save_state()

    def _finish(self, i: int, t0: float, start_step: int) -> RunResult:
        """Trainer.run's ending for seed i: final checkpoint, state, evaluation and summary."""
        tr = self.trainers[i]
        if not tr.paths.checkpoint(tr.step).with_suffix(".json").exists():
            tr.save_checkpoint()
        if tr.last_state_step != tr.step:
            self._save_state(i)
        if tr.last_eval_step != tr.step:
            tr.metrics.add(tr.evaluate())
        tr.metrics.flush()
        wall = time.monotonic() - t0
        status = "finished" if tr.stop_reason in (*FINAL_STOPS, "max_steps") else "stopped"
        tr.write_summary(status, wall, tr.step - start_step)
        self.frozen[i] = {n: p[i].detach().clone() for n, p in self.params.items()}
        return tr._result(wall, tr.step - start_step)

    def run(self) -> list[RunResult]:
        """Trainer.run for every seed at once (a fresh start; each seed directory resumes alone)."""
        from looplens.models.train.run import MetricsLog

        cfg = self.cfg
        for i, tr in enumerate(self.trainers):
            tr.paths.checkpoints.mkdir(parents=True, exist_ok=True)
            tr.metrics = MetricsLog(tr.paths.metrics)
            tr.write_config([])
            tr.metrics.add(tr.evaluate())
            tr.save_checkpoint()
            self._save_state(i)
            tr.write_summary("running", 0.0, 0)
        t0 = time.monotonic()
        budget = None if cfg.run.time_budget_minutes is None else cfg.run.time_budget_minutes * 60.0
        results: dict[int, RunResult] = {}
        bar = tqdm(total=cfg.run.max_steps, disable=not self.progress, unit="step", dynamic_ncols=True, leave=True,
                   desc=f"{len(self.seeds)} seeds")
        try:
            while len(results) < len(self.trainers):
                stop = None
                if self.trainers[self._active()[0]].step >= cfg.run.max_steps:
                    stop = "max_steps"
                elif budget is not None and time.monotonic() - t0 >= budget:
                    stop = "time_budget"
                if stop is not None:
                    for i in self._active():
                        self.trainers[i].stop_reason = stop
                        results[i] = self._finish(i, t0, 0)
                    break
                self.train_step()
                for i in self._active():
                    tr = self.trainers[i]
                    if tr.step % cfg.run.log_every == 0:
                        tr.metrics.add([tr._train_row()])
                    if tr.step % cfg.eval.every == 0:
                        rows = tr.evaluate()
                        tr.metrics.add(rows)
                        tr.metrics.add(tr.after_eval(rows))
                        tr.metrics.flush()
                    permanent = self._permanent(tr.step)
                    if permanent:
                        tr.save_checkpoint()
                    if permanent or tr.step % cfg.run.save_every == 0 or tr.stop_reason in FINAL_STOPS:
                        self._save_state(i)
                        tr.write_summary("running", time.monotonic() - t0, tr.step)
                    if tr.stop_reason in FINAL_STOPS:
                        results[i] = self._finish(i, t0, 0)
                bar.update(1)
        except KeyboardInterrupt:
            for i in self._active():
                tr = self.trainers[i]
                tr.stop_reason = "interrupted"
                tr.write_summary("interrupted", time.monotonic() - t0, tr.step)
            raise
        finally:
            bar.close()
        return [results[i] for i in range(len(self.trainers))]

    def _permanent(self, step: int) -> bool:
        from looplens.models.train.trainer import checkpoint_schedule

        return checkpoint_schedule(step, self.cfg.run.checkpoint_every, self.cfg.run.log_checkpoints)


def _orthogonalize(grads: dict[str, Tensor], params: dict[str, Tensor], eps: float = 1e-30) -> None:
    """optim.orthogonalize_gradients, per seed slice: g_perp = g - (<w, g> / <w, w>) w, rescaled to ||g||;
    slices whose weight is all zero (or whose g_perp vanishes) are left as they are."""
    for name, g in grads.items():
        n_seeds = g.shape[0]
        wf = params[name].detach().reshape(n_seeds, -1).float()
        gf = g.reshape(n_seeds, -1).float()
        ww = (wf * wf).sum(-1, keepdim=True)
        g_perp = gf - ((wf * gf).sum(-1, keepdim=True) / ww.clamp_min(eps)) * wf
        norm_perp = g_perp.norm(dim=-1, keepdim=True)
        rescaled = torch.where(norm_perp > eps, g_perp * (gf.norm(dim=-1, keepdim=True) / norm_perp.clamp_min(eps)),
                               g_perp)
        g.copy_(torch.where(ww > eps, rescaled, gf).view_as(g).to(g.dtype))


def train_ensemble(cfg: TrainConfig, seeds: Sequence[int], out_dir: str | Path, overwrite: bool = False,
                   progress: bool = True, command: list[str] | None = None) -> list[RunResult]:
    """Train ``cfg`` once per seed, batched in one process; writes ``out_dir/seed-<s>`` per seed.

    Each directory is the run ``train(cfg with run.seed=s, out_dir/seed-<s>)`` would write (numbers
    equal within float tolerance); ``run.time_budget_minutes`` bounds the whole ensemble. Resume a
    seed alone: ``looplens train --out out_dir/seed-<s> --resume``.
    """
    if not seeds:
        raise ValueError("--seeds: no seeds given")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: a seed is listed twice ({list(seeds)})")
    check_batchable(cfg)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a directory")
    for s in seeds:
        _check_out_dir(out / SEED_DIR.format(seed=s), resume=False, overwrite=overwrite)
    if cfg.optim.schedule != "constant" and cfg.optim.decay_steps is None:  # as train() resolves it
        cfg = cfg.with_overrides([f"optim.decay_steps={max(cfg.run.max_steps - cfg.optim.warmup_steps, 1)}"])
    old_threads = torch.get_num_threads()
    if resolve_device(cfg.run.device).type == "cpu" and cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    try:
        ensemble = SeedEnsemble(cfg, seeds, out, progress, command)
        return ensemble.run()
    finally:
        torch.set_num_threads(old_threads)
