"""TransformerLens plumbing of the looped model: virtual layers, hook names, TL's run / cache API.

Hook names are those of the unrolled network: iteration t of core block l is *virtual layer*
``v = n_prelude + t * L + l`` and fires ``blocks.{v}.hook_resid_pre`` etc., so ActivationCache,
``transformer_lens.patching`` and ``utils.get_act_name`` work unchanged. ``loop.{t}.blocks.{l}.<hook>``
is an alias of the same hook point and ``loop.{t}.hook_state`` fires after each iteration (hyper-connections
add ``loop.{t}.hook_streams``; two-timescale loops ``loop.{t}.fast.{s}.*`` and the slow-level aliases
``loop.{t}.slow.blocks.{l}.<hook>`` / ``loop.{t}.slow.hook_state``: models/looped.py).
``cfg.n_layers`` is the virtual depth at the default iteration count; ``with model.iterations(T):``
changes the default (and so ``cfg.n_layers``) for code, like TL's patching, that calls the model itself.

The architecture itself (embed -> for t in range(T): iterate -> readout) is models/looped.py.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from looplens.models.components import BlockParams, IterationHooks, TransformerBlock, _has_hooks
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedRootModule

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LOOP_NAME = re.compile(r"^loop\.(\d+)\.(?:slow\.)?blocks\.(\d+)\.(.+)$")  # slow.: two-timescale loops
_SLOW_STATE = re.compile(r"^loop\.(\d+)\.slow\.hook_state$")
_LOOP_ANY = re.compile(r"^loop\.(\d+)\.")


def host_checks(tensor: Tensor) -> bool:
    """Whether value checks may read ``tensor`` on the host (and so name the bad value): eagerly on the CPU,
    where that costs nothing. Under torch.compile a host read breaks the graph, and on an accelerator it
    synchronises every step: there the checks are device-side asserts (``torch._assert_async``)."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


class HookedLoopedModel(HookedRootModule):
    """The TransformerLens surface of a looped model (the base class of :class:`LoopedTransformer`).

    Hook-holding modules exist once per *virtual* layer (``blocks``) and per iteration (``loop``), grown on
    demand and bound to the physical weights they compute with; TL's ``run_with_cache``, ``run_with_hooks``,
    ``hooks`` and the ``to_tokens`` family. The subclass provides ``cfg``, ``vocab``, ``embed``, ``unembed``,
    ``prelude`` / ``core`` / ``coda`` (BlockParams lists), empty ``blocks`` / ``loop`` ModuleLists,
    ``_bound_iterations = None`` and ``forward(tokens, n_iterations=...)``.
    """

    # ------------------------------------------------------------------------------------------------
    # Virtual layers: hook modules grown on demand, bound to the physical weights
    # ------------------------------------------------------------------------------------------------
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
            self.loop.append(like_the_model(self._iteration_hooks(len(self.loop))))
        self.setup()
        # Bind eagerly, so attribute reads (model.blocks[v].attn.W_Q) never see placeholder weights.
        self._bound_iterations = None
        self._bind(previous if previous is not None else self.cfg.n_iterations)

    def _iteration_hooks(self, iteration: int) -> nn.Module:
        """The hook-only module of loop iteration ``iteration`` (``loop.{t}``); subclasses add their own."""
        return IterationHooks(feedback=self.cfg.feedback > 0 and iteration > 0)

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
        self._add_loop_aliases()

    def _add_loop_aliases(self) -> None:
        """Add ``loop.{t}.blocks.{l}.<hook>`` to mod_dict for every core ``blocks.{v}.<hook>`` entry."""
        cfg = self.cfg
        for name, module in list(self.mod_dict.items()):
            match = _BLOCK_NAME.match(name)
            if match is None:
                continue
            v = int(match.group(1))
            t, l = divmod(v - cfg.n_prelude, cfg.n_blocks)
            if 0 <= v - cfg.n_prelude and t < len(self.loop):
                self.mod_dict[f"loop.{t}.blocks.{l}.{match.group(2)}"] = module
                if getattr(cfg, "slow_period", 0):  # two timescales: the core blocks are the slow level
                    self.mod_dict[f"loop.{t}.slow.blocks.{l}.{match.group(2)}"] = module
        if getattr(cfg, "slow_period", 0):
            for t, hooks in enumerate(self.loop):
                self.mod_dict[f"loop.{t}.slow.hook_state"] = hooks.hook_state

    def _bind(self, n_iterations: int) -> None:
        """Point every virtual layer of a run of ``n_iterations`` at its physical weights, for attribute
        reads (ActivationCache reads ``model.blocks[v].attn.W_O`` etc. through ModelAtIterations).

        Without a coda the binding does not depend on n_iterations (v -> core[(v - P) % L]); with one,
        the coda's virtual indices move with the iteration count. Running does not rely on it: each step
        binds the layers it runs (:meth:`_block`).
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
        """Map an alias ``loop.{t}.blocks.{l}.<hook>`` (two-timescale loops: also ``loop.{t}.slow.blocks.{l}.<hook>``
        and ``loop.{t}.slow.hook_state``) to its real name; other names unchanged."""
        if getattr(self.cfg, "slow_period", 0) and (state := _SLOW_STATE.match(name)) is not None:
            return f"loop.{state.group(1)}.hook_state"
        match = _LOOP_NAME.match(name)
        if match is None or (".slow." in name and not getattr(self.cfg, "slow_period", 0)):
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
        if tokens.numel() and not host_checks(tokens):
            torch._assert_async(((tokens >= 0) & (tokens < self.cfg.d_vocab)).all(),
                                f"token ids must be in [0, d_vocab={self.cfg.d_vocab})")
        elif tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.d_vocab):
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
    def iterations(self, n_iterations: int) -> Iterator[HookedLoopedModel]:
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

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``torch.compile`` the model's calls made with no hook attached (arguments as torch.compile's).

        A call with any hook attached (run_with_hooks, run_with_cache, add_hook) runs eagerly: dynamo does
        not guard on hooks added after compilation, so a compiled graph would silently skip them.
        """
        self.__dict__["_compiled_call"] = torch.compile(self._call_impl, *args, **kwargs)

    def _wrapped_call_impl(self, *args: Any, **kwargs: Any) -> Any:
        compiled = self.__dict__.get("_compiled_call")
        if compiled is not None and not any(_has_hooks(hp) for hp in self.hook_dict.values()):
            return compiled(*args, **kwargs)
        return self._call_impl(*args, **kwargs)

    __call__ = _wrapped_call_impl

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

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True,
                         *, n_iterations: int | None = None) -> Float[Tensor, " d_model"]:
        """TransformerLens's ``accumulated_bias``: the sum of the output biases (attention b_O, and MLP
        b_out when ``include_mlp_biases``) of virtual layers 0..layer-1 of a run of ``n_iterations``
        (plus layer's b_O when ``mlp_input``). Used by ``ActivationCache.get_full_resid_decomposition``."""
        T = self._check_iterations(n_iterations)
        n_layers = self.cfg.n_virtual_layers(T)
        if not 0 <= layer <= n_layers or (mlp_input and layer == n_layers):
            raise ValueError(f"accumulated_bias: layer must be in [0, {n_layers}] ({n_layers - 1} with mlp_input) "
                             f"for {T} iterations, got {layer}")
        bias = torch.zeros(self.cfg.d_model, device=self.W_E.device, dtype=self.W_E.dtype)
        for v in range(layer):
            params = self._weights_of(v, T)
            bias = bias + params.attn.b_O + (params.mlp.b_out if include_mlp_biases else 0.0)
        if mlp_input:
            bias = bias + self._weights_of(layer, T).attn.b_O
        return bias

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


class LoopedActivationCache(ActivationCache):
    """TransformerLens's ActivationCache that also answers to ``loop.{t}.blocks.{l}.<hook>`` aliases.

    Every method TransformerLens documents works on a looped cache (tests/test_cache_methods.py checks each
    one numerically, on TL 3.9 and 4.x), except where a model adds terms between iterations that TL's
    decompositions have no row for (input injection, readout feedback) and the SSM helpers: those raise.
    """

    def __getitem__(self, key):
        if isinstance(key, str):
            key = self.model.canonical_name(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        if isinstance(key, str):
            key = self.model.canonical_name(key)
        return key in self.cache_dict

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> LoopedActivationCache:
        sliced = super().apply_slice_to_batch_dim(batch_slice)  # TL returns a plain ActivationCache
        return LoopedActivationCache(sliced.cache_dict, self.model, has_batch_dim=sliced.has_batch_dim)

    def _exact_decomposition(self, method: str) -> None:
        cfg = self.model.cfg
        extra = [what for what, on in (("re-injects the input (input_injection)", cfg.input_injection != "none"),
                                       ("adds readout feedback (feedback)", bool(cfg.feedback)),
                                       ("mixes its residual streams (hyper_streams)", getattr(cfg, "hyper_streams", 1) > 1),
                                       ("adds the fast state z_L (slow_period)", bool(getattr(cfg, "slow_period", 0))))
                 if on]
        if extra:
            raise NotImplementedError(
                f"{method}: this model {' and '.join(extra)} between iterations, a term TransformerLens's "
                "decomposition has no row for; use stack_head_results(incl_remainder=True) or accumulated_resid")

    def decompose_resid(self, *args: Any, **kwargs: Any) -> Any:
        self._exact_decomposition("decompose_resid")
        return super().decompose_resid(*args, **kwargs)

    def get_full_resid_decomposition(self, *args: Any, **kwargs: Any) -> Any:
        self._exact_decomposition("get_full_resid_decomposition")
        return super().get_full_resid_decomposition(*args, **kwargs)

    def compute_ssm_state(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("compute_ssm_state: a looped transformer has attention blocks, no SSM mixer "
                                  "layers (TransformerLens's SSM helpers are for Mamba-style bridges)")

    def compute_ssm_effective_attention(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("compute_ssm_effective_attention: a looped transformer has attention blocks, no "
                                  "SSM mixer layers (TransformerLens's SSM helpers are for Mamba-style bridges)")


class ModelAtIterations:
    """A view of a LoopedTransformer fixed at one iteration count (used by ActivationCache).

    ``cfg`` is a copy whose ``n_layers`` covers a run of ``n_iterations``; everything else is read from
    the model (``blocks``, ``ln_final``, ``W_U`` ...), with the virtual layers bound for that run.
    """

    def __init__(self, model: HookedLoopedModel, n_iterations: int):
        self._model = model
        self.n_iterations = n_iterations
        self.cfg = model.cfg.replace(n_iterations=n_iterations)
        self.cfg.device = model.cfg.device

    @property
    def blocks(self) -> nn.ModuleList:
        self._model._bind(self.n_iterations)
        return self._model.blocks

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Tensor:
        return self._model.accumulated_bias(layer, mlp_input, include_mlp_biases, n_iterations=self.n_iterations)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __repr__(self) -> str:
        return f"ModelAtIterations({self.n_iterations}) of {self._model.__class__.__name__}"
