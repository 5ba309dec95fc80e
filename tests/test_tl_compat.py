"""Numerical equivalence with TransformerLens 3.9's HookedTransformer (the trusted reference).

These tests need HookedTransformer, which TransformerLens 4.x removed. In a 4.x environment they skip
and say why; scripts/test.sh runs them in a second environment with transformer-lens 3.9 (.venv-tl39,
`pytest -m tl_compat`) with LOOPLENS_REQUIRE_HOOKED_TRANSFORMER=1, where a missing HookedTransformer is
an error, so a broken 3.9 environment cannot pass as a skip.
"""

from __future__ import annotations

import os

import pytest
import torch
from looplens.models import LoopedConfig, LoopedTransformer

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # TransformerLens >= 4
    if os.environ.get("LOOPLENS_REQUIRE_HOOKED_TRANSFORMER") == "1":
        raise
    HookedTransformer = HookedTransformerConfig = None

pytestmark = [
    pytest.mark.tl_compat,
    pytest.mark.skipif(
        HookedTransformer is None,
        reason="needs TransformerLens 3.9's HookedTransformer (removed in 4.x); scripts/test.sh runs these in .venv-tl39",
    ),
]


def _hooked_transformer(model: LoopedTransformer, n_layers: int):
    cfg = model.cfg
    ht = HookedTransformer(
        HookedTransformerConfig(
            n_layers=n_layers, d_model=cfg.d_model, n_ctx=cfg.n_ctx, d_head=cfg.d_head, n_heads=cfg.n_heads,
            d_mlp=cfg.d_mlp, d_vocab=cfg.d_vocab, act_fn=cfg.act_fn, normalization_type="LN",
            positional_embedding_type="standard", eps=cfg.ln_eps, seed=0, default_prepend_bos=False,
        )
    )
    state = dict(ht.state_dict())
    ours = model.state_dict()
    state["embed.W_E"] = ours["embed.W_E"]
    state["pos_embed.W_pos"] = ours["pos_embed.W_pos"]
    state["unembed.W_U"] = model.W_U.detach().clone()
    state["unembed.b_U"] = ours["unembed.b_U"]
    state["ln_final.w"] = ours["ln_final.params.w"]
    state["ln_final.b"] = ours["ln_final.params.b"]
    for layer in range(n_layers):
        l = layer % cfg.n_blocks  # the physical block that virtual layer runs
        for key, value in ours.items():
            if key.startswith(f"core.{l}."):
                state[f"blocks.{layer}.{key[len(f'core.{l}.'):]}"] = value
    ht.load_state_dict(state, strict=True)
    return ht.eval()


def _model(n_blocks: int, n_iterations: int) -> LoopedTransformer:
    cfg = LoopedConfig(d_vocab=31, n_ctx=6, d_model=24, n_heads=3, n_blocks=n_blocks, n_iterations=n_iterations, seed=0)
    model = LoopedTransformer(cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


TOKENS = torch.tensor([[1, 7, 9, 20, 3], [4, 4, 30, 2, 11]])


def test_one_iteration_equals_hooked_transformer():
    model = _model(n_blocks=3, n_iterations=1)
    ht = _hooked_transformer(model, n_layers=3)
    ours_logits, ours = model.run_with_cache(TOKENS)
    ref_logits, ref = ht.run_with_cache(TOKENS)
    torch.testing.assert_close(ours_logits, ref_logits, atol=1e-5, rtol=1e-5)
    # the same hook names fire (ours adds the per-iteration loop.{t}.hook_state)
    ours_names = [k for k in ours.keys() if not k.startswith("loop.")]
    assert ours_names == list(ref.keys())
    for name in ours_names:
        torch.testing.assert_close(ours[name], ref[name], atol=1e-5, rtol=1e-5, msg=name)


def test_looped_equals_hooked_transformer_with_tied_layers():
    model = _model(n_blocks=2, n_iterations=3)
    ht = _hooked_transformer(model, n_layers=6)
    ours_logits, ours = model.run_with_cache(TOKENS)
    ref_logits, ref = ht.run_with_cache(TOKENS)
    torch.testing.assert_close(ours_logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name in ref.keys():
        torch.testing.assert_close(ours[name], ref[name], atol=1e-5, rtol=1e-5, msg=name)
    # TransformerLens's own cache helpers agree across the two
    torch.testing.assert_close(ours.accumulated_resid(apply_ln=True), ref.accumulated_resid(apply_ln=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.decompose_resid(), ref.decompose_resid(), atol=1e-5, rtol=1e-5)


def test_tl_patching_agrees_between_models():
    from transformer_lens import patching

    model = _model(n_blocks=2, n_iterations=2)
    ht = _hooked_transformer(model, n_layers=4)
    corrupt = torch.tensor([[2, 7, 9, 20, 3], [5, 4, 30, 2, 11]])

    def metric(logits):
        return logits[:, -1, 3].mean()

    _, ours_cache = model.run_with_cache(TOKENS)
    _, ref_cache = ht.run_with_cache(TOKENS)
    ours = patching.get_act_patch_resid_pre(model, corrupt, ours_cache, metric)
    ref = patching.get_act_patch_resid_pre(ht, corrupt, ref_cache, metric)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
