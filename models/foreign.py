"""Foreign looped models: looplens's hook names, cache and analyses on an existing torch module, as is.

A *foreign* looped model is any ``nn.Module`` whose forward calls one ``nn.ModuleList`` of blocks R
times (optionally after a prelude list and before a coda list)::

    h = embed(tokens)
    for block in prelude: h = block(h, ...)
    for _ in range(R):                       # (input injection, if any, happens here in the module's code)
        for block in blocks: h = block(h, ...)
    for block in coda: h = block(h, ...)
    logits = lm_head(ln_f(h))

:func:`wrap_looped` attaches PyTorch forward (pre-)hooks to the module's own blocks; they count the calls
of a run to know the virtual layer ``v = n_prelude + t * L + l`` of each one and pass the block's input
and output through TransformerLens HookPoints named as in :class:`~models.LoopedTransformer`
(``blocks.{v}.hook_resid_pre`` / ``hook_resid_post``, alias ``loop.{t}.blocks.{l}.<hook>``,
``loop.{t}.hook_state``). Nothing in the module's code or weights changes; the hooks do nothing outside
the wrapper's own runs. The wrapper answers to the part of LoopedTransformer's surface the interp
functions use (cfg, run_with_cache, run_with_hooks, hooks, steps, readout, ln_final, unembed, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from looplens.models.looped import LoopedTransformer, LoopStep
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

__all__ = ["ForeignConfig", "ForeignLoopedModel", "RetrofittedLoop", "retrofit_loop", "wrap_looped"]

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LOOP_NAME = re.compile(r"^loop\.(\d+)\.blocks\.(\d+)\.(.+)$")
_LOOP_ANY = re.compile(r"^loop\.(\d+)\.")


@dataclasses.dataclass
class ForeignConfig:
    """What the analyses read from ``model.cfg`` (the names of :class:`~models.LoopedConfig`)."""

    d_vocab: int
    d_model: int
    n_blocks: int
    n_iterations: int
    n_prelude: int = 0
    n_coda: int = 0
    n_heads: int = 1  # only read by patching's hook="z", which a foreign model does not offer
    n_ctx: int | None = None
    pad_token_id: int | None = None
    # The wrapper cannot see what the module's code adds between iterations: TransformerLens's exact
    # residual decompositions refuse it (models/hooked.py, LoopedActivationCache).
    input_injection: str = "unknown"
    feedback: float = 0.0
    device: str = "cpu"

    def n_virtual_layers(self, n_iterations: int | None = None) -> int:
        t = self.n_iterations if n_iterations is None else n_iterations
        return self.n_prelude + t * self.n_blocks + self.n_coda

    @property
    def n_layers(self) -> int:
        return self.n_virtual_layers()

    def replace(self, **changes: Any) -> ForeignConfig:
        return dataclasses.replace(self, **changes)


class _LayerHooks(nn.Module):
    """The hook points of one virtual layer (no weights: the module's own block computes)."""

    def __init__(self, attn: bool, mlp: bool):
        super().__init__()
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()
        if attn:
            self.hook_attn_out = HookPoint()
            self.attn = _AttentionHooks()
        if mlp:
            self.hook_mlp_out = HookPoint()


class _AttentionHooks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # [batch, head, q_pos, k_pos], from the attention module's output (out, weights): read-only, the
        # attention has already used it when the hook fires.
        self.hook_pattern = HookPoint()


class _IterationHooks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_state = HookPoint()  # the state after the iteration (resid_post of its last block)


@dataclasses.dataclass
class _Run:
    """One run of the module through the wrapper: where the block calls are, and what to substitute."""

    n_iterations: int
    core_calls: int = 0
    layer: int | None = None  # the virtual layer whose block is running (for attn / mlp hooks)
    replace_input: dict[int, Tensor] = dataclasses.field(default_factory=dict)  # v -> resid_pre
    replace_output: dict[int, Tensor] = dataclasses.field(default_factory=dict)  # v -> resid_post
    states: dict[int, Tensor] = dataclasses.field(default_factory=dict)  # t -> state after iteration t
    first_input: Tensor | None = None  # resid_pre of the first loop layer: the loop's input


def _resolve(root: nn.Module, path: str | None, what: str) -> Any:
    if path is None:
        return None
    obj: Any = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"wrap_looped: {what}={path!r}: {type(obj).__name__} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def _hidden(output: Any) -> Tensor:
    """The hidden state of a block's / sublayer's output: the tensor itself, or the first of a tuple."""
    return output[0] if isinstance(output, tuple | list) else output


def _with_hidden(output: Any, hidden: Tensor) -> Any:
    if isinstance(output, tuple | list):
        return type(output)([hidden, *output[1:]])
    return hidden


class ForeignLoopedModel(LoopedTransformer):
    """An existing looped module behind looplens's hook names (build it with :func:`wrap_looped`).

    ``model.module`` is the wrapped module; its parameters are not copied. ``model(tokens,
    n_iterations=T)`` runs the module's own forward for T iterations and returns its logits.

    A LoopedTransformer subclass so that the analyses, typed ``model: LoopedTransformer``, accept it; it
    owns none of LoopedTransformer's weights and overrides every method that would read them (the loop
    driver ``steps``, ``readout``, the hook plumbing). What needs looplens's own weight layout (checkpoints,
    TransformerLens's per-head weight reads) raises.
    """

    def __init__(self, module: nn.Module, *, blocks: str, n_iterations: int, final_norm: str, unembed: str,
                 embed: str | None, prelude: str | None, coda: str | None, attn: str | None, mlp: str | None,
                 iterations_attr: str | None, iterations_kwarg: str | None, pad_token_id: int | None,
                 n_ctx: int | None, vocab: Any = None):
        HookedRootModule.__init__(self)  # not LoopedTransformer.__init__: no weights of its own
        if not isinstance(module, nn.Module):
            raise TypeError(f"wrap_looped: module must be a torch.nn.Module, got {type(module).__name__}")
        if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
            raise ValueError(f"wrap_looped: n_iterations must be a positive integer, got {n_iterations!r}")
        if iterations_attr is not None and iterations_kwarg is not None:
            raise ValueError("wrap_looped: give iterations_attr or iterations_kwarg, not both")
        if iterations_attr is not None:
            _resolve(module, iterations_attr, "iterations_attr")
        self.module = module
        self.vocab = vocab
        lists = {}
        for what, path in (("blocks", blocks), ("prelude", prelude), ("coda", coda)):
            found = _resolve(module, path, what)
            if found is not None and not isinstance(found, nn.ModuleList | nn.Sequential):
                raise ValueError(f"wrap_looped: {what}={path!r} is a {type(found).__name__}, expected an nn.ModuleList")
            lists[what] = list(found) if found is not None else []
        if not lists["blocks"]:
            raise ValueError(f"wrap_looped: blocks={blocks!r} is empty")
        # Plain attributes (not submodules): the module already owns them, and state_dict stays the module's.
        object.__setattr__(self, "_core", lists["blocks"])
        object.__setattr__(self, "_prelude", lists["prelude"])
        object.__setattr__(self, "_coda", lists["coda"])
        object.__setattr__(self, "ln_final", _resolve(module, final_norm, "final_norm"))
        object.__setattr__(self, "unembed", _resolve(module, unembed, "unembed"))
        object.__setattr__(self, "_embed", _resolve(module, embed, "embed"))
        W = self.W_U.T if isinstance(getattr(self.unembed, "W_U", None), Tensor) else getattr(self.unembed, "weight", None)
        if not isinstance(W, Tensor) or W.ndim != 2:
            raise ValueError(f"wrap_looped: unembed={unembed!r} must be a module with a [d_vocab, d_model] .weight "
                             "(an nn.Linear lm_head) or a [d_model, d_vocab] .W_U")
        self._attn, self._mlp = attn, mlp
        self._iterations_attr, self._iterations_kwarg = iterations_attr, iterations_kwarg
        self.cfg = ForeignConfig(d_vocab=W.shape[0], d_model=W.shape[1], n_blocks=len(lists["blocks"]),
                                 n_iterations=n_iterations, n_prelude=len(lists["prelude"]),
                                 n_coda=len(lists["coda"]), n_ctx=n_ctx, pad_token_id=pad_token_id,
                                 device=str(W.device))
        self.blocks = nn.ModuleList()  # hook points per virtual layer, grown on demand
        self.loop = nn.ModuleList()  # hook points per iteration
        self._run: _Run | None = None
        self._coda_calls: dict[int, tuple[tuple, dict]] = {}  # coda block i -> its last call's other arguments
        self._handles: list[Any] = []
        self._attach()
        self._grow(n_iterations)
        # The wrapper starts in the module's mode (nn.Module starts in training mode: analyses restore the
        # mode they found, and restoring "training" would switch the module's dropout on).
        self.train(module.training)

    # ------------------------------------------------------------------------------------------------
    # Hooks on the module's own calls
    # ------------------------------------------------------------------------------------------------
    def _attach(self) -> None:
        for stage, modules in (("prelude", self._prelude), ("loop", self._core), ("coda", self._coda)):
            for index, block in enumerate(modules):
                self._handles.append(block.register_forward_pre_hook(self._pre_hook(stage, index), with_kwargs=True))
                self._handles.append(block.register_forward_hook(self._post_hook(stage, index)))
                for sub, name in ((self._attn, "hook_attn_out"), (self._mlp, "hook_mlp_out")):
                    if sub is not None:
                        target = _resolve(block, sub, "attn" if name == "hook_attn_out" else "mlp")
                        self._handles.append(target.register_forward_hook(self._sublayer_hook(name)))

    def remove_hooks_from_module(self) -> None:
        """Take the wrapper's PyTorch hooks off the module (the wrapper is unusable afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _layer_of(self, stage: str, index: int, run: _Run) -> int:
        cfg = self.cfg
        if stage == "prelude":
            return index
        if stage == "coda":
            return cfg.n_prelude + run.n_iterations * cfg.n_blocks + index
        expected = run.core_calls % cfg.n_blocks
        if index != expected:
            raise RuntimeError(f"wrap_looped: the module called loop block {index} where block {expected} was due: "
                               "its loop does not call blocks 0..L-1 in order")
        if run.core_calls >= run.n_iterations * cfg.n_blocks:
            raise RuntimeError(self._count_error(run.core_calls + 1, run.n_iterations, "more than "))
        v = cfg.n_prelude + run.core_calls
        run.core_calls += 1
        return v

    def _count_error(self, calls: int, n_iterations: int, qualifier: str = "") -> str:
        expected = n_iterations * self.cfg.n_blocks
        return (f"wrap_looped: the module made {qualifier}{calls - 1 if qualifier else calls} loop-block calls, "
                f"expected {n_iterations} iterations x {self.cfg.n_blocks} blocks = {expected}: set "
                "n_iterations to the module's loop count, and iterations_attr= or iterations_kwarg= so the "
                "wrapper can set it")

    def _pre_hook(self, stage: str, index: int) -> Callable:
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            run = self._run
            if run is None:  # a call outside the wrapper's runs: the module behaves as if unwrapped
                return None
            v = self._layer_of(stage, index, run)
            run.layer = v
            if stage == "coda":
                self._coda_calls[index] = (args[1:], kwargs)
            if not args and "hidden_states" not in kwargs:
                raise RuntimeError(f"wrap_looped: {stage} block {index} was called without a positional hidden state "
                                   "or a hidden_states= argument; the wrapper cannot tell which input is the stream")
            x = args[0] if args else kwargs["hidden_states"]
            x = run.replace_input.pop(v, x)
            if stage == "loop" and v == self.cfg.n_prelude:
                run.first_input = x
            x = self.blocks[v].hook_resid_pre(x)
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        return hook

    def _post_hook(self, stage: str, index: int) -> Callable:
        def hook(block: nn.Module, args: tuple, output: Any) -> Any:
            run = self._run
            if run is None or run.layer is None:
                return None
            v, run.layer = run.layer, None
            h = run.replace_output.pop(v, _hidden(output))
            h = self.blocks[v].hook_resid_post(h)
            if stage == "loop" and index == self.cfg.n_blocks - 1:
                t = (v - self.cfg.n_prelude) // self.cfg.n_blocks
                h = self.loop[t].hook_state(h)
                run.states[t] = h
            return _with_hidden(output, h)

        return hook

    def _sublayer_hook(self, name: str) -> Callable:
        def hook(sub: nn.Module, args: tuple, output: Any) -> Any:
            run = self._run
            if run is None or run.layer is None:
                return None
            layer = self.blocks[run.layer]
            if name == "hook_attn_out":
                pattern = output[1] if isinstance(output, tuple | list) and len(output) > 1 else None
                if isinstance(pattern, Tensor) and pattern.ndim == 4:
                    layer.attn.hook_pattern(pattern)
                elif layer.attn.hook_pattern._forward_hooks:
                    raise RuntimeError(f"{layer.attn.hook_pattern.name}: the attention module returned no attention "
                                       "weights (out, weights [batch, head, q, k]) to read the pattern from")
            return _with_hidden(output, getattr(layer, name)(_hidden(output)))

        return hook

    @contextlib.contextmanager
    def _running(self, n_iterations: int) -> Iterator[_Run]:
        """A run context: the module's loop count set to T (if it can be), block calls counted."""
        if self._run is not None:
            raise RuntimeError("wrap_looped: a run of this model is already in progress (re-entrant call)")
        self._grow(n_iterations)
        run = _Run(n_iterations)
        old = getattr(self.module, self._iterations_attr) if self._iterations_attr else None
        if self._iterations_attr:
            setattr(self.module, self._iterations_attr, n_iterations)
        self._run = run
        try:
            yield run
        finally:
            self._run = None
            if self._iterations_attr:
                setattr(self.module, self._iterations_attr, old)

    def _call_module(self, tokens: Tensor, run: _Run) -> Tensor:
        kwargs = {self._iterations_kwarg: run.n_iterations} if self._iterations_kwarg else {}
        out = self.module(tokens, **kwargs)
        logits = getattr(out, "logits", None)
        logits = _hidden(out) if logits is None else logits
        if run.core_calls != run.n_iterations * self.cfg.n_blocks:
            raise RuntimeError(self._count_error(run.core_calls, run.n_iterations))
        return logits

    # ------------------------------------------------------------------------------------------------
    # Hook names (as in models/hooked.py)
    # ------------------------------------------------------------------------------------------------
    def _grow(self, n_iterations: int) -> None:
        needed = self.cfg.n_virtual_layers(n_iterations)
        if len(self.blocks) >= needed and len(self.loop) >= n_iterations:
            return
        while len(self.blocks) < needed:
            self.blocks.append(_LayerHooks(self._attn is not None, self._mlp is not None))
        while len(self.loop) < n_iterations:
            self.loop.append(_IterationHooks())
        self.setup()

    def setup(self) -> None:
        """HookedRootModule.setup over the wrapper's hook points only, plus the ``loop.{t}.blocks.{l}``
        aliases (in mod_dict only, so each hook point is cached once, under its virtual-layer name)."""
        self.mod_dict, self.hook_dict = {}, {}
        for prefix, container in (("blocks", self.blocks), ("loop", self.loop)):
            for name, module in container.named_modules(prefix=prefix):
                self.mod_dict[name] = module
                if isinstance(module, HookPoint):
                    module.name = name
                    self.hook_dict[name] = module
        self._add_loop_aliases()
        # Names (virtual_layer, iteration_block, hook_name, canonical_name, ...) are HookedLoopedModel's:
        # they read only cfg's n_prelude / n_blocks / n_coda / n_virtual_layers, which ForeignConfig has.

    # ------------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------------
    @property
    def W_E(self) -> Tensor:
        """The token embedding ([d_vocab, d_model]; the unembedding's transpose when no embed path was given)."""
        if self._embed is None:
            return self.W_U.T
        return self._embed.W_E if isinstance(getattr(self._embed, "W_E", None), Tensor) else self._embed.weight

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        W_U = getattr(self.unembed, "W_U", None)  # a looplens / TransformerLens Unembed
        return W_U if isinstance(W_U, Tensor) else self.unembed.weight.T

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        bias = getattr(self.unembed, "b_U", getattr(self.unembed, "bias", None))
        return bias if bias is not None else torch.zeros(self.cfg.d_vocab, device=self.W_U.device)

    def check_tokens(self, tokens: Any) -> Int[Tensor, "batch pos"]:
        if isinstance(tokens, str | list) and self.vocab is not None:
            tokens, _ = self.vocab.encode_batch([tokens] if isinstance(tokens, str) else tokens)
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        tokens = tokens[None] if tokens.ndim == 1 else tokens
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape [batch, pos] with pos >= 1, got {tuple(tokens.shape)}")
        if self.cfg.n_ctx is not None and tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds n_ctx={self.cfg.n_ctx}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.d_vocab):
            raise ValueError(f"token ids must be in [0, d_vocab={self.cfg.d_vocab}), got min {int(tokens.min())}, "
                             f"max {int(tokens.max())}")
        return tokens.to(device=self.W_U.device, dtype=torch.long)

    def to_tokens(self, input: str | list[str], **_: Any) -> Int[Tensor, "batch pos"]:
        if self.vocab is None:
            raise ValueError("this model has no vocab attached: set model.vocab = dataset.vocab")
        return self.check_tokens(input)

    def _check_iterations(self, n_iterations: Any) -> int:
        if n_iterations is None:
            return self.cfg.n_iterations
        if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
            raise ValueError(f"n_iterations must be a positive integer, got {n_iterations!r}")
        if n_iterations != self.cfg.n_iterations and self._iterations_attr is None and self._iterations_kwarg is None:
            raise ValueError(f"n_iterations={n_iterations}: this module loops a fixed {self.cfg.n_iterations} times; "
                             "pass iterations_attr= or iterations_kwarg= to wrap_looped to run other counts")
        return n_iterations

    def readout_positions(self, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
        """The last non-pad position of each query (the last position without a pad_token_id)."""
        if self.cfg.pad_token_id is None:
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)
        lengths = (tokens != self.cfg.pad_token_id).sum(-1)
        if bool((lengths == 0).any()):
            raise ValueError("a query consists only of padding tokens")
        return lengths - 1

    # ------------------------------------------------------------------------------------------------
    # Running
    # ------------------------------------------------------------------------------------------------
    def forward(self, tokens: Any, n_iterations: int | None = None, return_type: str | None = "logits") -> Any:
        """The module's own forward for ``n_iterations`` (default: the wrapper's), through the hook points."""
        if return_type not in ("logits", None):
            raise ValueError(f"return_type must be 'logits' or None for a wrapped module, got {return_type!r}")
        tokens = self.check_tokens(tokens)
        with self._running(self._check_iterations(n_iterations)) as run:
            logits = self._call_module(tokens, run)
        return logits if return_type == "logits" else None

    @torch.no_grad()
    def predict(self, tokens: Any, n_iterations: int | None = None) -> Float[Tensor, "batch d_vocab"]:
        tokens = self.check_tokens(tokens)
        logits = self(tokens, n_iterations=n_iterations)
        return logits[torch.arange(tokens.shape[0], device=logits.device), self.readout_positions(tokens)]

    def steps(self, tokens: Any, n_iterations: int | None = None, *, start: int = 0, start_layer: int | None = None,
              state: Tensor | None = None, loop_input: Tensor | None = None) -> Iterator[Any]:
        """LoopedTransformer's loop driver on the module: one LoopStep per iteration t = start..T-1.

        The module runs its own forward once (all T iterations; a foreign loop cannot pause), and the
        states after each iteration are yielded afterwards. Resuming replaces an activation inside that
        forward: ``start_layer=v`` replaces virtual layer v's input (resid_pre) with ``state``; ``start=t``
        replaces the state after iteration t - 1 (resid_post of its last block) with ``state``, so the
        module's own input injection applies to it. ``loop_input`` is accepted for the driver's
        signature, but the module always re-injects the input it computes itself from ``tokens``.
        """
        tokens = self.check_tokens(tokens)
        T = self._check_iterations(n_iterations)
        cfg = self.cfg
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < T:
            raise ValueError(f"start must be an iteration in [0, n_iterations={T}), got {start!r}")
        if (start or start_layer is not None) and state is None:
            raise ValueError("resuming (start / start_layer) needs `state`, the activation to resume from")
        if start and start_layer is not None:
            raise ValueError("give start (an iteration) or start_layer (a virtual layer), not both")
        n_resumable = cfg.n_prelude + T * cfg.n_blocks
        if start_layer is not None and not 0 <= start_layer < n_resumable:
            raise ValueError(f"start_layer must be a prelude or loop layer in [0, {n_resumable}) for {T} iterations, "
                             f"got {start_layer!r} (coda layers: readout(..., start_layer=v))")
        with self._running(T) as run:
            if start_layer is not None:
                run.replace_input[start_layer] = state
            elif start:
                run.replace_output[self.virtual_layer(start - 1, cfg.n_blocks - 1)] = state
            elif state is not None:  # the loop's input
                run.replace_input[cfg.n_prelude] = state
            self._call_module(tokens, run)
        first = 0 if start_layer is None else max(0, (start_layer - cfg.n_prelude) // cfg.n_blocks)
        memo: dict = {}
        return iter([LoopStep(t, T, run.states[t], run.first_input, tokens, self, memo)
                     for t in range(max(start, first), T)])

    def readout(self, state: Float[Tensor, "batch pos d_model"], n_iterations: int, *,
                start_layer: int | None = None) -> Float[Tensor, "batch pos d_vocab"]:
        """Coda, final norm and unembedding applied to a state, by calling the module's own submodules.

        Coda blocks are called with the other arguments of their last call inside a run of the module (for
        example its attention mask); those must broadcast over ``state``'s batch.
        """
        cfg = self.cfg
        first = cfg.n_prelude + n_iterations * cfg.n_blocks
        start = first if start_layer is None else start_layer
        if not (first <= start < first + cfg.n_coda or start == first):
            raise ValueError(f"start_layer must be a coda layer of a run of {n_iterations} iterations, got {start_layer}")
        if cfg.n_coda and len(self._coda_calls) < cfg.n_coda:
            raise RuntimeError("readout: run the model once first (the coda's call arguments are taken from a run)")
        outer = self._run
        self._run = None
        try:
            with self._running(n_iterations):
                for v in range(start, first + cfg.n_coda):
                    args, kwargs = self._coda_calls[v - first]
                    state = _hidden(self._coda[v - first](state, *args, **kwargs))
        finally:
            self._run = outer
        return self.unembed(self.ln_final(state))

    # ------------------------------------------------------------------------------------------------
    # TransformerLens surface
    # ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, clear_contexts: bool = False):
        """TransformerLens's ``hooks()``; names of later iterations are created on demand, unknown names are
        a clear error (a foreign block has resid_pre / resid_post, plus attn_out / mlp_out when wrapped
        with ``attn=`` / ``mlp=``)."""
        names = [name for name, _ in [*fwd_hooks, *bwd_hooks]]
        self._grow(max(self._iterations_needed_for(names), 1))
        for name in names:
            if isinstance(name, str) and name not in self.mod_dict:
                have = sorted({n.split(".", 2)[-1] for n in self.hook_dict if n.startswith("blocks.0.")})
                raise ValueError(f"hook {name!r} does not exist on this wrapped model; each layer has {have} "
                                 "(and loop.{t}.hook_state)")
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
                       **model_kwargs: Any) -> tuple[Any, Any]:
        """Run and cache every hook point that fires: one entry per (iteration, block)."""
        from looplens.models.hooked import LoopedActivationCache

        T = self._check_iterations(model_kwargs.get("n_iterations"))
        self._grow(T)
        cache_dict, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device,
                                                      remove_batch_dim=remove_batch_dim, pos_slice=pos_slice)
        with self.hooks(fwd_hooks=fwd, bwd_hooks=bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                out.backward()
        if not return_cache_object:
            return out, cache_dict
        return out, LoopedActivationCache(cache_dict, _AtIterations(self, T), has_batch_dim=not remove_batch_dim)


    # What LoopedTransformer does with its own weights has no counterpart on a foreign module.
    def _check_tokens(self, tokens: Any) -> Tensor:
        return self.check_tokens(tokens)

    def _bind(self, n_iterations: int) -> None:
        """Nothing to bind: the module's own blocks compute."""

    def _unsupported(self, what: str) -> Any:
        raise NotImplementedError(f"{what}: a wrapped foreign module keeps its own weights and code; use the "
                                  "module's own save / weights (models/foreign.py)")

    def save(self, *args: Any, **kwargs: Any) -> Any:
        return self._unsupported("save")

    def iterate(self, *args: Any, **kwargs: Any) -> Any:
        return self._unsupported("iterate (a foreign loop runs as a whole: use steps)")

    def embed_tokens(self, *args: Any, **kwargs: Any) -> Any:
        return self._unsupported("embed_tokens (use steps / run_with_cache: blocks.0.hook_resid_pre)")

    def accumulated_bias(self, *args: Any, **kwargs: Any) -> Any:
        return self._unsupported("accumulated_bias")

    def _apply(self, fn, recurse: bool = True):  # keep cfg.device in step with .to()/.cuda()/.cpu()
        out = nn.Module._apply(self, fn, recurse)
        self.cfg.device = str(self.W_U.device)
        return out


class _AtIterations:
    """The wrapper seen at one iteration count (what an ActivationCache reads: cfg.n_layers, names)."""

    def __init__(self, model: ForeignLoopedModel, n_iterations: int):
        self._model = model
        self.n_iterations = n_iterations
        self.cfg = model.cfg.replace(n_iterations=n_iterations)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def wrap_looped(
    module: nn.Module,
    blocks: str = "blocks",
    n_iterations: int = 1,
    *,
    final_norm: str = "ln_f",
    unembed: str = "lm_head",
    embed: str | None = None,
    prelude: str | None = None,
    coda: str | None = None,
    attn: str | None = None,
    mlp: str | None = None,
    iterations_attr: str | None = None,
    iterations_kwarg: str | None = None,
    pad_token_id: int | None = None,
    n_ctx: int | None = None,
    vocab: Any = None,
) -> ForeignLoopedModel:
    """Give an existing looped module looplens's per-iteration hook names, cache and analyses.

    Args:
        module: the model; ``module(tokens)`` returns logits [batch, pos, d_vocab] (a tensor, a tuple
            whose first item they are, or an object with ``.logits``).
        blocks: attribute path of the loop body, an ``nn.ModuleList`` called in order, R times per forward.
        n_iterations: R, the module's default loop count.
        final_norm, unembed: paths of the final norm and the ``[d_vocab, d_model]`` lm_head (the logit lens
            decodes with them). embed: path of the token embedding (only its ``.weight`` is read).
        prelude, coda: paths of ModuleLists run once before / after the loop (Huginn's shape).
        attn, mlp: paths inside each block of the sublayers whose output (first item of a tuple) is the
            block's ``hook_attn_out`` / ``hook_mlp_out``.
        iterations_attr / iterations_kwarg: how to run T != R iterations: an attribute of the module the
            wrapper sets to T during its runs, or a keyword argument of ``module.forward``.
        pad_token_id: right padding id (the readout position is the last non-pad token); None: the last
            position. n_ctx: longest sequence accepted (None: unchecked). vocab: a data.Vocab (strings).

    >>> import torch
    >>> from torch import nn
    >>> class Tiny(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb, self.blocks, self.ln_f = nn.Embedding(5, 4), nn.ModuleList([nn.Linear(4, 4)]), nn.LayerNorm(4)
    ...         self.lm_head, self.R = nn.Linear(4, 5, bias=False), 2
    ...     def forward(self, tokens):
    ...         h = self.emb(tokens)
    ...         for _ in range(self.R):
    ...             for block in self.blocks:
    ...                 h = block(h)
    ...         return self.lm_head(self.ln_f(h))
    >>> model = wrap_looped(Tiny(), n_iterations=2, iterations_attr="R")
    >>> _, cache = model.run_with_cache(torch.tensor([[1, 2]]), n_iterations=3)
    >>> sorted(k for k in cache.keys() if k.endswith("resid_post"))
    ['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post', 'blocks.2.hook_resid_post']
    """
    return ForeignLoopedModel(module, blocks=blocks, n_iterations=n_iterations, final_norm=final_norm,
                              unembed=unembed, embed=embed, prelude=prelude, coda=coda, attn=attn, mlp=mlp,
                              iterations_attr=iterations_attr, iterations_kwarg=iterations_kwarg,
                              pad_token_id=pad_token_id, n_ctx=n_ctx, vocab=vocab)


# ---------------------------------------------------------------------------------------------------
# Training-free retrofitted loops
# ---------------------------------------------------------------------------------------------------
class DampedRange(nn.Module):
    """One iteration of a retrofitted loop: ``x <- x + damping * (f(x) - x)``, f = the blocks in order."""

    def __init__(self, blocks: Sequence[nn.Module], damping: float):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.damping = damping

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        f = x
        for block in self.blocks:
            f = block(f)
        return x + self.damping * (f - x)


class RetrofittedLoop(nn.Module):
    """A trained LoopedTransformer whose blocks ``start..stop-1`` run as a damped loop, ``n_loops`` times.

    Blocks before the range form the prelude, blocks after it the coda; every block computes with the
    trained model's own weights (shared, not copied). The model's readout feedback and input injection,
    if any, are not part of the retrofitted loop.
    """

    def __init__(self, model: LoopedTransformer, start: int, stop: int, n_loops: int, damping: float):
        from looplens.models.components import TransformerBlock

        super().__init__()
        cfg = model.cfg
        if cfg.hyper_streams > 1 or cfg.slow_period:  # their streams / fast module are not blocks to loop
            raise ValueError(f"retrofit_loop: the model must be a plain stack, got hyper_streams={cfg.hyper_streams}, "
                             f"slow_period={cfg.slow_period}")
        if cfg.n_iterations != 1 or cfg.n_prelude or cfg.n_coda:
            raise ValueError("retrofit_loop: the model must be a vanilla stack (n_iterations=1, no prelude / coda), "
                             f"got n_iterations={cfg.n_iterations}, n_prelude={cfg.n_prelude}, n_coda={cfg.n_coda}")
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= cfg.n_blocks):
            raise ValueError(f"retrofit_loop: blocks must be a range start < stop within 0..{cfg.n_blocks}, "
                             f"got ({start!r}, {stop!r})")
        if not isinstance(damping, int | float) or not 0 <= damping <= 1:
            raise ValueError(f"retrofit_loop: damping must be in [0, 1], got {damping!r}")
        object.__setattr__(self, "base", model)  # a reference: the trained weights stay the model's

        def block(i: int) -> nn.Module:
            return TransformerBlock(cfg, model.core[i]).train(model.training)

        self.prelude = nn.ModuleList(block(i) for i in range(start))
        self.loop = nn.ModuleList([DampedRange([block(i) for i in range(start, stop)], float(damping))])
        self.coda = nn.ModuleList(block(i) for i in range(stop, cfg.n_blocks))
        self.n_loops = n_loops

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        model = self.base
        x = model.embed(tokens)
        if model.cfg.positional == "learned":
            x = x + model.pos_embed(tokens)
        for block in self.prelude:
            x = block(x)
        for _ in range(self.n_loops):
            for body in self.loop:
                x = body(x)
        for block in self.coda:
            x = block(x)
        return model.unembed(model.ln_final(x))


def retrofit_loop(model: LoopedTransformer, blocks: tuple[int, int], n_iterations: int = 1, *,
                  damping: float = 1.0) -> ForeignLoopedModel:
    """Loop blocks ``start..stop-1`` of a trained vanilla model, training-free: ``x <- x + a (f(x) - x)``.

    Returns the :class:`RetrofittedLoop` wrapped by :func:`wrap_looped`: one loop "block" per iteration
    (the damped range), so ``loop.{t}.hook_state`` / ``blocks.{P + t}.hook_resid_post`` is the state after
    iteration t, and every interp function runs on it at any iteration count. ``n_iterations=1`` with
    ``damping=1`` is the original model.

    >>> from looplens.models import LoopedConfig, LoopedTransformer
    >>> vanilla = LoopedTransformer(LoopedConfig(d_vocab=9, n_ctx=3, d_model=8, n_heads=2, n_blocks=4,
    ...                                          n_iterations=1, seed=0)).eval()
    >>> looped = retrofit_loop(vanilla, (1, 3), n_iterations=1)
    >>> x = torch.tensor([[1, 2, 3]])
    >>> torch.allclose(looped(x), vanilla(x), atol=1e-6), looped.cfg.n_prelude, looped.cfg.n_coda
    (True, 1, 1)
    """
    if isinstance(blocks, int) or len(blocks) != 2:
        raise ValueError(f"retrofit_loop: blocks must be (start, stop), got {blocks!r}")
    module = RetrofittedLoop(model, int(blocks[0]), int(blocks[1]), n_iterations, damping).train(model.training)
    object.__setattr__(module, "ln_final", model.ln_final)
    object.__setattr__(module, "lm_unembed", model.unembed)
    object.__setattr__(module, "token_embed", model.embed)
    return wrap_looped(module, blocks="loop", n_iterations=n_iterations, prelude="prelude", coda="coda",
                       final_norm="ln_final", unembed="lm_unembed", embed="token_embed", iterations_attr="n_loops",
                       pad_token_id=model.cfg.pad_token_id, n_ctx=model.cfg.n_ctx, vocab=model.vocab)
