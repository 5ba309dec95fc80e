"""The looped (recurrent-depth, weight-shared) transformer, drivable like a TransformerLens model.

Architecture (the paper's section 5/6 model when prelude and coda are empty)::

    tokens -> embed (+ learned positions) -> prelude blocks
           -> for t in range(n_iterations): [inject input] -> core blocks 0..L-1     <- shared weights
           -> coda blocks -> ln_final -> unembed (tied to the embedding)

Hook names are those of the unrolled network: iteration t of core block l is *virtual layer*
``v = n_prelude + t * L + l`` and fires ``blocks.{v}.hook_resid_pre`` etc., so ActivationCache,
``transformer_lens.patching`` and ``utils.get_act_name`` work unchanged. ``loop.{t}.blocks.{l}.<hook>``
is an alias of the same hook point and ``loop.{t}.hook_state`` fires after each iteration.
``cfg.n_layers`` is the virtual depth at the default iteration count; ``with model.iterations(T):``
changes the default (and so ``cfg.n_layers``) for code, like TL's patching, that calls the model itself.
"""

from __future__ import annotations

import collections
import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from looplens.models.components import (
    BlockParams,
    LayerNorm,
    LayerNormParams,
    TransformerBlock,
    init_block_params,
)
from looplens.models.config import LoopedConfig
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LOOP_NAME = re.compile(r"^loop\.(\d+)\.blocks\.(\d+)\.(.+)$")
_LOOP_ANY = re.compile(r"^loop\.(\d+)\.")


class Embed(nn.Module):
    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.W_E[tokens]


class PosEmbed(nn.Module):
    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        # Broadcast to [batch, pos, d_model]: ActivationCache.decompose_resid stacks it with hook_embed.
        return einops.repeat(self.W_pos[: tokens.shape[1]], "pos d_model -> batch pos d_model", batch=tokens.shape[0])


class Unembed(nn.Module):
    """W_U [d_model, d_vocab], tied to W_E^T when ``cfg.tie_embeddings`` (the paper's setting)."""

    def __init__(self, cfg: LoopedConfig, embed: Embed):
        super().__init__()
        if cfg.tie_embeddings:
            object.__setattr__(self, "_embed", embed)  # a reference, not a second copy of W_E
        else:
            self.W_U_untied = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        # Without a bias (cfg.unembed_bias False, the paper's lm_head) b_U is a zero buffer, so readers of
        # model.b_U (TransformerLens's cache helpers, the lens) need no special case.
        if cfg.unembed_bias:
            self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab))
        else:
            self.register_buffer("b_U", torch.zeros(cfg.d_vocab), persistent=False)
        self.hook_in = HookPoint()  # [batch, pos, d_model] (TransformerLens 3.9 names)
        self.hook_out = HookPoint()  # [batch, pos, d_vocab]

    @property
    def W_U(self) -> Tensor:
        embed = self.__dict__.get("_embed")
        return embed.W_E.T if embed is not None else self.W_U_untied

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return self.hook_out(self.hook_in(x) @ self.W_U + self.b_U)


class IterationHooks(nn.Module):
    """Per-iteration hook points that belong to no single block."""

    def __init__(self, feedback: bool = False):
        super().__init__()
        self.hook_state = HookPoint()  # [batch, pos, d_model], the state after the iteration
        if feedback:  # iterations t >= 1 of models with readout feedback only
            self.hook_feedback = HookPoint()  # [batch, pos, d_model], added to the state before iteration t


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
    positions: Int[Tensor, " batch"]  # each query's readout position
    model: LoopedTransformer = field(repr=False)

    @property
    def is_last(self) -> bool:
        return self.iteration == self.n_iterations - 1

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


class LoopedTransformer(HookedRootModule):
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

    def _grow(self, n_iterations: int) -> None:
        """Make sure hook modules exist for a run of ``n_iterations``; refresh the name tables."""
        needed = self.cfg.n_virtual_layers(n_iterations)
        if len(self.blocks) >= needed and len(self.loop) >= n_iterations:
            return
        previous = self._bound_iterations
        placeholder = self.core[0]

        def like_the_model(module: nn.Module) -> nn.Module:
            # A module appended after .eval() / .to() must not run in the default (training) mode: its
            # dropout would fire at inference, and TL's patching refuses a model with a training submodule.
            return module.train(self.training).to(device=self.W_E.device, dtype=self.W_E.dtype)

        while len(self.blocks) < needed:
            self.blocks.append(like_the_model(TransformerBlock(self.cfg, placeholder)))
        while len(self.loop) < n_iterations:
            self.loop.append(like_the_model(IterationHooks(feedback=self.cfg.feedback > 0 and len(self.loop) > 0)))
        self.setup()
        # Bind eagerly, so attribute reads (model.blocks[v].attn.W_Q) never see placeholder weights.
        self._bound_iterations = None
        self._bind(previous if previous is not None else self.cfg.n_iterations)

    def prepare(self, n_iterations: int) -> None:
        """Create the virtual layers of a run of ``n_iterations`` and bind them for attribute reads
        (``model.blocks[v].attn.W_Q``). Running needs no preparation: :meth:`steps`, and the step-level
        embed_tokens / iterate / readout, create and bind the layers they run.
        """
        self._grow(self._check_iterations(n_iterations))
        self._bind(n_iterations)

    def setup(self) -> None:
        """HookedRootModule.setup plus the per-iteration aliases ``loop.{t}.blocks.{l}.<hook>``.

        Aliases live in mod_dict only (not hook_dict), so run_with_hooks accepts them while
        run_with_cache still caches each hook point once, under its virtual-layer name.
        """
        super().setup()
        cfg = self.cfg
        for name, module in list(self.mod_dict.items()):
            match = _BLOCK_NAME.match(name)
            if match is None:
                continue
            v = int(match.group(1))
            t, l = divmod(v - cfg.n_prelude, cfg.n_blocks)
            if 0 <= v - cfg.n_prelude and t < len(self.loop):
                self.mod_dict[f"loop.{t}.blocks.{l}.{match.group(2)}"] = module

    def _bind(self, n_iterations: int) -> None:
        """Point each virtual layer of a run of ``n_iterations`` at its physical weights.

        Without a coda the binding does not depend on n_iterations (v -> core[(v - P) % L]); with one,
        the coda's virtual indices move with the iteration count, so rebinding happens per run.
        """
        if self._bound_iterations == n_iterations:
            return
        for v, block in enumerate(self.blocks):
            block.bind(self._weights_of(v, n_iterations))
        self._bound_iterations = n_iterations

    def _weights_of(self, layer: int, n_iterations: int) -> BlockParams:
        """The physical block that virtual ``layer`` computes with in a run of ``n_iterations``."""
        cfg = self.cfg
        i, n_loop = layer - cfg.n_prelude, n_iterations * cfg.n_blocks
        if i < 0:
            return self.prelude[layer]
        if n_loop <= i < n_loop + cfg.n_coda:
            return self.coda[i - n_loop]
        return self.core[i % cfg.n_blocks]  # in the loop, or beyond this run (a valid binding for reads)

    def _block(self, layer: int, params: BlockParams) -> TransformerBlock:
        """Virtual ``layer``'s module, computing with ``params``. Each step binds the layers it runs, so
        a coda bound for a shorter run can never stand in for a core block (and vice versa)."""
        block = self.blocks[layer]
        if block.params is not params:
            block.bind(params)
            self._bound_iterations = None  # the whole-run binding no longer holds
        return block

    # ------------------------------------------------------------------------------------------------
    # Names
    # ------------------------------------------------------------------------------------------------
    def virtual_layer(self, iteration: int, block: int) -> int:
        """Virtual layer index of core ``block`` at ``iteration`` (both 0-based)."""
        if not 0 <= block < self.cfg.n_blocks:
            raise ValueError(f"block must be in [0, {self.cfg.n_blocks}), got {block}")
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        return self.cfg.n_prelude + iteration * self.cfg.n_blocks + block

    def iteration_block(self, layer: int, n_iterations: int | None = None) -> tuple[str, int, int]:
        """Where virtual ``layer`` sits in a run: ("prelude", 0, i), ("loop", t, l) or ("coda", 0, i)."""
        cfg = self.cfg
        T = cfg.n_iterations if n_iterations is None else n_iterations
        if not 0 <= layer < cfg.n_virtual_layers(T):
            raise ValueError(f"layer {layer} is outside a run of {T} iterations ({cfg.n_virtual_layers(T)} layers)")
        i = layer - cfg.n_prelude
        if i < 0:
            return ("prelude", 0, layer)
        if i < T * cfg.n_blocks:
            t, l = divmod(i, cfg.n_blocks)
            return ("loop", t, l)
        return ("coda", 0, i - T * cfg.n_blocks)

    def hook_name(self, hook: str, iteration: int, block: int) -> str:
        """``hook_name("hook_resid_post", 2, 1)`` -> ``"blocks.{2 * L + 1}.hook_resid_post"``."""
        return f"blocks.{self.virtual_layer(iteration, block)}.{hook}"

    def canonical_name(self, name: str) -> str:
        """Map an alias ``loop.{t}.blocks.{l}.<hook>`` to its virtual name; other names unchanged."""
        match = _LOOP_NAME.match(name)
        if match is None:
            return name
        t, l, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        return self.hook_name(rest, t, l)

    def alias_name(self, name: str) -> str:
        """Map ``blocks.{v}.<hook>`` of a core layer to ``loop.{t}.blocks.{l}.<hook>``."""
        match = _BLOCK_NAME.match(name)
        if match is None:
            return name
        i = int(match.group(1)) - self.cfg.n_prelude
        if i < 0:
            return name
        t, l = divmod(i, self.cfg.n_blocks)
        return f"loop.{t}.blocks.{l}.{match.group(2)}"

    def _iterations_needed_for(self, names: Sequence[Any]) -> int:
        """Smallest iteration count whose run has hook modules for all the string names given."""
        needed = 0
        cfg = self.cfg
        for name in names:
            if not isinstance(name, str):
                continue
            if (m := _BLOCK_NAME.match(name)) is not None:
                i = int(m.group(1)) - cfg.n_prelude - cfg.n_coda
                needed = max(needed, -(-(i + 1) // cfg.n_blocks))
            elif (m := _LOOP_ANY.match(name)) is not None:
                needed = max(needed, int(m.group(1)) + 1)
        return needed

    # ------------------------------------------------------------------------------------------------
    # Input checks
    # ------------------------------------------------------------------------------------------------
    def check_tokens(self, tokens: Any) -> Tensor:
        """Validate token ids (or encode query strings): a [batch, pos] long tensor on the model's device.

        Raises TypeError / ValueError naming the problem (dtype, shape, id range, n_ctx).
        """
        return self._check_tokens(tokens)

    def _check_tokens(self, tokens: Any) -> Tensor:
        if isinstance(tokens, str | list) and self.vocab is not None:
            tokens = self.to_tokens(tokens)
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [batch, pos] (or [pos]), got {tuple(tokens.shape)}")
        if tokens.shape[1] == 0:
            raise ValueError("tokens must have at least one position")
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds n_ctx={self.cfg.n_ctx}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.d_vocab):
            raise ValueError(
                f"token ids must be in [0, d_vocab={self.cfg.d_vocab}), got min {int(tokens.min())}, max {int(tokens.max())}"
            )
        return tokens.to(device=self.W_E.device, dtype=torch.long)

    def _check_iterations(self, n_iterations: Any) -> int:
        if n_iterations is None:
            return self.cfg.n_iterations
        if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
            raise ValueError(f"n_iterations must be a positive integer, got {n_iterations!r}")
        return n_iterations

    # ------------------------------------------------------------------------------------------------
    # Step-level entry points: embed -> iterate (x T) -> readout
    # ------------------------------------------------------------------------------------------------
    def embed_tokens(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """Token (+ position) embedding, then the prelude blocks: the loop's initial state."""
        resid = self.hook_embed(self.embed(tokens))
        if self.cfg.positional == "learned":
            resid = resid + self.hook_pos_embed(self.pos_embed(tokens))
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
        if bool((lengths == 0).any()):
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
    ) -> Iterator[LoopStep]:
        """The one loop driver: embed, then run the loop, yielding a :class:`LoopStep` after each iteration.

        ``for step in model.steps(tokens, 8): step.iteration, step.state, step.answer_logits()``.
        forward, answer_logits_by_iteration, forward_adaptive and every interp analysis iterate with it;
        hooks attached with ``model.hooks()`` fire exactly as in ``model(tokens)``.

        Resuming (``state`` required): ``start=t`` runs iterations t..T-1 from ``state``, the state after
        iteration t-1 (at t = 0: the loop's input); ``start_layer=v`` resumes at virtual layer v (prelude
        or loop) from ``state``, its ``blocks.{v}.hook_resid_pre``; a coda layer resumes with
        ``readout(state, T, start_layer=v)``. ``loop_input`` is the loop's input (embed + prelude), needed
        to resume past it when ``cfg.input_injection`` re-injects it.
        backprop_last: truncated backprop, gradients flow through the last k iterations only.
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
        self._grow(T)
        return self._steps(tokens, T, start, start_layer, state, loop_input, backprop_last)

    def _steps(self, tokens: Tensor, T: int, start: int, start_layer: int | None, state: Tensor | None,
               loop_input: Tensor | None, backprop_last: int | None) -> Iterator[LoopStep]:
        P, L = self.cfg.n_prelude, self.cfg.n_blocks
        from_block = None  # a whole first iteration; l: resumed at core block l's resid_pre
        if start_layer is not None and start_layer < P:  # resumed in the prelude: its output is the loop's input
            for v in range(start_layer, P):
                state = self._block(v, self.prelude[v])(state)
        elif start_layer is not None:
            start, from_block = divmod(start_layer - P, L)
        elif state is None:
            state = self.embed_tokens(tokens)
        if start == 0 and not from_block and loop_input is None:
            loop_input = state
        positions = self.readout_positions(tokens)
        for t in range(start, T):
            if backprop_last is not None and t == T - backprop_last:
                state = state.detach()
            state = self.iterate(state, t, loop_input, from_block=from_block if t == start else None)
            yield LoopStep(t, T, state, loop_input, positions, self)

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
        # embed, then for t in range(T): iterate (the loop driver); only the last step is kept
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
        final_logits = prev_logprobs = prev_readout_state = None
        rows = torch.arange(tokens.shape[0], device=tokens.device)
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
    # TransformerLens surface
    # ------------------------------------------------------------------------------------------------
    @property
    def W_E(self) -> Tensor:
        return self.embed.W_E

    @property
    def W_U(self) -> Tensor:
        return self.unembed.W_U

    @property
    def b_U(self) -> Tensor:
        return self.unembed.b_U

    @property
    def W_pos(self) -> Tensor:
        if self.cfg.positional != "learned":
            raise AttributeError("this model has no positional embedding (positional='none')")
        return self.pos_embed.W_pos

    @contextlib.contextmanager
    def iterations(self, n_iterations: int) -> Iterator[LoopedTransformer]:
        """Temporarily change the default iteration count (and so ``cfg.n_layers``).

        For code that calls the model itself without passing n_iterations, e.g.
        ``with model.iterations(8): transformer_lens.patching.get_act_patch_resid_pre(model, ...)``.
        Restored on exit, also on error.
        """
        T = self._check_iterations(n_iterations)
        old = self.cfg.n_iterations
        self._grow(T)
        self.cfg.n_iterations = T
        try:
            yield self
        finally:
            self.cfg.n_iterations = old

    @contextlib.contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, clear_contexts: bool = False):
        """TransformerLens's ``hooks()``; names of iterations not run yet are created on demand."""
        names = [name for name, _ in [*fwd_hooks, *bwd_hooks]]
        self._grow(max(self._iterations_needed_for(names), 1))
        with super().hooks(list(fwd_hooks), list(bwd_hooks), reset_hooks_end, clear_contexts) as model:
            yield model

    def run_with_hooks(self, *model_args: Any, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **model_kwargs: Any) -> Any:
        self._grow(self._check_iterations(model_kwargs.get("n_iterations")))
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*model_args, **model_kwargs)

    def run_with_cache(self, *model_args: Any, names_filter: Any = None, device: Any = None,
                       remove_batch_dim: bool = False, incl_bwd: bool = False, reset_hooks_end: bool = True,
                       clear_contexts: bool = False, pos_slice: Any = None, return_cache_object: bool = True,
                       **model_kwargs: Any) -> tuple[Any, ActivationCache | dict]:
        """Run and cache every hook that fires: T iterations give T distinct entries per block hook.

        The returned ActivationCache sees ``cfg.n_layers`` of *this* run (a view of the model at
        ``n_iterations``), so accumulated_resid, decompose_resid, apply_ln_to_stack etc. cover it all.
        """
        T = self._check_iterations(model_kwargs.get("n_iterations"))
        self._grow(T)
        cache_dict, fwd, bwd = self.get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim=remove_batch_dim, pos_slice=pos_slice
        )
        with self.hooks(fwd_hooks=fwd, bwd_hooks=bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                out.backward()
        if not return_cache_object:
            return out, cache_dict
        return out, LoopedActivationCache(cache_dict, self.at_iterations(T), has_batch_dim=not remove_batch_dim)

    def at_iterations(self, n_iterations: int) -> ModelAtIterations:
        """A read-only view of this model whose ``cfg.n_layers`` is that of a run of ``n_iterations``."""
        return ModelAtIterations(self, self._check_iterations(n_iterations))

    def to_tokens(self, input: str | list[str], **_: Any) -> Int[Tensor, "batch pos"]:
        """Query strings ("e17 r3 r9") to right-padded token ids; needs ``model.vocab`` (a data.Vocab)."""
        if self.vocab is None:
            raise ValueError("this model has no vocab attached: set model.vocab = dataset.vocab (or load a checkpoint)")
        queries = [input] if isinstance(input, str) else list(input)
        tokens, _ = self.vocab.encode_batch(queries)
        return tokens.to(self.W_E.device)

    def to_str_tokens(self, input: Tensor | str, **_: Any) -> list[str]:
        if self.vocab is None:
            raise ValueError("this model has no vocab attached: set model.vocab = dataset.vocab")
        if isinstance(input, str):
            return input.split()
        ids = input.flatten().tolist()
        return [self.vocab.tokens[i] for i in ids]

    def to_string(self, tokens: Tensor) -> str | list[str]:
        if self.vocab is None:
            raise ValueError("this model has no vocab attached: set model.vocab = dataset.vocab")
        if tokens.ndim == 2:
            return [self.vocab.decode(row.tolist()) for row in tokens]
        return self.vocab.decode(tokens.tolist())

    def to_single_token(self, string: str) -> int:
        ids = self.vocab.encode(string) if self.vocab is not None else None
        if not ids or len(ids) != 1:
            raise ValueError(f"{string!r} is not a single token of this model's vocab")
        return ids[0]

    def tokens_to_residual_directions(self, tokens: Any) -> Tensor:
        """Unembedding directions of ``tokens`` ([..., d_model]); used by ActivationCache.logit_attrs."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        tokens = torch.as_tensor(tokens, device=self.W_U.device)
        return einops.rearrange(self.W_U[:, tokens], "d_model ... -> ... d_model")

    def _apply(self, fn, recurse: bool = True):  # keep cfg.device in step with .to()/.cuda()/.cpu()
        out = super()._apply(fn, recurse) if recurse else super()._apply(fn, recurse=False)
        self.cfg.device = str(self.embed.W_E.device)
        return out

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


class LoopedActivationCache(ActivationCache):
    """TransformerLens's ActivationCache that also answers to ``loop.{t}.blocks.{l}.<hook>`` aliases."""

    def __getitem__(self, key):
        if isinstance(key, str):
            key = self.model.canonical_name(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        if isinstance(key, str):
            key = self.model.canonical_name(key)
        return key in self.cache_dict


class ModelAtIterations:
    """A view of a LoopedTransformer fixed at one iteration count (used by ActivationCache).

    ``cfg`` is a copy whose ``n_layers`` covers a run of ``n_iterations``; everything else is read from
    the model (``blocks``, ``ln_final``, ``W_U`` ...), with the virtual layers bound for that run.
    """

    def __init__(self, model: LoopedTransformer, n_iterations: int):
        self._model = model
        self.n_iterations = n_iterations
        self.cfg = model.cfg.replace(n_iterations=n_iterations)
        self.cfg.device = model.cfg.device

    @property
    def blocks(self) -> nn.ModuleList:
        self._model._bind(self.n_iterations)
        return self._model.blocks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __repr__(self) -> str:
        return f"ModelAtIterations({self.n_iterations}) of {self._model.__class__.__name__}"
