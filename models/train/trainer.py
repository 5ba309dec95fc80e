"""The training loop: ``train(cfg, out_dir) -> RunResult``.

One step::

    rows = batch_sampler.next_batch(); R = iteration_sampler.sample()
    loss = answer_loss(model(tokens, n_iterations=R)[readout positions], answers)   # softmax or StableMax
    backward -> [Grokfast] -> [OrthoGrad] -> [clip] -> AdamW step at lr_at(step)

Every ``eval.every`` steps the model is evaluated on every evaluation split (per hop count, at the
training and extra iteration counts), the curriculum may advance, and the target-accuracy stop is
checked. Checkpoints and the resumable state are written at log-spaced steps, every
``run.checkpoint_every`` / ``run.save_every`` steps, and at the end. A resumed run replays exactly:
model, optimizer, Grokfast EMA, both samplers, every RNG, the curriculum and the partly filled
train-loss window are restored, and metrics.csv is truncated to the saved length.

Under ``torchrun --nproc_per_node N`` the step is data-parallel (DDP over an identically drawn global
batch; rank 0 evaluates and writes): see models/train/distributed.py.
"""

from __future__ import annotations

import contextlib
import io
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from looplens.data import ensure_dataset
from looplens.data.provenance import atomic_write_bytes, provenance
from looplens.models.checkpoint import save_checkpoint
from looplens.models.halting import make_halting_rule
from looplens.models.looped import LoopedTransformer
from looplens.models.train import distributed
from looplens.models.train.config import RESUMABLE_KEYS, TrainConfig
from looplens.models.train.evaluation import HALTING_ITERATIONS, EvalSet, evaluate_set, split_accuracy
from looplens.models.train.optim import Grokfast, answer_loss, lr_at, make_optimizer, orthogonalize_gradients
from looplens.models.train.run import (
    RUN_FORMAT,
    STAGE_SPLIT,
    TRAIN_SPLIT,
    MetricsLog,
    RunPaths,
    data_root,
    load_run,
    write_json,
)
from looplens.models.train.sampling import BatchSampler, IterationSampler, to_device
from torch import Tensor
from tqdm.auto import tqdm

STATE_FORMAT = "looplens-train-state-v1"
# Stops that end a run for good: resuming such a run does nothing.
FINAL_STOPS = ("target_accuracy", "curriculum_complete", "stage_budget")


@dataclass
class RunResult:
    """What :func:`train` returns. ``final`` maps split -> accuracy at the training iteration count
    (all hop counts together) from the last evaluation."""

    path: Path
    step: int
    epoch: float
    stop_reason: str
    final: dict[str, float] = field(default_factory=dict)
    learnable_depth: int | None = None
    wall_seconds: float = 0.0
    steps_per_second: float = 0.0

    def load(self):
        """The run directory as a :class:`models.train.Run`."""
        return load_run(self.path)


def checkpoint_schedule(step: int, every: int, log_spaced: bool) -> bool:
    """Whether ``step`` gets a permanent checkpoint: 0, 2^k and 1.5 * 2^k, and multiples of ``every``.

    >>> [s for s in range(1, 50) if checkpoint_schedule(s, 0, True)]
    [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]
    """
    if step == 0:
        return True
    if every and step % every == 0:
        return True
    if log_spaced:
        if step & (step - 1) == 0:
            return True
        if step % 3 == 0 and (step // 3) & (step // 3 - 1) == 0:
            return True
    return False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device (--device) is cuda but torch sees no CUDA device")
    return torch.device(name)


def _rng_states() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    np_state = {**np_state, "state": {**np_state["state"], "key": torch.from_numpy(np_state["state"]["key"].copy())}}
    out = {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np_state = dict(states["numpy"])
    np_state["state"] = {**np_state["state"], "key": np_state["state"]["key"].numpy()}
    np.random.set_state(np_state)
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _tuplify(x: Any) -> Any:  # random.setstate wants tuples; torch.load may give lists back
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x


class Trainer:
    """One training run; :func:`train` is the entry point. Attributes are the live training state."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, progress: bool, command: list[str] | None):
        self.cfg = cfg
        self.paths = RunPaths(Path(out_dir))
        self.dist = distributed.from_env()  # torchrun: one rank of a data-parallel run (models/train/distributed.py)
        self.progress = progress and self.dist.is_main
        self.command = command
        self.device = distributed.device_for(self.dist, resolve_device(cfg.run.device))
        self.bf16 = cfg.optim.precision == "bf16" or (cfg.optim.precision == "auto" and self.device.type == "cuda")
        if self.bf16 and self.device.type != "cuda":
            raise ValueError("optim.precision = \"bf16\" needs --device cuda (CPU training runs in fp32)")

        # --- data -----------------------------------------------------------------------------------
        root = data_root(cfg, self.paths.root)
        self.dataset = distributed.on_main(self.dist, lambda: ensure_dataset(cfg.data, root))  # rank 0 builds it
        if self.dataset is None:
            self.dataset = ensure_dataset(cfg.data, root)
        ds = self.dataset
        if cfg.optim.batch_size < self.dist.world_size:
            raise ValueError(f"optim.batch_size ({cfg.optim.batch_size}) must be at least the number of processes "
                             f"({self.dist.world_size}): the global batch is split across them")
        if cfg.model.pad_token_id != ds.vocab.pad_id:
            raise ValueError(f"model.pad_token_id must be the dataset's pad id ({ds.vocab.pad_id}), got {cfg.model.pad_token_id}")
        train = ds.encode("train")
        self.train_tokens = train.tokens.to(self.device)
        self.train_answers = train.answers.to(self.device)
        self.train_hops = train.hops.numpy()
        self.train_lengths = train.lengths.numpy()
        n_ctx = max(int(ds.encode(s).tokens.shape[1]) for s in ds.split_names)
        self.looped_cfg = cfg.model.to_looped(d_vocab=len(ds.vocab), n_ctx=n_ctx, seed=cfg.run.seed)

        eval_names = cfg.eval.splits or [s for s in ds.split_names if s != "train"]
        for name in eval_names:
            if name not in ds.split_names:
                raise ValueError(f"eval.splits: dataset has no split {name!r} (splits: {', '.join(ds.split_names)})")
        if cfg.curriculum.enabled and "test" not in eval_names:
            eval_names = [*eval_names, "test"]
        if cfg.run.stop_split is not None and cfg.run.stop_split not in eval_names:
            raise ValueError(f"run.stop_split {cfg.run.stop_split!r} is not evaluated (eval splits: {', '.join(eval_names)})")
        self.eval_names = eval_names
        self.eval_iterations = sorted({cfg.train_iterations, *cfg.eval.iterations})
        self.evalset = EvalSet.build({n: ds.encode(n) for n in eval_names}, cfg.eval.batch_size, self.device,
                                     max_hops=cfg.eval.max_hops)
        self.halting = None
        if cfg.eval.halting is not None:
            self.halting = make_halting_rule(cfg.eval.halting, eps=cfg.eval.halting_eps, entropy=cfg.eval.halting_entropy)

        # --- curriculum -------------------------------------------------------------------------------
        top_hops = int(self.train_hops.max())
        self.max_stage = min(cfg.curriculum.max_stage or top_hops, top_hops)
        if cfg.curriculum.enabled:
            if cfg.curriculum.start > self.max_stage:
                raise ValueError(f"curriculum.start ({cfg.curriculum.start}) exceeds the dataset's max hops ({self.max_stage})")
            if cfg.eval.max_hops is not None and cfg.eval.max_hops < self.max_stage:
                raise ValueError(f"eval.max_hops ({cfg.eval.max_hops}) must cover the last curriculum stage ({self.max_stage})")
        self.stage = cfg.curriculum.start if cfg.curriculum.enabled else 0
        self.stage_start_step = 0
        self.stages_passed: list[dict[str, Any]] = []
        self.epoch_offset = 0.0  # epochs of earlier curriculum stages (each stage has its own sampler)

        # --- model and optimisation ---------------------------------------------------------------------
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)
        self.model = LoopedTransformer(self.looped_cfg)
        self.model.vocab = ds.vocab
        self.model.to(self.device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.step_module = distributed.training_module(self.dist, self.model, self.device)
        if cfg.run.compile:  # compiled lazily, at the first step; the model itself (evaluation, hooks) stays eager
            self.step_module.compile(mode=cfg.run.compile_mode)
        self.optimizer = self._new_optimizer()
        self.grokfast = Grokfast(cfg.optim.grokfast_alpha, cfg.optim.grokfast_lambda) if cfg.optim.grokfast_lambda > 0 else None
        self.batches = self._new_batch_sampler()
        self.iterations = IterationSampler(cfg.recurrence, fixed=cfg.train_iterations, seed=cfg.run.seed)

        self.step = 0
        self.stop_reason: str | None = None
        self.last_eval: list[dict[str, Any]] = []
        self.last_eval_step = -1
        self.last_state_step = -1
        self._reset_window()
        self.metrics: MetricsLog | None = None

    # ------------------------------------------------------------------------------------------------
    def _new_optimizer(self) -> torch.optim.AdamW:
        return make_optimizer(self.model, self.cfg.optim, fused=self.device.type == "cuda")

    def _new_batch_sampler(self) -> BatchSampler:
        top = self.stage if self.cfg.curriculum.enabled else None
        return BatchSampler(self.train_hops, self.cfg.optim.batch_size, self.cfg.optim.atomic_share,
                            seed=self.cfg.run.seed, max_hops=top, tag=f"batches/stage{self.stage}")

    def _reset_window(self) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.window = {"loss": zero.clone(), "correct": zero.clone(), "n": 0, "steps": 0, "iterations": 0}

    @property
    def epoch(self) -> float:
        return round(self.epoch_offset + self.batches.epoch, 4)

    def _lr(self) -> float:
        start = self.stage_start_step if (self.cfg.curriculum.enabled and self.cfg.curriculum.reset_optimizer) else 0
        return lr_at(self.step - start, self.cfg.optim, self.cfg.optim.decay_steps)

    # ------------------------------------------------------------------------------------------------
    # One optimisation step
    # ------------------------------------------------------------------------------------------------
    def train_step(self) -> None:
        cfg = self.cfg
        rows = self.batches.next_batch()  # the global batch (every rank draws the same rows and R)
        n_iter = self.iterations.sample()
        width = int(self.train_lengths[rows].max())
        n_global = len(rows)
        rows = distributed.shard(self.dist, rows)  # this rank's share (all of it in one process)
        index = to_device(rows, self.device)
        tokens = self.train_tokens[index, :width]
        targets = self.train_answers[index]
        lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        backprop = None if cfg.recurrence.backprop_last is None else min(cfg.recurrence.backprop_last, n_iter)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            if cfg.recurrence.supervise == "from_hops":
                loss, answer_logits = self._loss_from_hops(tokens, targets, rows, n_iter, backprop)
            else:
                answer_logits = self.step_module(tokens, n_iter, backprop, False).float()
                loss = answer_loss(answer_logits, targets, cfg.optim.loss, cfg.optim.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        # across ranks DDP averages gradients: scaled so the average is the global batch's mean-loss gradient
        (loss * distributed.loss_scale(self.dist, len(rows), n_global)).backward()
        if self.grokfast is not None:
            self.grokfast.filter(self.model)
        if cfg.optim.orthograd:
            orthogonalize_gradients(self.params)
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        self.optimizer.step()
        self.step += 1
        w = self.window
        w["loss"] += loss.detach().double() * len(rows)
        w["correct"] += (answer_logits.detach().argmax(-1) == targets).sum().double()
        w["n"] += len(rows)
        w["steps"] += 1
        w["iterations"] += n_iter

    def _loss_from_hops(self, tokens: Tensor, targets: Tensor, rows: np.ndarray, n_iter: int,
                        backprop: int | None) -> tuple[Tensor, Tensor]:
        """recurrence.supervise = "from_hops": the answer loss averaged over every iteration t >= the query's
        hop count (a query with more hops than iterations is read after the last one). Returns the loss and
        the last iteration's answer logits (for the running train accuracy)."""
        cfg = self.cfg
        per_iter = self.step_module(tokens, n_iter, backprop, True).float()
        hops = to_device(self.train_hops[rows], self.device).clamp(max=n_iter)
        weight = (torch.arange(1, n_iter + 1, device=self.device)[:, None] >= hops[None, :]).float()  # [T, batch]
        weight = weight / weight.sum(0, keepdim=True)  # every query weighs the same in the mean
        flat_targets = targets.repeat(n_iter)
        nll = answer_loss(per_iter.flatten(0, 1), flat_targets, cfg.optim.loss, cfg.optim.label_smoothing,
                          reduction="none").view(n_iter, -1)
        return (nll * weight).sum() / len(rows), per_iter[-1]

    def _train_row(self) -> dict[str, Any]:
        w = self._global_window()  # the global batches' loss and accuracy, summed over ranks
        distributed.check_agree(self.dist, w["iterations"], self.device, "recurrence draws")
        n = max(w["n"], 1)
        row = {"step": self.step, "epoch": self.epoch, "stage": self.stage, "split": TRAIN_SPLIT, "hops": 0,
               "iterations": round(w["iterations"] / max(w["steps"], 1)),
               "accuracy": float(w["correct"]) / n, "loss": float(w["loss"]) / n, "n": w["n"]}
        self._reset_window()
        return row

    def _global_window(self) -> dict[str, Any]:
        """The train-loss window summed over ranks (one process: the window itself)."""
        if not self.dist.enabled:
            return dict(self.window)
        w = self.window
        n = torch.tensor(float(w["n"]), dtype=torch.float64, device=self.device)
        loss, correct, n = distributed.sum_over_ranks(self.dist, torch.stack([w["loss"], w["correct"], n]))
        return {**w, "loss": loss, "correct": correct, "n": int(n.item())}

    # ------------------------------------------------------------------------------------------------
    # Evaluation, curriculum, stops
    # ------------------------------------------------------------------------------------------------
    def evaluate(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        rows = None
        if self.dist.is_main:  # rank 0 evaluates; every rank gets its rows (curriculum and stops agree)
            rows = evaluate_set(self.model, self.evalset, self.eval_iterations, bf16=self.bf16,
                                halting=self.halting, halting_max_iterations=cfg.eval.halting_max_iterations)
        rows = distributed.broadcast(self.dist, rows)
        self.last_eval, self.last_eval_step = rows, self.step
        return [{"step": self.step, "epoch": self.epoch, "stage": self.stage, **r} for r in rows]

    def after_eval(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Curriculum and target-accuracy checks; returns extra metrics rows (passed stages)."""
        cfg = self.cfg
        extra = []
        if cfg.run.stop_split is not None:
            acc = split_accuracy(rows, cfg.run.stop_split, cfg.train_iterations)
            if acc is not None and acc >= cfg.run.stop_accuracy:
                self.stop_reason = "target_accuracy"
        if cfg.curriculum.enabled and self.step > 0:
            key = HALTING_ITERATIONS if cfg.curriculum.metric == "halting" else cfg.train_iterations
            acc = split_accuracy(rows, "test", key, hops=self.stage)
            if acc is not None and acc > cfg.curriculum.threshold:
                n = sum(r["n"] for r in rows if r["split"] == "test" and r["hops"] == self.stage and r["iterations"] == key)
                extra.append({"step": self.step, "epoch": self.epoch, "stage": self.stage, "split": STAGE_SPLIT,
                              "hops": self.stage, "iterations": key, "accuracy": acc, "loss": None, "n": n})
                self.stages_passed.append({"stage": self.stage, "step": self.step, "accuracy": acc})
                if self.stage >= self.max_stage:
                    self.stop_reason = "curriculum_complete"
                else:
                    self.stage += 1
                    self.stage_start_step = self.step
                    self.epoch_offset += self.batches.epoch
                    self.batches = self._new_batch_sampler()
                    if cfg.curriculum.reset_optimizer:
                        self.optimizer = self._new_optimizer()
            elif self.step - self.stage_start_step >= cfg.curriculum.stage_budget:
                self.stop_reason = "stage_budget"
        return extra

    @property
    def learnable_depth(self) -> int | None:
        if not self.cfg.curriculum.enabled:
            return None
        return max((s["stage"] for s in self.stages_passed), default=1)

    # ------------------------------------------------------------------------------------------------
    # Files
    # ------------------------------------------------------------------------------------------------
    def write_config(self, resumes: list[dict[str, Any]] | None = None) -> None:
        if not self.dist.is_main:  # rank 0 writes the run directory
            return
        ds = self.dataset
        meta = {
            "format": RUN_FORMAT,
            "name": self.paths.root.name,
            "config": self.cfg.to_dict(),
            "model_config": self.looped_cfg.to_dict(),
            "dataset": {"path": str(Path(ds.path).resolve()), "checksum": ds.checksum, "dirname": ds.config.dirname(),
                        "split_names": ds.split_names, "max_hops": ds.max_hops},
            "eval": {"splits": self.eval_names, "iterations": self.eval_iterations},
            "provenance": {**provenance(), "seed": self.cfg.run.seed, "device": str(self.device),
                           "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                           "torch_threads": torch.get_num_threads()},
            "command": self.command,
            "resumes": resumes or [],
            "n_parameters": sum(p.numel() for p in self.params),
        }
        write_json(self.paths.config, meta)

    def save_checkpoint(self) -> None:
        if not self.dist.is_main:
            return
        save_checkpoint(self.model, self.paths.checkpoint(self.step), step=self.step, epoch=self.epoch,
                        seed=self.cfg.run.seed, dataset_checksum=self.dataset.checksum, stage=self.stage,
                        run=self.paths.root.name, train_iterations=self.cfg.train_iterations)

    def save_state(self) -> None:
        """The full training state, written atomically; metrics are flushed first and their length recorded."""
        window = self._global_window()  # global quantities only, so any world size can resume
        if not self.dist.is_main:
            self.last_state_step = self.step
            return
        self.metrics.flush()
        state = {
            "format": STATE_FORMAT,
            "step": self.step,
            "stage": self.stage,
            "stage_start_step": self.stage_start_step,
            "epoch_offset": self.epoch_offset,
            "stages_passed": self.stages_passed,
            "stop_reason": self.stop_reason,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grokfast": None if self.grokfast is None else self.grokfast.state_dict(),
            "batch_sampler": self.batches.state_dict(),
            "iteration_sampler": self.iterations.state_dict(),
            "rng": _rng_states(),
            "window": window,
            "metrics_bytes": self.metrics.size(),
            "metrics_rows": self.metrics.rows,
            "dataset_checksum": self.dataset.checksum,
            # the evaluation already in metrics.csv for this step, if any: a resume must not repeat it
            "last_eval_step": self.last_eval_step,
            "last_eval": self.last_eval if self.last_eval_step == self.step else [],
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.paths.state, buf.getvalue())
        self.last_state_step = self.step

    def load_state(self) -> None:
        try:  # RNG states must stay on the CPU
            state = torch.load(self.paths.state, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, garbage or pickled objects weights_only refuses: one line
            from looplens.data.files import InvalidFileError

            problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InvalidFileError(self.paths.state, f"cannot be read as a training state ({problem[:160]}); "
                                   "delete it to restart from the last checkpoint, or start a new run") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"{self.paths.state}: not a looplens training state")
        if state["dataset_checksum"] != self.dataset.checksum:
            raise ValueError(f"{self.paths.state}: saved for dataset {state['dataset_checksum'][:12]}, "
                             f"this config builds {self.dataset.checksum[:12]}")
        self.step = int(state["step"])
        self.stage = int(state["stage"])
        self.stage_start_step = int(state["stage_start_step"])
        self.epoch_offset = float(state.get("epoch_offset", 0.0))  # states saved before this field existed
        self.stages_passed = list(state["stages_passed"])
        self.stop_reason = state["stop_reason"]
        self.model.load_state_dict(state["model"])
        self.optimizer = self._new_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        if self.grokfast is not None:
            if state["grokfast"] is None:
                raise ValueError(f"{self.paths.state}: saved without a Grokfast state but optim.grokfast_lambda > 0")
            self.grokfast.load_state_dict(state["grokfast"], self.device)
        self.batches = self._new_batch_sampler()
        self.batches.load_state_dict(state["batch_sampler"])
        self.iterations.load_state_dict(state["iteration_sampler"])
        rng = state["rng"]
        rng["python"] = _tuplify(rng["python"])
        _set_rng_states(rng)
        self.window = dict(state["window"])
        self.window["loss"] = self.window["loss"].to(self.device)
        self.window["correct"] = self.window["correct"].to(self.device)
        if not self.dist.is_main:  # the saved window is summed over ranks: rank 0 carries it on
            self.window.update(loss=torch.zeros_like(self.window["loss"]),
                               correct=torch.zeros_like(self.window["correct"]), n=0)
            self.last_state_step = self.step
            if state.get("last_eval_step") == self.step:
                self.last_eval_step, self.last_eval = self.step, list(state["last_eval"])
            return
        self.metrics.truncate(int(state["metrics_bytes"]))
        if self.metrics.rows != int(state["metrics_rows"]):
            raise ValueError(f"{self.paths.metrics}: {self.metrics.rows} rows after truncation, the saved state "
                             f"says {state['metrics_rows']}; the run directory was modified")
        self.last_state_step = self.step
        if state.get("last_eval_step") == self.step:  # states saved before this field existed: evaluate again
            self.last_eval_step, self.last_eval = self.step, list(state["last_eval"])

    def write_summary(self, status: str, wall: float, steps_done: int) -> None:
        if not self.dist.is_main:
            return
        final = {}
        for split in self.eval_names:
            acc = split_accuracy(self.last_eval, split, self.cfg.train_iterations)
            if acc is not None:
                final[split] = acc
        summary = {
            "status": status,
            "stop_reason": self.stop_reason,
            "final_step": self.step,
            "last_saved_step": self.last_state_step,
            "epoch": self.epoch,
            "stage": self.stage,
            "learnable_depth": self.learnable_depth,
            "stages_passed": self.stages_passed,
            "last_eval_step": self.last_eval_step,
            "final_accuracy": final,
            "train_iterations": self.cfg.train_iterations,
            "wall_seconds": round(wall, 2),
            "steps_per_second": round(steps_done / wall, 3) if wall > 0 else None,
            "checkpoints": self.paths.checkpoint_steps(),
        }
        write_json(self.paths.summary, summary)

    # ------------------------------------------------------------------------------------------------
    def _postfix(self, loss: float | None) -> dict[str, str]:
        out = {}
        if loss is not None:
            out["loss"] = f"{loss:.3f}"
        t = self.cfg.train_iterations
        if self.cfg.data.task == "composition":
            for label, split in (("train", "train_inferred"), ("id", "test_inferred_id"), ("ood", "test_inferred_ood")):
                acc = split_accuracy(self.last_eval, split, t)
                if acc is not None:
                    out[label] = f"{acc:.2f}"
        else:
            acc = split_accuracy(self.last_eval, "train_eval", t)
            if acc is not None:
                out["train"] = f"{acc:.2f}"
            if self.cfg.curriculum.enabled:
                out["stage"] = str(self.stage)
                acc = split_accuracy(self.last_eval, "test", t, hops=self.stage)
            else:
                acc = split_accuracy(self.last_eval, "test", t)
            if acc is not None:
                out["test"] = f"{acc:.2f}"
        return out

    def run(self, resume: bool) -> RunResult:
        cfg = self.cfg
        self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
        resumes = []
        if resume and self.paths.config.exists():
            import json

            resumes = json.loads(self.paths.config.read_text()).get("resumes", [])
        self.metrics = MetricsLog(self.paths.metrics) if self.dist.is_main else distributed.NullMetrics()
        resumed_from = None
        if resume and self.paths.state.exists():
            self.load_state()
            resumed_from = self.step
            resumes.append({"step": self.step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "max_steps": cfg.run.max_steps, "command": self.command})
        elif resume:
            self.metrics.truncate(len(",".join(_metrics_header()) + "\n"))
        self.write_config(resumes)

        t0 = time.monotonic()
        start_step = self.step
        budget = None if cfg.run.time_budget_minutes is None else cfg.run.time_budget_minutes * 60.0
        if resumed_from is None:  # fresh start: evaluate and save the initial model
            self.metrics.add(self.evaluate())
            self.save_checkpoint()
            self.save_state()
        if self.stop_reason in FINAL_STOPS:  # resuming a run that ended for good: nothing to do
            return self._result(0.0, 0)

        bar = tqdm(total=cfg.run.max_steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, leave=True)
        self.write_summary("running", 0.0, 0)
        last_loss = None
        try:
            while True:
                if self.stop_reason in FINAL_STOPS:
                    break
                if self.step >= cfg.run.max_steps:
                    self.stop_reason = "max_steps"
                    break
                if budget is not None and distributed.any_rank(self.dist, time.monotonic() - t0 >= budget, self.device):
                    self.stop_reason = "time_budget"
                    break
                self.train_step()
                if self.step % cfg.run.log_every == 0:
                    row = self._train_row()
                    last_loss = row["loss"]
                    self.metrics.add([row])
                    bar.set_postfix(self._postfix(last_loss), refresh=False)
                if self.step % cfg.eval.every == 0:
                    rows = self.evaluate()
                    self.metrics.add(rows)
                    self.metrics.add(self.after_eval(rows))
                    self.metrics.flush()
                    bar.set_postfix(self._postfix(last_loss), refresh=False)
                permanent = checkpoint_schedule(self.step, cfg.run.checkpoint_every, cfg.run.log_checkpoints)
                if permanent:
                    self.save_checkpoint()
                if permanent or self.step % cfg.run.save_every == 0 or self.stop_reason in FINAL_STOPS:
                    self.save_state()
                    self.write_summary("running", time.monotonic() - t0, self.step - start_step)
                bar.update(1)
        except KeyboardInterrupt:
            self.stop_reason = "interrupted"
            self.write_summary("interrupted", time.monotonic() - t0, self.step - start_step)
            raise
        finally:
            bar.close()

        # The end: a final checkpoint and state, then (if this step was not an evaluation step) a final
        # evaluation. Its rows come after the saved metrics length, so a resumed run drops them and an
        # uninterrupted run's metrics.csv is reproduced byte for byte.
        if not self.paths.checkpoint(self.step).with_suffix(".json").exists():
            self.save_checkpoint()
        if self.last_state_step != self.step:
            self.save_state()
        if self.last_eval_step != self.step:
            self.metrics.add(self.evaluate())
        self.metrics.flush()
        wall = time.monotonic() - t0
        status = "finished" if self.stop_reason in (*FINAL_STOPS, "max_steps") else "stopped"
        self.write_summary(status, wall, self.step - start_step)
        return self._result(wall, self.step - start_step)

    def _result(self, wall: float, steps: int) -> RunResult:
        final = {s: split_accuracy(self.last_eval, s, self.cfg.train_iterations) for s in self.eval_names}
        return RunResult(self.paths.root, self.step, self.epoch, self.stop_reason or "",
                         {k: v for k, v in final.items() if v is not None}, self.learnable_depth, wall,
                         steps / wall if wall > 0 else 0.0)


def _metrics_header() -> tuple[str, ...]:
    from looplens.models.train.run import METRICS_COLUMNS

    return METRICS_COLUMNS


def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if resume:
        if not (out / "config.json").exists():
            raise FileNotFoundError(f"--out {out}: no run to resume (no config.json)")
        return
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"--out {out} already exists; pass --resume to continue it or --overwrite to replace it")
        if any(out.iterdir()) and not (out / "config.json").exists():
            raise FileExistsError(f"--out {out} exists and is not a looplens run directory; refusing to overwrite it")
        shutil.rmtree(out)


def _resume_config(cfg: TrainConfig | None, out: Path) -> TrainConfig:
    """The config a resumed run continues with: the saved one, with only RESUMABLE_KEYS changed."""
    saved = load_run(out).config
    if cfg is None:
        return saved
    changed = [k for k in saved.differences(cfg) if k not in RESUMABLE_KEYS]
    # a decay horizon resolved from max_steps at the first start stays as it was
    changed = [k for k in changed if not (k == "optim.decay_steps" and cfg.optim.decay_steps is None)]
    if changed:
        raise ValueError(f"--resume: the config differs from the saved run in {', '.join(changed)} "
                         f"(only {', '.join(sorted(RESUMABLE_KEYS))} may change)")
    d = saved.to_dict()
    for key in RESUMABLE_KEYS:
        section, name = key.split(".")
        d[section][name] = cfg.get(key)
    return TrainConfig.from_dict(d)


def train(cfg: TrainConfig | None, out_dir: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True, command: list[str] | None = None) -> RunResult:
    """Train a model as configured, writing the run directory ``out_dir``.

    ``resume=True`` continues ``out_dir`` from its last saved state (``cfg`` may then be None: the
    saved config is used; otherwise it must match it except for run.max_steps, run.time_budget_minutes,
    run.device, run.threads, run.data_root). An existing ``out_dir`` is never replaced unless
    ``overwrite=True``. ``progress`` shows a tqdm bar (stderr); the library prints nothing else.

    On CPU, torch runs with ``run.threads`` threads for the duration of the call (restored after).

    Example (trains and writes a run directory, so not a doctest; tests/test_train_run.py covers it)::

        from looplens.models.train import preset, train
        result = train(preset("smoke-composition"), "runs/smoke")
        result.final["test_inferred_id"]
    """
    out = Path(out_dir)
    if resume or not distributed.from_env().enabled:
        _check_out_dir(out, resume, overwrite)  # with resume it only reads: every rank may check
    if resume:
        cfg = _resume_config(cfg, out)
    elif cfg is None:
        raise ValueError("train: a config is needed unless resume=True")
    if cfg.optim.schedule != "constant" and cfg.optim.decay_steps is None:
        d = cfg.to_dict()
        d["optim"]["decay_steps"] = max(cfg.run.max_steps - cfg.optim.warmup_steps, 1)
        cfg = TrainConfig.from_dict(d)
    old_threads = torch.get_num_threads()
    device = resolve_device(cfg.run.device)
    if device.type == "cpu" and cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    dist = distributed.from_env()
    try:
        with distributed.process_group(dist, device.type):  # torchrun: join the job for this run
            if dist.enabled and not resume:  # rank 0 checks (and with overwrite, clears) --out first
                distributed.on_main(dist, lambda: _check_out_dir(out, resume, overwrite))
            trainer = Trainer(cfg, out, progress, command)
            return trainer.run(resume)
    finally:
        torch.set_num_threads(old_threads)
