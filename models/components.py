"""The looped model's parts, with TransformerLens's weight names, shapes and hook points.

Weights and hooks are separated on purpose. A looped model runs the same physical block at every
iteration, but TransformerLens keeps only one cached value per hook name, so every *virtual* layer
(iteration t of physical block l) needs hook points of its own. Hence two kinds of module here:

- ``*Params`` modules hold parameters and nothing else. They exist once per physical block.
- The compute modules (``LayerNorm``, ``Attention``, ``MLP``, ``TransformerBlock``) hold hook points
  and a reference to a ``*Params`` module. Several compute modules (one per iteration) may share one
  ``*Params``; only its owner registers it, so ``named_parameters()`` lists each weight once and
  gradients from every iteration add up on it. ``block.attn.W_Q`` reads through to the shared weight,
  as TransformerLens code expects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from looplens.models.config import LoopedConfig
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


# ---------------------------------------------------------------------------------------------------
# Parameters (one per physical block)
# ---------------------------------------------------------------------------------------------------
class LayerNormParams(nn.Module):
    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.b = nn.Parameter(torch.zeros(cfg.d_model))


# The scope of :func:`reuse_weights`: AttentionParams id -> (the weights it was built from, the fused pair)
_REUSE: ContextVar[dict | None] = ContextVar("looplens_reuse_weights", default=None)


@contextlib.contextmanager
def reuse_weights() -> Iterator[None]:
    """Inside this block each attention builds its fused qkv weight once and every layer reuses it.

    A looped model runs the same weights at every iteration (and an analysis runs many passes over fixed
    weights), but each layer's one-GEMM q/k/v projection needs W_Q, W_K, W_V laid side by side: a copy of
    3 x d_model^2 numbers, 10% of a forward at the paper's width when made per layer
    (benchmarks/README.md, 16.1). ``forward``, the evaluation and the patching sweeps open this scope
    around a whole pass; the fused pair is rebuilt when a weight changes in place (its version counter
    moves), is replaced, or grad mode differs, so a scope is never stale through ordinary tensor ops.
    Scopes nest (an inner one starts empty) and end with the ``with`` block.
    """
    if torch.compiler.is_compiling():  # the compiler shares the fused weight itself (and traces no ContextVar)
        yield
        return
    token = _REUSE.set({})
    try:
        yield
    finally:
        _REUSE.reset(token)


class AttentionParams(nn.Module):
    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q = nn.Parameter(torch.empty(h, d, dh))
        self.W_K = nn.Parameter(torch.empty(h, d, dh))
        self.W_V = nn.Parameter(torch.empty(h, d, dh))
        self.W_O = nn.Parameter(torch.empty(h, dh, d))
        self.b_Q = nn.Parameter(torch.zeros(h, dh))
        self.b_K = nn.Parameter(torch.zeros(h, dh))
        self.b_V = nn.Parameter(torch.zeros(h, dh))
        self.b_O = nn.Parameter(torch.zeros(d))

    def fused_qkv(self) -> tuple[Float[Tensor, "d_model qkv"], Float[Tensor, " qkv"]]:
        """W_Q, W_K, W_V side by side, "three head d_model d_head -> d_model (three head d_head)", and their
        biases "(three head d_head)": q, k and v in one GEMM. Built once per :func:`reuse_weights` scope."""
        weights = (self.W_Q, self.W_K, self.W_V, self.b_Q, self.b_K, self.b_V)
        memo = None if torch.compiler.is_compiling() else _REUSE.get()  # compiled: the compiler shares it
        if memo is not None:
            key = (torch.is_grad_enabled(), tuple(w._version for w in weights))
            hit = memo.get(id(self))
            if hit is not None and hit[1] == key and all(a is b for a, b in zip(hit[0], weights)):
                return hit[2]
        W_Q, W_K, W_V, b_Q, b_K, b_V = weights
        # plain permute/reshape, not einops: without a scope this runs per layer
        fused = (torch.stack([W_Q, W_K, W_V]).permute(2, 0, 1, 3).reshape(W_Q.shape[1], -1),
                 torch.stack([b_Q, b_K, b_V]).reshape(-1))
        if memo is not None:
            memo[id(self)] = (weights, key, fused)  # holding the weights: their ids cannot be reused meanwhile
        return fused


class MLPParams(nn.Module):
    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))


class BlockParams(nn.Module):
    """All weights of one physical pre-LN transformer block."""

    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        self.ln1 = LayerNormParams(cfg)
        self.attn = AttentionParams(cfg)
        self.ln2 = LayerNormParams(cfg)
        self.mlp = MLPParams(cfg)


# ---------------------------------------------------------------------------------------------------
# Compute modules (one per virtual layer): hook points + a reference to shared parameters
# ---------------------------------------------------------------------------------------------------
class _UsesParams(nn.Module):
    """Base for compute modules: ``self.params`` is the (possibly shared) parameter module.

    ``own=True`` registers it (it is then saved and trained under this module's name);
    ``own=False`` keeps a plain reference, so the same weights are not listed twice.
    Attribute reads that miss (``self.W_Q``) fall through to the parameters.
    """

    def __init__(self, params: nn.Module, own: bool):
        super().__init__()
        if own:
            self.params = params
        else:
            object.__setattr__(self, "params", params)

    def bind(self, params: nn.Module) -> None:
        """Compute with ``params`` from now on (a reference; used to map virtual layers to weights)."""
        object.__setattr__(self, "params", params)
        for child_name, child in self._modules.items():
            if isinstance(child, _UsesParams) and child_name != "params":
                child.bind(getattr(params, child_name))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            params = self.__dict__.get("params") or self._modules.get("params")
            if params is not None and name[:1] in ("W", "b", "w"):
                return getattr(params, name)
            raise


def _has_hooks(module: nn.Module) -> bool:
    """Whether a forward, pre-forward or backward hook is attached (TransformerLens attaches module hooks)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


# torch's global module hooks (register_module_forward_hook, ...): mutated in place, so read here once
_GLOBAL_MODULE_HOOKS = tuple(getattr(torch.nn.modules.module, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def _hook_free(modules: tuple[nn.Module, ...]) -> bool:
    """No forward, pre-forward or backward hook on any of ``modules``, and no global module hook."""
    if any(_GLOBAL_MODULE_HOOKS):
        return False
    return not any(_has_hooks(m) for m in modules)


class LayerNorm(_UsesParams):
    """TransformerLens's LayerNorm ("LN"): centre, divide by the RMS (hook_scale), affine.

    As in TransformerLens, hook_normalized is the centred and scaled input *before* the affine map.
    With no hook attached to either hook point the same map runs as one fused ``F.layer_norm``.
    """

    def __init__(self, cfg: LoopedConfig, params: LayerNormParams, own: bool = False):
        super().__init__(params, own)
        self.eps = cfg.ln_eps
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model], before w and b

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if not (_has_hooks(self.hook_scale) or _has_hooks(self.hook_normalized)):
            # the same map in one fused kernel (biased variance, eps inside the root): tests/test_fast_path.py
            return F.layer_norm(x, x.shape[-1:], self.params.w, self.params.b, self.eps)
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale) * self.params.w + self.params.b


class Attention(_UsesParams):
    """Causal multi-head attention with per-head weights [n_heads, d_model, d_head].

    Two paths give the same numbers (tested): the explicit one materialises scores and pattern
    (and fires hook_attn_scores / hook_pattern); the fast one calls SDPA and is used whenever no
    hook is attached to the scores or the pattern.
    """

    def __init__(self, cfg: LoopedConfig, params: AttentionParams, own: bool = False):
        super().__init__(params, own)
        self.cfg = cfg
        self.hook_q = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head_index, query_pos, key_pos]
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()  # [batch, pos, head_index, d_head]
        self.dropout_p = cfg.dropout

    def _needs_pattern(self) -> bool:
        return _has_hooks(self.hook_attn_scores) or _has_hooks(self.hook_pattern)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        p, cfg = self.params, self.cfg
        batch, n_pos, _ = x.shape
        W_qkv, b_qkv = p.fused_qkv()  # q, k, v in one GEMM (the per-head weights side by side)
        qkv = torch.addmm(b_qkv, x.reshape(batch * n_pos, -1), W_qkv).view(batch, n_pos, 3, cfg.n_heads, cfg.d_head)
        q = self.hook_q(qkv[:, :, 0])  # [batch, pos, head_index, d_head]
        k = self.hook_k(qkv[:, :, 1])
        v = self.hook_v(qkv[:, :, 2])
        dropout = self.dropout_p if self.training else 0.0
        if self._needs_pattern():
            causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=x.device).tril()
            scores = einops.einsum(
                q, k, "batch q_pos head_index d_head, batch k_pos head_index d_head -> batch head_index q_pos k_pos"
            ) / cfg.attn_scale
            scores = self.hook_attn_scores(scores.masked_fill(~causal, float("-inf")))
            pattern = self.hook_pattern(scores.softmax(dim=-1))
            if dropout:
                pattern = F.dropout(pattern, dropout)
            z = einops.einsum(
                pattern, v, "batch head_index q_pos k_pos, batch k_pos head_index d_head -> batch q_pos head_index d_head"
            )
        else:
            z = F.scaled_dot_product_attention(  # is_causal: no mask tensor, the causal kernel
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                is_causal=True, dropout_p=dropout, scale=1.0 / cfg.attn_scale,
            ).transpose(1, 2)
        z = self.hook_z(z)
        out = torch.addmm(p.b_O, z.reshape(batch * n_pos, -1), p.W_O.reshape(-1, cfg.d_model))
        return out.view(batch, n_pos, cfg.d_model)


class MLP(_UsesParams):
    def __init__(self, cfg: LoopedConfig, params: MLPParams, own: bool = False):
        super().__init__(params, own)
        self.act = _ACTIVATIONS[cfg.act_fn]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        p = self.params
        batch, n_pos, d_model = x.shape
        pre = self.hook_pre(torch.addmm(p.b_in, x.reshape(batch * n_pos, d_model), p.W_in).view(batch, n_pos, -1))
        post = self.hook_post(self.act(pre))
        return torch.addmm(p.b_out, post.reshape(batch * n_pos, -1), p.W_out).view(batch, n_pos, d_model)


class TransformerBlock(_UsesParams):
    """One virtual layer: a pre-LN GPT-2 block computing with (shared) BlockParams.

    Hook names match TransformerLens's TransformerBlock: hook_resid_pre, ln1.*, attn.*, hook_attn_out,
    hook_resid_mid, ln2.*, mlp.*, hook_mlp_out, hook_resid_post.
    """

    # TL 4.x's cache.logit_lens asks: hook_resid_post is the one residual stream (what ln_final reads).
    hook_out_is_single_residual_stream = True

    def __init__(self, cfg: LoopedConfig, params: BlockParams, own: bool = False):
        super().__init__(params, own)
        self.cfg = cfg
        self.ln1 = LayerNorm(cfg, params.ln1)
        self.attn = Attention(cfg, params.attn)
        self.ln2 = LayerNorm(cfg, params.ln2)
        self.mlp = MLP(cfg, params.mlp)
        self.dropout = nn.Dropout(cfg.dropout)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        self.__dict__["_built_children"] = tuple(self._modules.values())  # what _fast checks is still in place

    def _fast(self) -> bool:
        """Whether :func:`block_forward` may stand in for the module calls: no hook inside the block (on any
        submodule but the two boundary hook points, nor a global one) and the direct submodules built here
        still in place (a user's replacement runs as a module; attributes inside them are not read)."""
        children = tuple(self._modules.values())
        seen = self.__dict__.get("_fast_children")
        if seen is None or seen[0] != children:  # first call, or a submodule was swapped or added
            built = self.__dict__["_built_children"]
            boundary = (self._modules.get("hook_resid_pre"), self._modules.get("hook_resid_post"))
            inside = tuple(m for m in self.modules() if m is not self and all(m is not b for b in boundary))
            seen = self.__dict__["_fast_children"] = (children, inside, children == built)
        return seen[2] and _hook_free(seen[1])

    def _boundary(self, name: str, resid: Tensor) -> Tensor:
        """hook_resid_pre / hook_resid_post around :func:`block_forward`: called (their hooks fire, e.g.
        run_with_cache of the residual stream) only when something is attached."""
        hook = self._modules[name]
        return hook(resid) if _has_hooks(hook) else resid

    def forward(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self._fast():  # no hook sees a tensor inside the block: one function, no module calls
            resid = self._boundary("hook_resid_pre", resid)
            return self._boundary("hook_resid_post", block_forward(self.params, self.cfg, resid, self.training))
        resid = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.dropout(self.attn(self.ln1(resid))))
        resid = self.hook_resid_mid(resid + attn_out)
        mlp_out = self.hook_mlp_out(self.dropout(self.mlp(self.ln2(resid))))
        return self.hook_resid_post(resid + mlp_out)


def block_forward(params: BlockParams, cfg: LoopedConfig, resid: Float[Tensor, "batch pos d_model"],
                  training: bool = False, kv_prefix: Float[Tensor, "batch prefix two head d_head"] | None = None,
                  ) -> Float[Tensor, "batch pos d_model"]:
    """:class:`TransformerBlock`'s map with no hook attached, as one function of the block's weights.

    The same operations as the module path's fast kernels (fused LayerNorm, one qkv GEMM, causal SDPA;
    dropout in the same order), without ~20 module calls per layer: on a small model Python overhead is a
    few percent of a forward (benchmarks/README.md, 16.1). tests/test_fast_path.py checks it against the
    module path.

    ``kv_prefix``: the keys and values of ``prefix`` earlier positions (a run resumed at position ``prefix``:
    ``resid`` holds positions prefix.., whose queries attend causally to those keys and their own; nothing
    at an earlier position depends on a later one). interp.patching computes only the positions a patch
    can change this way.
    """
    batch, n_pos, d_model = resid.shape
    rows = batch * n_pos
    a, m = params.attn, params.mlp
    x = F.layer_norm(resid, (d_model,), params.ln1.w, params.ln1.b, cfg.ln_eps)
    W_qkv, b_qkv = a.fused_qkv()
    qkv = torch.addmm(b_qkv, x.reshape(rows, d_model), W_qkv).view(batch, n_pos, 3, cfg.n_heads, cfg.d_head)
    p = 0 if kv_prefix is None else kv_prefix.shape[1]
    dropout = cfg.dropout if training else 0.0
    kv = torch.cat([kv_prefix, qkv[:, :, 1:]], dim=1) if p else qkv[:, :, 1:]  # [batch, key_pos, two, head, d_head]
    # query i (position p + i) sees keys 0..p + i: SDPA's causal kernel without a prefix; with one, no mask
    # for a single query (it sees every key), else an explicit mask (the masked kernel is the slowest)
    mask = torch.ones(n_pos, p + n_pos, dtype=torch.bool, device=resid.device).tril(p) if p and n_pos > 1 else None
    z = F.scaled_dot_product_attention(
        qkv[:, :, 0].transpose(1, 2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2),
        attn_mask=mask, is_causal=not p and n_pos > 1, dropout_p=dropout, scale=1.0 / cfg.attn_scale,
    )  # [batch, head, pos, d_head]
    attn_out = torch.addmm(a.b_O, z.transpose(1, 2).reshape(rows, -1), a.W_O.reshape(-1, d_model))
    attn_out = attn_out.view(batch, n_pos, d_model)
    resid = resid + (F.dropout(attn_out, dropout) if dropout else attn_out)
    x = F.layer_norm(resid, (d_model,), params.ln2.w, params.ln2.b, cfg.ln_eps)
    post = _ACTIVATIONS[cfg.act_fn](torch.addmm(m.b_in, x.reshape(rows, d_model), m.W_in))
    mlp_out = torch.addmm(m.b_out, post, m.W_out).view(batch, n_pos, d_model)
    return resid + (F.dropout(mlp_out, dropout) if dropout else mlp_out)


def init_block_params(params: BlockParams, cfg: LoopedConfig, generator: torch.Generator | None) -> None:
    """GPT-2 style init: N(0, init_std) matrices, zero biases, unit LayerNorm gains.

    With ``cfg.zero_init_out`` the attention and MLP output projections start at zero so each block is
    the identity map at init (the paper's section 6: the default init was unstable across seeds at R=5).
    """
    for name, w in params.named_parameters():
        if name.split(".")[-1].startswith("W_"):
            with torch.no_grad():
                w.normal_(0.0, cfg.init_std, generator=generator)
    if cfg.zero_init_out:
        with torch.no_grad():
            params.attn.W_O.zero_()
            params.mlp.W_out.zero_()


# ---------------------------------------------------------------------------------------------------
# Embedding, unembedding and per-iteration hooks (one each; the unembedding reads the embedding)
# ---------------------------------------------------------------------------------------------------
class Embed(nn.Module):
    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E)  # W_E[tokens], with the gather kernel


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
        embed = self.__dict__.get("_embed")
        if embed is not None and not (_has_hooks(self.hook_in) or _has_hooks(self.hook_out)):
            return F.linear(x, embed.W_E, self.b_U)  # x @ W_E^T + b_U in one GEMM
        return self.hook_out(self.hook_in(x) @ self.W_U + self.b_U)


class IterationHooks(nn.Module):
    """Per-iteration hook points that belong to no single block."""

    def __init__(self, feedback: bool = False):
        super().__init__()
        self.hook_state = HookPoint()  # [batch, pos, d_model], the state after the iteration
        if feedback:  # iterations t >= 1 of models with readout feedback only
            self.hook_feedback = HookPoint()  # [batch, pos, d_model], added to the state before iteration t
