"""Data-parallel training of one run on several processes (``torchrun --nproc_per_node N -m looplens train``).

torchrun starts N copies of ``looplens train`` with RANK / WORLD_SIZE / LOCAL_RANK set. Every rank builds
the same trainer (same seed: same model, samplers and RNGs) and draws the same *global* batch and the same
recurrence R; each rank then trains on its shard of the batch (rows ``rank::world_size``) through
DistributedDataParallel, which averages the gradients. The local loss is scaled by
``n_local * world_size / n_global`` so that the averaged gradient is exactly the global batch's mean-loss
gradient, whatever the shard sizes: N processes train the run a single process would train with the same
global batch (to floating-point reduction order; with dropout off, since each rank draws its own masks).

Rank 0 alone evaluates (and broadcasts the rows, so curriculum and stop decisions agree), writes the run
directory and draws the progress bar. The resumable state holds only global quantities (the samplers,
rank 0's RNGs, the train-loss window summed over ranks), so a run resumes with any world size.

Nothing here is used when WORLD_SIZE is unset or 1: the single-process trainer runs unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist
from jaxtyping import Float, Int
from torch import Tensor, nn

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK); a single process without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK {rank} / WORLD_SIZE {world}: expected 0 <= RANK < WORLD_SIZE")
    return Dist(rank, world, local)


@contextlib.contextmanager
def process_group(dist: Dist, device_type: str) -> Iterator[None]:
    """Join the torchrun job for the duration (gloo on CPU, nccl on CUDA); a no-op for one process or when
    the caller already initialised a group."""
    created = False
    if dist.enabled and not torch_dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(dist.local_rank)
        torch_dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        created = True
    try:
        yield
        if created:
            # every rank reaches the teardown together: rank 0 still evaluates and writes after the last step,
            # and a rank that tore gloo down while its peer was mid-way aborted now and then ("terminate called
            # without an active exception", SIGABRT)
            torch_dist.barrier()
    finally:
        if created:
            torch_dist.destroy_process_group()


def device_for(dist: Dist, device: torch.device) -> torch.device:
    """Each rank's CUDA device is its local rank's GPU; CPU stays CPU."""
    if dist.enabled and device.type == "cuda":
        return torch.device("cuda", dist.local_rank)
    return device


def on_main(dist: Dist, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only (a directory check, a dataset build), then let every rank go on; an
    error on rank 0 is raised on every rank (as ValueError with rank 0's message), so no rank waits forever.
    Returns ``fn``'s result on rank 0 and None elsewhere."""
    if not dist.enabled:
        return fn()
    result, error = None, None
    if dist.is_main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    torch_dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise ValueError(f"rank 0 failed: {message[0]}")
    return result


def broadcast(dist: Dist, obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled; for small things such as evaluation rows)."""
    if not dist.enabled:
        return obj
    box = [obj if dist.is_main else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(dist: Dist, flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on some rank (a wall-clock stop must stop all ranks at once)."""
    if not dist.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sum_over_ranks(dist: Dist, values: Float[Tensor, " k"]) -> Float[Tensor, " k"]:
    """The sum of ``values`` over ranks (a new tensor; ``values`` is left as it was)."""
    out = values.clone()
    if dist.enabled:
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out


def check_agree(dist: Dist, value: int, device: torch.device, what: str) -> None:
    """Raise on every rank if ``value`` differs between ranks (e.g. the recurrence draws)."""
    if not dist.enabled:
        return
    t = torch.tensor([value, -value], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)  # [max, -min]
    if t[0].item() != -t[1].item():
        raise RuntimeError(f"{what} differ across ranks (min {-t[1].item():g}, max {t[0].item():g}); "
                           "every rank must draw the same global batch and recurrence")


def shard(dist: Dist, rows: np.ndarray) -> np.ndarray:
    """This rank's rows of the global batch: every world_size-th row, so hop counts and atomic facts
    spread over the ranks as they are spread over the batch.

    >>> shard(Dist(1, 2, 1), np.arange(5))
    array([1, 3])
    """
    return rows[dist.rank :: dist.world_size] if dist.enabled else rows


def loss_scale(dist: Dist, n_local: int, n_global: int) -> float:
    """Factor on a rank's mean loss so that DDP's gradient average is the global batch's mean-loss gradient.

    >>> [loss_scale(Dist(r, 2, r), n, 5) for r, n in ((0, 3), (1, 2))]  # (1.2 m0 + 0.8 m1) / 2 = (3 m0 + 2 m1) / 5
    [1.2, 0.8]
    """
    return n_local * dist.world_size / n_global if dist.enabled else 1.0


class AnswerLogits(nn.Module):
    """The training forward as one module call (what DDP wraps): answer logits at each query's readout
    position, after the last iteration ([batch, vocab]) or after every iteration ([iteration, batch,
    vocab], for ``recurrence.supervise = "from_hops"``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Int[Tensor, "batch pos"], n_iterations: int, backprop_last: int | None,
                per_iteration: bool) -> Tensor:
        if per_iteration:
            return self.model.answer_logits_by_iteration(tokens, n_iterations, backprop_last=backprop_last)
        logits = self.model(tokens, n_iterations=n_iterations, return_type="logits", backprop_last=backprop_last)
        pos = self.model.readout_positions(tokens)
        return logits[torch.arange(tokens.shape[0], device=tokens.device), pos]


def training_module(dist: Dist, model: nn.Module, device: torch.device) -> nn.Module:
    """The module a training step calls: :class:`AnswerLogits`, wrapped in DDP across ranks."""
    module = AnswerLogits(model)
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # every parameter takes part in every step (the loop runs all blocks at least once; a block used at
    # several iterations gets its gradient accumulated before DDP reduces it), so no unused-parameter search
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


class NullMetrics:
    """metrics.csv on ranks other than 0: accepts rows, writes nothing."""

    rows = 0

    def add(self, rows: list[dict[str, Any]]) -> None:
        pass

    def flush(self) -> None:
        pass

    def size(self) -> int:
        return 0

    def truncate(self, n_bytes: int) -> None:
        pass
