"""The looped transformer written as plain nanoGPT-style PyTorch: the speed reference of issue 16.1.

No hooks, no TransformerLens: fused qkv ``nn.Linear``, ``F.scaled_dot_product_attention(is_causal=True)``,
``F.layer_norm``, GELU MLP, learned positions, the lm_head tied to the token embedding. The same
physical blocks run ``n_iterations`` times. :func:`from_looplens` copies a LoopedTransformer's weights
(per-head W_Q/W_K/W_V -> one c_attn matrix), so both give the same logits (asserted by
benchmarks/zero_cost_hooks.py and tests/test_fast_path.py).

Covers the plain architecture only (no prelude/coda, input injection or readout feedback): what the
speed comparison needs.
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int, eps: float):
        super().__init__()
        self.n_heads, self.eps = n_heads, eps
        self.ln_1 = nn.LayerNorm(d_model, eps=eps)
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.attn_proj = nn.Linear(d_model, d_model)
        self.ln_2 = nn.LayerNorm(d_model, eps=eps)
        self.c_fc = nn.Linear(d_model, d_mlp)
        self.mlp_proj = nn.Linear(d_mlp, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, n_pos, d_model = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d_model, dim=2)
        q, k, v = (t.view(batch, n_pos, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(z.transpose(1, 2).reshape(batch, n_pos, d_model))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class LoopedGPT(nn.Module):
    def __init__(self, d_vocab: int, n_ctx: int, d_model: int, n_heads: int, n_blocks: int, n_iterations: int,
                 d_mlp: int | None = None, eps: float = 1e-5):
        super().__init__()
        self.n_iterations = n_iterations
        self.wte = nn.Embedding(d_vocab, d_model)
        self.wpe = nn.Embedding(n_ctx, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_mlp or 4 * d_model, eps) for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(d_model, eps=eps)
        self.lm_head_bias = nn.Parameter(torch.zeros(d_vocab))

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for _ in range(self.n_iterations):
            for block in self.blocks:
                x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight, self.lm_head_bias)


@torch.no_grad()
def from_looplens(model) -> LoopedGPT:
    """A LoopedGPT computing what ``model`` (a plain LoopedTransformer) computes, with copies of its weights."""
    cfg = model.cfg
    plain = (cfg.n_prelude == cfg.n_coda == 0 and cfg.input_injection == "none" and not cfg.feedback
             and cfg.positional == "learned" and cfg.tie_embeddings and cfg.act_fn == "gelu"
             and cfg.d_head * cfg.n_heads == cfg.d_model)
    if not plain:
        raise ValueError("from_looplens: only the plain architecture (learned positions, tied embeddings, gelu, "
                         "no prelude/coda/injection/feedback, d_head * n_heads = d_model) has a reference")
    ref = LoopedGPT(cfg.d_vocab, cfg.n_ctx, cfg.d_model, cfg.n_heads, cfg.n_blocks, cfg.n_iterations, cfg.d_mlp,
                    cfg.ln_eps).to(model.W_E.device)
    ref.wte.weight.copy_(model.W_E)
    ref.wpe.weight.copy_(model.W_pos)
    ref.lm_head_bias.copy_(model.b_U)
    ref.ln_f.weight.copy_(model.ln_final.params.w)
    ref.ln_f.bias.copy_(model.ln_final.params.b)
    for block, p in zip(ref.blocks, model.core):
        a = p.attn
        block.c_attn.weight.copy_(einops.rearrange(torch.stack([a.W_Q, a.W_K, a.W_V]),
                                                   "three head d_model d_head -> (three head d_head) d_model"))
        block.c_attn.bias.copy_(torch.stack([a.b_Q, a.b_K, a.b_V]).flatten())
        block.attn_proj.weight.copy_(einops.rearrange(a.W_O, "head d_head d_model -> d_model (head d_head)"))
        block.attn_proj.bias.copy_(a.b_O)
        block.ln_1.weight.copy_(p.ln1.w)
        block.ln_1.bias.copy_(p.ln1.b)
        block.ln_2.weight.copy_(p.ln2.w)
        block.ln_2.bias.copy_(p.ln2.b)
        block.c_fc.weight.copy_(p.mlp.W_in.T)
        block.c_fc.bias.copy_(p.mlp.b_in)
        block.mlp_proj.weight.copy_(p.mlp.W_out.T)
        block.mlp_proj.bias.copy_(p.mlp.b_out)
    return ref.train(model.training)
