"""The looped (recurrent-depth, weight-shared) transformer.

Architecture (the paper's section 5/6 model when prelude and coda are empty)::

    tokens -> embed (+ learned positions) -> prelude blocks
           -> for t in range(n_iterations): [inject input] -> core blocks 0..L-1     <- shared weights
           -> coda blocks -> ln_final -> unembed (tied to the embedding)

Two related architectures are options of the same class, off by default (see their sections below):
hyper-connections on the loop (``cfg.hyper_streams > 1``, Hyperloop) and two-timescale loops
(``cfg.slow_period > 0``, HRM). Both carry state between iterations beyond the readout state
(``LoopStep.carry``).

The loop runs in one place, :meth:`LoopedTransformer.steps` (the loop driver); forward and every analysis
iterate with it. The parts are in models/components.py; the TransformerLens plumbing (a hook name per
iteration, aliases, run_with_cache, ...) in models/hooked.py.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from looplens.models.components import (
    BlockParams,
    Embed,
    IterationHooks,
    LayerNorm,
    LayerNormParams,
    PosEmbed,
    TransformerBlock,
    Unembed,
    _has_hooks,
    init_block_params,
    reuse_weights,
)
from looplens.models.config import LoopedConfig
from looplens.models.hooked import HookedLoopedModel, LoopedActivationCache, ModelAtIterations, host_checks
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

__all__ = ["AdaptiveOutput", "LoopStep", "LoopedActivationCache", "LoopedTransformer", "ModelAtIterations"]


@dataclass
class AdaptiveOutput:
    """Result of :meth:`LoopedTransformer.forward_adaptive`."""

    logits: Float[Tensor, "batch d_vocab"]  # readout logits at each sample's halting iteration
    iterations: Int[Tensor, " batch"]  # iterations each sample used (1-based)
    halted: Tensor  # bool [batch]: the rule fired (False: ran to max_iterations)


@dataclass(eq=False)
class LoopStep:
    """One iteration of :meth:`LoopedTransformer.steps`: where the loop is, and a lazy readout from there."""

    iteration: int  # 0-based
    n_iterations: int  # the run's length T; the coda (if any) sits after iteration T - 1
    state: Float[Tensor, "batch pos d_model"]  # after this iteration (the output of loop.{t}.hook_state)
    loop_input: Float[Tensor, "batch pos d_model"] | None  # embed + prelude, re-injected by cfg.input_injection
    tokens: Int[Tensor, "batch pos"] = field(repr=False)
    model: LoopedTransformer = field(repr=False)
    _memo: dict = field(default_factory=dict, repr=False)  # shared by the steps of one run
    # What the loop carries besides ``state`` (None for the plain loop): with hyper_streams > 1 every stream,
    # [batch, pos, stream, d_model] (stream 0 is ``state``); with slow_period > 0 the fast state z_L.
    carry: Tensor | None = field(default=None, repr=False)

    @property
    def is_last(self) -> bool:
        return self.iteration == self.n_iterations - 1

    @property
    def positions(self) -> Int[Tensor, " batch"]:
        """Each query's readout position (computed on first use, once per run)."""
        if "positions" not in self._memo:
            self._memo["positions"] = self.model.readout_positions(self.tokens)
        return self._memo["positions"]

    def readout(self) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits at every position if the run stopped here: coda, final LayerNorm, unembedding."""
        return self.model.readout(self.state, self.n_iterations)

    def answer_logits(self) -> Float[Tensor, "batch d_vocab"]:
        """Logits at each query's readout position if the run stopped here (``predict`` after t + 1
        iterations). Without a coda only those positions are decoded: LN and unembedding act per position."""
        rows = torch.arange(self.state.shape[0], device=self.state.device)
        if self.model.cfg.n_coda:  # the coda's attention needs every position
            return self.readout()[rows, self.positions]
        return self.model.readout(self.state[rows, self.positions][:, None], self.n_iterations)[:, 0]


class HyperConnections(nn.Module):
    """Static hyper-connections around the looped block stack (``cfg.hyper_streams = n > 1``).

    ``W_mix`` [stream_out, stream_in] mixes the n streams before each iteration; its first row is the
    width connection (the block stack reads stream 0 of the mixed streams, a learned weighted sum of the
    streams). ``w_depth`` [n - 1] are the depth connection's weights: the block stack's update is written
    into streams 1..n-1 with these weights and into stream 0 with weight 1 (see
    :meth:`LoopedTransformer._hyper_iteration` for why the two ties). Init: ``W_mix = I``, ``w_depth = 0``.
    """

    def __init__(self, n_streams: int):
        super().__init__()
        self.W_mix = nn.Parameter(torch.eye(n_streams))
        self.w_depth = nn.Parameter(torch.zeros(n_streams - 1))


class FastStepHooks(nn.Module):
    """Hook modules of one fast step of a two-timescale loop (``loop.{t}.fast.{s}``): a TransformerBlock per
    fast block, computing with the fast module's weights (a reference: nothing registered twice), and
    ``hook_state``, the fast state z_L after the step."""

    def __init__(self, cfg: LoopedConfig, fast: nn.ModuleList):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(cfg, params) for params in fast)
        self.hook_state = HookPoint()  # [batch, pos, d_model]


class LoopedTransformer(HookedLoopedModel):
    """A weight-shared transformer looped ``n_iterations`` times, with a hook name per iteration.

    >>> import torch
    >>> cfg = LoopedConfig(d_vocab=20, n_ctx=4, d_model=16, n_heads=2, n_blocks=2, n_iterations=3, seed=0)
    >>> model = LoopedTransformer(cfg)
    >>> tokens = torch.tensor([[1, 5, 7]])
    >>> model(tokens).shape
    torch.Size([1, 3, 20])
    >>> logits, cache = model.run_with_cache(tokens, n_iterations=5)
    >>> cache["blocks.9.hook_resid_post"].shape, cache.model.cfg.n_layers
    (torch.Size([1, 3, 16]), 10)
    >>> torch.equal(cache["loop.4.blocks.1.hook_resid_post"], cache["blocks.9.hook_resid_post"])
    True
    """

    def __init__(self, cfg: LoopedConfig, vocab: Any | None = None):
        super().__init__()
        self.cfg = cfg
        self.vocab = vocab  # optional data.Vocab: enables to_tokens / to_str_tokens
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.positional == "learned":
            self.pos_embed = PosEmbed(cfg)
            self.hook_pos_embed = HookPoint()
        self.embed_dropout = nn.Dropout(cfg.dropout if cfg.embed_dropout is None else cfg.embed_dropout)
        # Physical weights: each exists once.
        self.prelude = nn.ModuleList(BlockParams(cfg) for _ in range(cfg.n_prelude))
        self.core = nn.ModuleList(BlockParams(cfg) for _ in range(cfg.n_blocks))
        self.coda = nn.ModuleList(BlockParams(cfg) for _ in range(cfg.n_coda))
        if cfg.input_injection == "concat":
            # [state; input] -> state. Starts as "keep the state, add a little input" (see init).
            self.W_inject = nn.Parameter(torch.empty(2 * cfg.d_model, cfg.d_model))
        if cfg.hyper_streams > 1:
            self.hyper = HyperConnections(cfg.hyper_streams)
        if cfg.slow_period:  # the fast (low-level) module; the core blocks are the slow (high-level) one
            self.fast = nn.ModuleList(BlockParams(cfg) for _ in range(cfg.n_fast_blocks))
        self.ln_final = LayerNorm(cfg, LayerNormParams(cfg), own=True)
        self.unembed = Unembed(cfg, self.embed)
        # Hook-only modules, one per virtual layer / iteration, grown on demand.
        self.blocks = nn.ModuleList()
        self.loop = nn.ModuleList()
        self._bound_iterations: int | None = None
        self._init_weights()
        self._grow(cfg.n_iterations)

    # ------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------
    def _init_weights(self) -> None:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        with torch.no_grad():
            embed_std = cfg.init_std if cfg.embed_init_std is None else cfg.embed_init_std
            self.embed.W_E.normal_(0.0, embed_std, generator=gen)
            if cfg.positional == "learned":
                self.pos_embed.W_pos.normal_(0.0, embed_std, generator=gen)
            for params in [*self.prelude, *self.core, *self.coda]:
                init_block_params(params, cfg, gen)
            if not cfg.tie_embeddings:
                self.unembed.W_U_untied.normal_(0.0, cfg.init_std, generator=gen)
            if cfg.input_injection == "concat":
                self.W_inject.zero_()
                self.W_inject[: cfg.d_model].copy_(torch.eye(cfg.d_model))
                self.W_inject[cfg.d_model :].normal_(0.0, cfg.init_std, generator=gen)
            for params in self.fast if cfg.slow_period else ():  # drawn last: the other weights stay as without
                init_block_params(params, cfg, gen)

    def _iteration_hooks(self, iteration: int) -> nn.Module:
        hooks = IterationHooks(feedback=self.cfg.feedback > 0 and iteration > 0)
        if self.cfg.hyper_streams > 1:
            hooks.hook_streams = HookPoint()  # [batch, pos, stream, d_model], every stream after the iteration
        if self.cfg.slow_period:
            hooks.fast = nn.ModuleList(FastStepHooks(self.cfg, self.fast) for _ in range(self.cfg.slow_period))
        return hooks

    @property
    def carries_state(self) -> bool:
        """Whether the loop carries more than the readout state between iterations (hyper-connections, two
        timescales): then :class:`LoopStep` has a ``carry`` and ``iterate`` gives way to :meth:`iterate_carried`."""
        return self.cfg.hyper_streams > 1 or self.cfg.slow_period > 0

    # ------------------------------------------------------------------------------------------------
    # Step-level entry points: embed -> iterate (x T) -> readout
    # ------------------------------------------------------------------------------------------------
    def embed_tokens(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """Token (+ position) embedding, then the prelude blocks: the loop's initial state."""
        resid = self.hook_embed(self.embed(tokens))
        if self.cfg.positional == "learned":
            if _has_hooks(self.hook_pos_embed):
                resid = resid + self.hook_pos_embed(self.pos_embed(tokens))  # [batch, pos, d_model], as TL's
            else:  # nothing reads it: broadcast over the batch instead of copying per query
                resid = resid + self.pos_embed.W_pos[: tokens.shape[1]]
        resid = self.embed_dropout(resid)
        for v in range(self.cfg.n_prelude):
            resid = self._block(v, self.prelude[v])(resid)
        return resid

    def iterate(
        self, state: Float[Tensor, "batch pos d_model"], iteration: int, injected: Tensor | None = None,
        *, from_block: int | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """One iteration of the loop: (input injection and readout feedback for t >= 1) then core blocks
        0..L-1, then ``loop.{t}.hook_state``.

        ``injected`` is the loop's initial state (embed_tokens output), re-injected when
        ``cfg.input_injection`` is "add" or "concat". ``from_block=l`` resumes the iteration at core
        block l with ``state`` its resid_pre (injection and feedback, upstream of block 0, are skipped).
        """
        cfg = self.cfg
        if self.carries_state:
            raise ValueError(f"iterate: this loop carries more than the state (hyper_streams={cfg.hyper_streams}, "
                             f"slow_period={cfg.slow_period}): use iterate_carried(state, carry, ...) or steps()")
        self._grow(iteration + 1)
        if from_block is None and iteration > 0 and cfg.input_injection != "none":
            if injected is None:
                raise ValueError("input injection is on: pass the embedded input as `injected`")
            if cfg.input_injection == "add":
                state = state + injected
            else:
                state = torch.cat([state, injected], dim=-1) @ self.W_inject
        if from_block is None and iteration > 0 and cfg.feedback:
            state = state + self.loop[iteration].hook_feedback(self.feedback_vector(state))
        for l in range(from_block or 0, cfg.n_blocks):
            state = self._block(self.virtual_layer(iteration, l), self.core[l])(state)
        return self.loop[iteration].hook_state(state)

    def initial_state(self, loop_input: Float[Tensor, "batch pos d_model"]
                      ) -> tuple[Float[Tensor, "batch pos d_model"], Tensor | None]:
        """(state, carry) before iteration 0: the loop's input and, with hyper-connections, every stream a copy
        of it; with two timescales z_H = z_L = 0 (see :meth:`_two_timescale_iteration`); else no carry."""
        if self.cfg.hyper_streams > 1:
            return loop_input, einops.repeat(loop_input, "batch pos d_model -> batch pos stream d_model",
                                             stream=self.cfg.hyper_streams)
        if self.cfg.slow_period:
            return torch.zeros_like(loop_input), torch.zeros_like(loop_input)
        return loop_input, None

    def iterate_carried(
        self, state: Float[Tensor, "batch pos d_model"], carry: Tensor, iteration: int,
        injected: Float[Tensor, "batch pos d_model"], *, from_block: int | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], Tensor]:
        """One iteration of a loop that carries state (``carries_state``): ``(state, carry) -> (state, carry)``.

        ``state`` and ``carry`` are what :meth:`initial_state` (at t = 0) or the previous call returned,
        ``injected`` the loop's input. ``from_block=l``
        resumes at core block l with ``state`` its resid_pre; ``carry`` is then the one *into* iteration t
        (two timescales: the fast state after iteration t's fast steps).
        """
        self._grow(iteration + 1)
        if self.cfg.hyper_streams > 1:
            return self._hyper_iteration(state, carry, iteration, from_block)
        return self._two_timescale_iteration(state, carry, iteration, injected, from_block)

    # --- hyper-connections (cfg.hyper_streams > 1) ----------------------------------------------------
    def _hyper_iteration(self, state: Float[Tensor, "batch pos d_model"],
                         streams: Float[Tensor, "batch pos stream d_model"], iteration: int, from_block: int | None
                         ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos stream d_model"]]:
        """One iteration with static hyper-connections (Zhu et al. 2024, "Hyper-Connections"), applied at the
        iteration level, around the whole looped block stack (as Hyperloop mixes after each loop iteration;
        per-block connections would change every block's residual and so TransformerLens's block hooks)::

            mixed = W_mix @ streams              # stream mixing, n x n (the paper's A_r)
            x     = mixed[0]                     # width connection: the blocks read row 0 of W_mix . streams
            y     = blocks(x)                    # core blocks 0..L-1, blocks.{v}.* hooks as usual
            streams' = mixed + w (y - x),  w = (1, w_depth)   # depth connection (the paper's B)

        so stream 0 after the iteration is exactly ``y``, the last block's resid_post, and it is the readout
        state (``loop.{t}.hook_state``, ``LoopStep.state``): the logit lens of the last layer is the model's
        output and every interp function reads what the readout reads. That is why the width connection is
        tied to the mixing's first row and stream 0's depth weight is fixed at 1 (the paper's free width
        vector, and its readout of the summed streams, would make the readout state no block's activation).
        What the extra streams add is what the *next* iteration reads: ``W_mix[0] . streams'`` instead of y.
        Weights are shared by all iterations, like the blocks (so the iteration count stays a run argument).

        Init (``W_mix = I``, ``w_depth = 0``, streams start as copies of the loop's input): exactly the plain
        looped model with the same blocks, streams 1..n-1 holding the loop's input unchanged, so learning
        ``W_mix[0, 1:]`` is learning to re-inject the input, and the streams differ from the first step
        (n identical streams with symmetric weights would never break the symmetry).
        """
        cfg = self.cfg
        mixed = einops.einsum(self.hyper.W_mix, streams,
                              "stream_out stream_in, batch pos stream_in d_model -> batch pos stream_out d_model")
        read = mixed[:, :, 0]
        resid = read if from_block is None else state
        for l in range(from_block or 0, cfg.n_blocks):
            resid = self._block(self.virtual_layer(iteration, l), self.core[l])(resid)
        update = resid - read
        rest = mixed[:, :, 1:] + einops.einsum(self.hyper.w_depth, update,
                                               "stream, batch pos d_model -> batch pos stream d_model")
        hooks = self.loop[iteration]
        streams = hooks.hook_streams(torch.cat([resid[:, :, None], rest], dim=2))
        state = hooks.hook_state(streams[:, :, 0])
        if state is not streams[:, :, 0]:  # a hook replaced the readout state: the carried stream 0 follows
            streams = torch.cat([state[:, :, None], streams[:, :, 1:]], dim=2)
        return state, streams

    # --- two timescales (cfg.slow_period > 0) ----------------------------------------------------------
    def _two_timescale_iteration(self, z_H: Float[Tensor, "batch pos d_model"], z_L: Float[Tensor, "batch pos d_model"],
                                 iteration: int, injected: Float[Tensor, "batch pos d_model"], from_block: int | None
                                 ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos d_model"]]:
        """One high-level cycle of a two-timescale loop (Wang et al. 2025, "Hierarchical Reasoning Model")::

            for s in range(slow_period):  z_L = fast_blocks(z_L + z_H + x)    # loop.{t}.fast.{s}.* hooks
            z_H = core_blocks(z_H + z_L)                                     # blocks.{v}.* = loop.{t}.slow.blocks.*

        x is the loop's input (embedding + prelude); the readout reads z_H (``loop.{t}.hook_state`` =
        ``loop.{t}.slow.hook_state``, the last core block's resid_post), so the virtual layers are the slow
        module's and ``n_iterations`` counts slow updates (HRM's N cycles of T = slow_period fast steps).
        Kept from HRM: the two timescales, the fast module's injection of z_H and the input, the slow
        module reading z_L by addition, post-hoc readout of z_H only. Not kept: the one-step gradient
        approximation (gradients flow through every step, or through the last ``backprop_last`` cycles),
        adaptive computation time and its Q-head, deep supervision over segments, and HRM's fixed random
        initial states: z_H and z_L start at zero, so the first fast step reads exactly the embedded input.
        """
        if from_block is None:
            z_L = self._fast_steps(z_H, z_L, iteration, injected)
            resid = z_H + z_L
        else:
            resid = z_H  # the resid_pre of core block from_block; z_L is already this cycle's
        for l in range(from_block or 0, self.cfg.n_blocks):
            resid = self._block(self.virtual_layer(iteration, l), self.core[l])(resid)
        return self.loop[iteration].hook_state(resid), z_L

    def _fast_steps(self, z_H: Float[Tensor, "batch pos d_model"], z_L: Float[Tensor, "batch pos d_model"],
                    iteration: int, injected: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """The fast module's ``slow_period`` steps of cycle ``iteration``, z_H held fixed: z_L after them."""
        for step in self.loop[iteration].fast:
            resid = z_L + z_H + injected
            for block in step.blocks:
                resid = block(resid)
            z_L = step.hook_state(resid)
        return z_L

    def feedback_vector(self, state: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """``cfg.feedback * softmax(ln_final(state) @ W_U + b_U) @ W_E`` at every position: the model's
        current soft answer, re-embedded. Computed functionally with the final LN's and the unembedding's
        weights (no coda, and no readout hook fires), so each hook still fires once per forward pass."""
        ln = self.ln_final  # TransformerLens's LN (centre, / sqrt(mean square + eps), affine) is F.layer_norm
        normed = F.layer_norm(state, (self.cfg.d_model,), ln.params.w, ln.params.b, ln.eps)
        probs = (normed @ self.unembed.W_U + self.unembed.b_U).float().softmax(-1)
        return self.cfg.feedback * (probs.to(state.dtype) @ self.W_E)

    def readout(
        self, state: Float[Tensor, "batch pos d_model"], n_iterations: int, *, start_layer: int | None = None
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Coda blocks, final LayerNorm and unembedding of a run of ``n_iterations``.

        ``start_layer``: resume inside the coda at that virtual layer, ``state`` being its resid_pre.
        """
        first = self.cfg.n_prelude + n_iterations * self.cfg.n_blocks
        stop = first + self.cfg.n_coda
        start = first if start_layer is None else start_layer
        if not (first <= start < stop or start == first == stop):
            raise ValueError(f"start_layer must be a coda layer of a run of {n_iterations} iterations "
                             f"({first}..{stop - 1}), got {start_layer}")
        self._grow(n_iterations)
        for v in range(start, stop):
            state = self._block(v, self.coda[v - first])(state)
        return self.unembed(self.ln_final(state))

    def readout_positions(self, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
        """The position each answer is read at: the last non-pad token (queries are right-padded).

        With a causal mask, right padding cannot change what is computed at or before this position.
        """
        if self.cfg.pad_token_id is None:
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)
        lengths = (tokens != self.cfg.pad_token_id).sum(-1)
        if not host_checks(lengths):  # compiled, or on an accelerator: no host read (hooked.host_checks)
            torch._assert_async((lengths > 0).all(), "a query consists only of padding tokens")
        elif bool((lengths == 0).any()):
            raise ValueError("a query consists only of padding tokens")
        return lengths - 1

    # ------------------------------------------------------------------------------------------------
    # The loop driver
    # ------------------------------------------------------------------------------------------------
    def steps(
        self,
        tokens: Tensor | str | list[str],
        n_iterations: int | None = None,
        *,
        start: int = 0,
        start_layer: int | None = None,
        state: Float[Tensor, "batch pos d_model"] | None = None,
        loop_input: Float[Tensor, "batch pos d_model"] | None = None,
        backprop_last: int | None = None,
        carry: Tensor | None = None,
    ) -> Iterator[LoopStep]:
        """The one loop driver: embed, then run the loop, yielding a :class:`LoopStep` after each iteration.

        ``for step in model.steps(tokens, 8): step.iteration, step.state, step.answer_logits()``.
        forward, answer_logits_by_iteration, forward_adaptive and every interp analysis iterate with it;
        hooks attached with ``model.hooks()`` fire exactly as in ``model(tokens)``.

        Resuming (``state`` required): ``start=t`` runs iterations t..T-1 from ``state``, the state after
        iteration t-1 (at t = 0: the loop's input); ``start_layer=v`` resumes at virtual layer v (prelude
        or loop) from ``state``, its ``blocks.{v}.hook_resid_pre``; a coda layer resumes with
        ``readout(state, T, start_layer=v)``. ``loop_input`` is the loop's input (embed + prelude), needed
        to resume past it when ``cfg.input_injection`` re-injects it (a run resumed in the prelude
        recomputes it, so a patched prelude layer reaches every injection).
        backprop_last: truncated backprop, gradients flow through the last k iterations only.

        Loops that carry state (``carries_state``: hyper-connections, two timescales) resume from ``state``
        (the readout state, or at ``start_layer`` that layer's resid_pre) plus what they carry: ``carry``
        (``LoopStep.carry`` of iteration start-1; with ``start`` only), else the carry of ``tokens``' own run up
        to the resume point, recomputed without gradient (its hooks fire). Resumed inside the loop they
        recompute the loop's input from ``tokens`` (``loop_input`` is not used: their layer-P resid_pre is
        not the loop's input). So resuming from the tokens' own activation reproduces the full run, and a
        patched ``state`` patches that activation alone.
        """
        tokens = self._check_tokens(tokens)
        T = self._check_iterations(n_iterations)
        cfg = self.cfg
        P = cfg.n_prelude
        if backprop_last is not None and not (isinstance(backprop_last, int) and 1 <= backprop_last <= T):
            raise ValueError(f"backprop_last must be in [1, n_iterations={T}], got {backprop_last}")
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < T:
            raise ValueError(f"start must be an iteration in [0, n_iterations={T}), got {start!r}")
        if start_layer is not None:
            n_resumable = P + T * cfg.n_blocks
            if start:
                raise ValueError("give start (an iteration) or start_layer (a virtual layer), not both")
            if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < n_resumable:
                raise ValueError(f"start_layer must be a prelude or loop layer in [0, {n_resumable}) for "
                                 f"{T} iterations, got {start_layer!r} (coda layers: readout(..., start_layer=v))")
        resuming = start > 0 or start_layer is not None
        if resuming and state is None:
            raise ValueError("resuming (start / start_layer) needs `state`, the activation to resume from")
        if state is not None and (state.ndim != 3 or tuple(state.shape) != (*tokens.shape, cfg.d_model)):
            raise ValueError(f"state must have shape [batch, pos, d_model]={(*tokens.shape, cfg.d_model)}, "
                             f"got {tuple(state.shape)}")
        past_input = start > 0 or (start_layer is not None and start_layer > P)
        if past_input and loop_input is None and cfg.input_injection != "none":
            raise ValueError(f"input_injection={cfg.input_injection!r} re-injects the loop's input: pass "
                             "loop_input to resume past it")
        if carry is not None and (not self.carries_state or start_layer is not None or not start):
            raise ValueError("carry resumes a loop that carries state (hyper_streams > 1 or slow_period > 0) at an "
                             "iteration start > 0; at start_layer the carry is recomputed from the tokens")
        self._grow(T)
        if self.carries_state:
            return self._steps_carried(tokens, T, start, start_layer, state, loop_input, backprop_last, carry)
        return self._steps(tokens, T, start, start_layer, state, loop_input, backprop_last)

    def _steps(self, tokens: Tensor, T: int, start: int, start_layer: int | None, state: Tensor | None,
               loop_input: Tensor | None, backprop_last: int | None) -> Iterator[LoopStep]:
        P, L = self.cfg.n_prelude, self.cfg.n_blocks
        from_block = None  # a whole first iteration; l: resumed at core block l's resid_pre
        if start_layer is not None and start_layer < P:  # resumed in the prelude: its output is the loop's input
            for v in range(start_layer, P):
                state = self._block(v, self.prelude[v])(state)
            loop_input = None
        elif start_layer is not None:
            start, from_block = divmod(start_layer - P, L)
        elif state is None:
            state = self.embed_tokens(tokens)
        if start == 0 and not from_block and loop_input is None:
            loop_input = state
        memo: dict = {}  # what the run's steps compute once and share (the readout positions)
        for t in range(start, T):
            if backprop_last is not None and t == T - backprop_last:
                state = state.detach()
            state = self.iterate(state, t, loop_input, from_block=from_block if t == start else None)
            yield LoopStep(t, T, state, loop_input, tokens, self, memo)

    def _steps_carried(self, tokens: Tensor, T: int, start: int, start_layer: int | None, state: Tensor | None,
                       loop_input: Tensor | None, backprop_last: int | None, carry: Tensor | None
                       ) -> Iterator[LoopStep]:
        """``_steps`` for loops that carry state: (state, carry) -> iterate_carried -> (state, carry)."""
        P, L = self.cfg.n_prelude, self.cfg.n_blocks
        from_block = None
        if start_layer is not None and start_layer < P:  # resumed in the prelude: its output is the loop's input
            for v in range(start_layer, P):
                state = self._block(v, self.prelude[v])(state)
            loop_input, start_layer = state, None
        elif start_layer is not None:
            start, from_block = divmod(start_layer - P, L)
        resumed_inside = start > 0 or from_block is not None
        if resumed_inside:  # the tokens' own (layer P's resid_pre is the streams' read / z_H + z_L, not the input)
            loop_input = self.embed_tokens(tokens)
        elif state is not None:  # the state before iteration 0 is the loop's input
            loop_input = state
        elif loop_input is None:
            loop_input = self.embed_tokens(tokens)
        if not resumed_inside:
            state, carry = self.initial_state(loop_input)
        elif carry is None:  # the tokens' own carry up to the resume point
            own, carry = self.initial_state(loop_input)
            with torch.no_grad():
                for t in range(start):
                    own, carry = self.iterate_carried(own, carry, t, loop_input)
                if from_block is not None and self.cfg.slow_period:  # z_L after this cycle's fast steps
                    carry = self._fast_steps(own, carry, start, loop_input)
        if start > 0 and from_block is None and self.cfg.hyper_streams > 1:
            carry = torch.cat([state[:, :, None], carry[:, :, 1:]], dim=2)  # stream 0 is the state resumed from
        memo: dict = {}
        for t in range(start, T):
            if backprop_last is not None and t == T - backprop_last:
                state, carry = state.detach(), carry.detach()
            state, carry = self.iterate_carried(state, carry, t, loop_input,
                                                from_block=from_block if t == start else None)
            yield LoopStep(t, T, state, loop_input, tokens, self, memo, carry=carry)

    # ------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------
    def forward(
        self,
        tokens: Tensor | str | list[str],  # validated by _check_tokens (clear errors), not by annotations
        n_iterations: int | None = None,
        return_type: str | None = "logits",
        targets: Int[Tensor, " batch"] | None = None,
        label_smoothing: float = 0.0,
        backprop_last: int | None = None,
    ) -> Any:
        """Run the loop ``n_iterations`` times (default ``cfg.n_iterations``).

        return_type: "logits" -> [batch, pos, d_vocab]; "loss" -> cross-entropy of ``targets`` read at
        each query's readout position (the paper's answer-only loss); "both" -> (logits, loss); None.
        backprop_last: truncated backprop, gradients flow through the last k iterations only.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        if return_type in ("loss", "both") and targets is None:
            raise ValueError("return_type='loss' needs `targets` (answer token ids, one per query)")
        # embed, then for t in range(T): iterate (the loop driver); only the last step is kept. Every
        # iteration runs the same weights: their fused form is built once (reuse_weights)
        with reuse_weights():
            (step,) = collections.deque(self.steps(tokens, n_iterations, backprop_last=backprop_last), maxlen=1)
            if return_type is None:
                return None
            logits = step.readout()
        if return_type == "logits":
            return logits
        loss = self.answer_loss(logits, step.positions, targets, label_smoothing)
        return loss if return_type == "loss" else (logits, loss)

    def answer_logits_by_iteration(
        self,
        tokens: Tensor | str | list[str],
        n_iterations: int | None = None,
        backprop_last: int | None = None,
    ) -> Float[Tensor, "iteration batch d_vocab"]:
        """The readout (coda, final LN, unembedding) applied after every iteration, at each query's answer
        position: ``out[t]`` is what the model would answer if it stopped after ``t + 1`` iterations.

        Differentiable (the trainer's ``recurrence.supervise = "from_hops"`` loss uses it); for analysis,
        wrap it in ``torch.no_grad()``. ``out[-1]`` equals ``predict(tokens, n_iterations)``.
        """
        with reuse_weights():
            steps = self.steps(tokens, n_iterations, backprop_last=backprop_last)
            return torch.stack([step.answer_logits() for step in steps])

    def answer_loss(self, logits: Float[Tensor, "batch pos d_vocab"], positions: Int[Tensor, " batch"],
                    targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Cross-entropy of ``targets`` at each query's readout position (``readout_positions``)."""
        targets = torch.as_tensor(targets, device=logits.device, dtype=torch.long)
        if targets.shape != positions.shape:
            raise ValueError(f"targets must have shape [batch]={positions.shape[0]}, got {tuple(targets.shape)}")
        answer_logits = logits[torch.arange(positions.shape[0], device=logits.device), positions]
        return F.cross_entropy(answer_logits.float(), targets, label_smoothing=label_smoothing)

    @torch.no_grad()
    def predict(self, tokens: Tensor | str | list[str], n_iterations: int | None = None) -> Float[Tensor, "batch d_vocab"]:
        """Readout logits at each query's answer position, [batch, d_vocab]."""
        tokens = self._check_tokens(tokens)
        logits = self(tokens, n_iterations=n_iterations)
        return logits[torch.arange(tokens.shape[0], device=logits.device), self.readout_positions(tokens)]

    @torch.no_grad()
    def forward_adaptive(self, tokens: Tensor | str | list[str], rule: Any, max_iterations: int = 16) -> AdaptiveOutput:
        """Per-sample adaptive depth: after each iteration the ``rule`` (see models.halting) decides,
        per sample, whether its readout distribution has settled. A halted sample's answer is frozen (its
        logits no longer change); the batch keeps iterating until every sample halted or ``max_iterations``.
        Batched: one forward per iteration for the whole batch, no per-sample loop. (Samples never
        interact, so a halted sample iterating on changes no other sample's numbers.)
        """
        tokens = self._check_tokens(tokens)
        T = self._check_iterations(max_iterations)
        active = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        iterations = torch.full((tokens.shape[0],), T, dtype=torch.long, device=tokens.device)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        final_logits = prev_logprobs = prev_readout_state = None
        with reuse_weights():
            for step in self.steps(tokens, T):
                logits = step.readout()[rows, step.positions].float()
                logprobs = logits.log_softmax(-1)
                readout_state = step.state[rows, step.positions]
                final_logits = logits if final_logits is None else torch.where(active[:, None], logits, final_logits)
                if prev_logprobs is not None:
                    t = step.iteration
                    stop = rule(
                        iteration=t + 1, logprobs=logprobs, prev_logprobs=prev_logprobs,
                        state=readout_state, prev_state=prev_readout_state,
                    ) & active
                    iterations = torch.where(stop, torch.full_like(iterations, t + 1), iterations)
                    active = active & ~stop
                if not bool(active.any()):
                    break
                prev_logprobs, prev_readout_state = logprobs, readout_state
        return AdaptiveOutput(logits=final_logits, iterations=iterations, halted=~active)

    # ------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------
    def save(self, path: str | Path, **meta: Any) -> Path:
        """Save physical weights (safetensors) + config + provenance into directory ``path``
        (``path/model.safetensors`` + ``path/model.json``). For a file stem use
        :func:`models.checkpoint.save_checkpoint`."""
        from looplens.models.checkpoint import save_checkpoint

        Path(path).mkdir(parents=True, exist_ok=True)
        return save_checkpoint(self, Path(path) / "model", **meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", **expect: Any) -> LoopedTransformer:
        """Load a checkpoint written by :meth:`save`, checking its integrity and config."""
        from looplens.models.checkpoint import load_checkpoint

        return load_checkpoint(path, device=device, **expect)

    @classmethod
    def from_pretrained(cls, src: Any, n_iterations: int = 1, **kwargs: Any) -> LoopedTransformer:
        """Import a checkpoint of the paper's code or a GPT2LMHeadModel, looped ``n_iterations`` times
        (see :mod:`looplens.models.pretrained`)."""
        from looplens.models.pretrained import from_pretrained

        return from_pretrained(src, n_iterations, **kwargs)
