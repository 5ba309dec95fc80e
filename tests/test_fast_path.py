"""Zero-cost hooks (issue 16.1): with no hook attached the model takes its fast kernels (fused LayerNorm,
SDPA) and computes what plain PyTorch computes; with hooks attached it takes the explicit path, whose
hooks fire, and both paths give the same numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from looplens.models import LoopedConfig, LoopedTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from nanogpt_reference import from_looplens  # noqa: E402

CFG = dict(d_vocab=40, n_ctx=3, d_model=32, n_heads=4, n_blocks=2, n_iterations=3, seed=0)


def _model(**changes) -> LoopedTransformer:
    model = LoopedTransformer(LoopedConfig(**{**CFG, **changes}))
    with torch.no_grad():  # non-trivial LayerNorm affines and biases, so a dropped term shows
        for name, p in model.named_parameters():
            if name.endswith((".w", ".b")) or ".b_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _tokens(batch: int = 16) -> torch.Tensor:
    return torch.randint(1, CFG["d_vocab"], (batch, CFG["n_ctx"]), generator=torch.Generator().manual_seed(1))


def test_the_plain_pytorch_reference_computes_the_same_logits_and_gradients():
    model = _model()
    ref = from_looplens(model)
    tokens, targets = _tokens(), torch.arange(16) % CFG["d_vocab"]
    torch.testing.assert_close(model(tokens), ref(tokens), atol=1e-5, rtol=1e-5)
    model(tokens, return_type="loss", targets=targets).backward()
    F.cross_entropy(ref(tokens)[:, -1], targets).backward()
    torch.testing.assert_close(model.W_E.grad, ref.wte.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.core[0].mlp.W_in.grad, ref.blocks[0].c_fc.weight.grad.T, atol=1e-5, rtol=1e-4)


def test_from_looplens_refuses_architectures_it_does_not_cover():
    with pytest.raises(ValueError, match="plain architecture"):
        from_looplens(_model(feedback=1.0))


@pytest.mark.parametrize("changes", [{}, {"feedback": 1.0, "n_prelude": 1, "n_coda": 1}])
@pytest.mark.parametrize("train", [False, True])
def test_fast_path_equals_the_hooked_path(changes, train):
    model = _model(**changes).train(train)
    tokens = _tokens()
    fast = model(tokens)
    fired: dict[str, int] = {}

    def count(x, hook):
        fired[hook.name] = fired.get(hook.name, 0) + 1

    every = [(lambda name: True, count)]  # every hook point: forces the explicit (unfused) kernels
    hooked = model.run_with_hooks(tokens, fwd_hooks=every)
    torch.testing.assert_close(fast, hooked, atol=1e-5, rtol=1e-5)
    cached, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(fast, cached, atol=1e-5, rtol=1e-5)
    layers = model.cfg.n_layers
    for hook in ("ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "attn.hook_attn_scores",
                 "attn.hook_pattern", "attn.hook_z", "hook_resid_post"):
        names = [f"blocks.{v}.{hook}" for v in range(layers)]
        assert all(fired.get(n) == 1 for n in names), hook
        assert all(n in cache for n in names), hook
    assert fired.get("ln_final.hook_scale") == 1 and fired.get("ln_final.hook_normalized") == 1


def test_one_hook_on_a_layernorm_scale_fires_and_can_edit():
    model = _model()
    tokens = _tokens()
    seen = []

    def double_scale(scale, hook):
        seen.append(hook.name)
        return scale * 2

    out = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.ln2.hook_scale", double_scale)])
    assert seen == ["blocks.1.ln2.hook_scale"]
    assert not torch.allclose(out, model(tokens))  # the edit took effect: the unfused path ran there


def test_no_hooks_stay_attached_after_a_hooked_run():
    model = _model()
    model.run_with_cache(_tokens())
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def test_with_no_hooks_the_fused_kernels_run():
    from unittest import mock

    model = _model()
    tokens = _tokens()
    layers = model.cfg.n_layers
    with mock.patch.object(F, "layer_norm", wraps=F.layer_norm) as ln, \
            mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa:
        model(tokens)
        assert ln.call_count == 2 * layers + 1 and sdpa.call_count == layers  # ln1, ln2 per layer; ln_final
        assert all(call.kwargs.get("is_causal") and call.kwargs.get("attn_mask") is None for call in sdpa.call_args_list)
        ln.reset_mock(), sdpa.reset_mock()
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.ln1.hook_scale", lambda x, hook: None),
                                                ("blocks.1.attn.hook_pattern", lambda x, hook: None)])
        assert ln.call_count == 2 * layers and sdpa.call_count == layers - 1  # only the hooked ones unfused
