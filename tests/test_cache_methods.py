"""Every ActivationCache method TransformerLens documents, on a looped cache: checked numerically, or a
one-line error naming the method and why. Runs under TransformerLens 4.x and 3.9 (the tl_compat venv:
``.venv-tl39/bin/python -m pytest -q tests/test_cache_methods.py -p no:cacheprovider``)."""

from __future__ import annotations

import inspect

import pytest
import torch
from looplens.models import LoopedActivationCache, LoopedConfig, LoopedTransformer
from transformer_lens import ActivationCache

T = 3  # iterations; with a prelude and a coda block: virtual layers 0 (prelude), 1..6 (loop), 7 (coda)
TOKENS = torch.tensor([[1, 12, 15, 17], [3, 14, 16, 0]])
CHECKED = {  # method -> the test below that checks it
    "accumulated_resid": "test_accumulated_resid_and_stack_activation",
    "stack_activation": "test_accumulated_resid_and_stack_activation",
    "decompose_resid": "test_decompositions_sum_to_the_residual_stream",
    "get_full_resid_decomposition": "test_decompositions_sum_to_the_residual_stream",
    "compute_head_results": "test_head_and_neuron_results_add_up_to_the_block_outputs",
    "stack_head_results": "test_head_and_neuron_results_add_up_to_the_block_outputs",
    "get_neuron_results": "test_head_and_neuron_results_add_up_to_the_block_outputs",
    "stack_neuron_results": "test_head_and_neuron_results_add_up_to_the_block_outputs",
    "apply_ln_to_stack": "test_final_layer_norm_logit_attrs_and_logit_lens",
    "logit_attrs": "test_final_layer_norm_logit_attrs_and_logit_lens",
    "logit_lens": "test_final_layer_norm_logit_attrs_and_logit_lens",  # TL 4.x only
    "apply_slice_to_batch_dim": "test_batch_device_and_mapping_methods",
    "remove_batch_dim": "test_batch_device_and_mapping_methods",
    "to": "test_batch_device_and_mapping_methods",
    "toggle_autodiff": "test_batch_device_and_mapping_methods",
    "keys": "test_batch_device_and_mapping_methods",
    "values": "test_batch_device_and_mapping_methods",
    "items": "test_batch_device_and_mapping_methods",
    "ssm_layers": "test_unsupported_methods_say_which_and_why",  # TL 4.x only
    "compute_ssm_state": "test_unsupported_methods_say_which_and_why",  # TL 4.x only
    "compute_ssm_effective_attention": "test_unsupported_methods_say_which_and_why",  # TL 4.x only
}


def model_of(**kw) -> LoopedTransformer:
    cfg = dict(d_vocab=23, n_ctx=5, d_model=16, n_heads=2, n_blocks=2, n_iterations=2, n_prelude=1, n_coda=1, seed=0)
    model = LoopedTransformer(LoopedConfig(**{**cfg, **kw}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random biases (b_O, b_out: the accumulated bias) and LN affines
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def run():
    model = model_of()
    logits, cache = model.run_with_cache(TOKENS, n_iterations=T)
    return model, logits, cache


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_every_documented_method_is_checked_here():
    public = {name for name, value in inspect.getmembers(ActivationCache) if not name.startswith("_") and callable(value)}
    assert public - set(CHECKED) == set(), "a TransformerLens ActivationCache method with no check here"


def test_accumulated_resid_and_stack_activation(run):
    model, _, cache = run
    n_layers = model.cfg.n_virtual_layers(T)
    assert cache.model.cfg.n_layers == n_layers == 8
    acc, labels = cache.accumulated_resid(return_labels=True)
    assert acc.shape == (n_layers + 1, 2, 4, 16) and labels[-1] == "final_post"
    close(acc[0], cache["blocks.0.hook_resid_pre"])
    close(acc[-1], cache[f"blocks.{n_layers - 1}.hook_resid_post"])
    mid = cache.accumulated_resid(layer=4, incl_mid=True)  # up to (not into) layer 4
    close(mid[-1], cache["blocks.4.hook_resid_pre"])
    close(mid[-2], cache["loop.1.blocks.0.hook_resid_mid"])  # virtual layer 3 = iteration 1, block 0
    stacked = cache.stack_activation("resid_post")
    assert stacked.shape == (n_layers, 2, 4, 16)
    for v in range(n_layers):
        torch.testing.assert_close(stacked[v], cache[f"blocks.{v}.hook_resid_post"])


def test_decompositions_sum_to_the_residual_stream(run):
    model, _, cache = run
    final = cache["blocks.7.hook_resid_post"]  # what ln_final reads
    close(cache.decompose_resid().sum(0), final)
    full, labels = cache.get_full_resid_decomposition(return_labels=True)
    assert labels[-1] == "bias" and labels[-3:-1] == ["embed", "pos_embed"]
    assert full.shape[0] == 8 * 2 + 8 * model.cfg.d_mlp + 3  # heads, neurons, embed, pos_embed, bias
    close(full.sum(0), final)
    close(cache.get_full_resid_decomposition(expand_neurons=False).sum(0), final)
    for layer in (1, 4, 7):  # into the loop's first block, mid-loop, into the coda
        close(cache.get_full_resid_decomposition(layer).sum(0), cache[f"blocks.{layer}.hook_resid_pre"])
        close(cache.get_full_resid_decomposition(layer, mlp_input=True).sum(0), cache[f"blocks.{layer}.hook_resid_mid"])
    # the accumulated bias reads the weights each virtual layer ran with: prelude, core (x T), coda
    expected = model.prelude[0].attn.b_O + model.prelude[0].mlp.b_out + model.coda[0].attn.b_O
    for layer in range(1, 7):
        params = model.core[(layer - 1) % 2]
        expected = expected + params.attn.b_O + params.mlp.b_out
    close(cache.model.accumulated_bias(7, mlp_input=True), expected)


def test_head_and_neuron_results_add_up_to_the_block_outputs(run):
    model, _, cache = run
    cache = LoopedActivationCache(dict(cache.cache_dict), cache.model)  # compute_head_results writes into it
    cache.compute_head_results()
    for v, params in [(0, model.prelude[0]), (3, model.core[0]), (6, model.core[1]), (7, model.coda[0])]:
        close(cache[f"blocks.{v}.attn.hook_result"].sum(-2) + params.attn.b_O, cache[f"blocks.{v}.hook_attn_out"])
        close(cache.get_neuron_results(v).sum(-2) + params.mlp.b_out, cache[f"blocks.{v}.hook_mlp_out"])
    heads, labels = cache.stack_head_results(return_labels=True, incl_remainder=True)
    assert labels[0] == "L0H0" and labels[-1] == "remainder" and heads.shape[0] == 8 * 2 + 1
    close(heads.sum(0), cache["blocks.7.hook_resid_post"])
    heads_only = cache.stack_head_results(layer=5)
    close(heads_only[2 * 3 + 1], cache["blocks.3.attn.hook_result"][:, :, 1])
    neurons = cache.stack_neuron_results(5, incl_remainder=True)
    assert neurons.shape[0] == 5 * model.cfg.d_mlp + 1
    close(neurons.sum(0), cache["blocks.5.hook_resid_pre"])


def test_final_layer_norm_logit_attrs_and_logit_lens():
    model = model_of()
    with torch.no_grad():  # TL folds ln_final's affine into W_U; give it the identity affine here
        model.ln_final.w.fill_(1.0)
        model.ln_final.b.zero_()
    logits, cache = model.run_with_cache(TOKENS, n_iterations=T)
    acc = cache.accumulated_resid()
    close(cache.apply_ln_to_stack(acc[-1:])[0], cache["ln_final.hook_normalized"])
    answer = torch.tensor([4, 5])
    attrs = cache.logit_attrs(acc[-1:, :, -1], tokens=answer, pos_slice=-1)  # at the last position
    close(attrs[0], (logits - model.b_U)[torch.arange(2), -1, answer])
    if hasattr(ActivationCache, "logit_lens"):  # TransformerLens 4.x
        lens = cache.logit_lens()  # at the last position by default
        assert lens.values.shape == (model.cfg.n_virtual_layers(T) + 1, 2, 23)
        close(lens.values[-1], logits[:, -1])  # the last entry is the model's own output
        close(lens.values[3], model.unembed(model.ln_final(cache["blocks.2.hook_resid_post"]))[:, -1])
    else:  # TransformerLens 3.9 has no cache.logit_lens; interp.logit_lens covers looped models
        assert not hasattr(cache, "logit_lens")


def test_batch_device_and_mapping_methods(run):
    model, _, cache = run
    first = cache.apply_slice_to_batch_dim(slice(0, 1))
    assert isinstance(first, LoopedActivationCache) and first.has_batch_dim
    torch.testing.assert_close(first["loop.2.blocks.1.hook_resid_post"], cache["blocks.6.hook_resid_post"][:1])
    one = cache.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim
    torch.testing.assert_close(one["loop.0.hook_state"], cache["loop.0.hook_state"][1])
    _, single = model.run_with_cache(TOKENS[:1], n_iterations=T)
    single.remove_batch_dim()
    assert not single.has_batch_dim and single["loop.1.blocks.0.hook_resid_pre"].shape == (4, 16)
    assert cache.to("cpu") is cache and cache["loop.1.hook_state"].device.type == "cpu"
    was = torch.is_grad_enabled()
    try:
        cache.toggle_autodiff(False)
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(was)
    assert list(cache.keys()) == list(cache.cache_dict) and len(cache) == len(cache.cache_dict)
    assert all(v is cache.cache_dict[k] for k, v in cache.items())
    assert len(list(cache.values())) == len(cache) and list(cache) == list(cache.keys())
    assert "loop.1.blocks.0.hook_resid_pre" in cache and "blocks.3.hook_resid_pre" in cache
    torch.testing.assert_close(cache["resid_post", -1], cache["blocks.7.hook_resid_post"])
    torch.testing.assert_close(cache[("attn_out", 2)], cache["loop.0.blocks.1.hook_attn_out"])
    torch.testing.assert_close(cache["scale", 3, "ln1"], cache["blocks.3.ln1.hook_scale"])


@pytest.mark.parametrize("option", [dict(input_injection="add"), dict(input_injection="concat"), dict(feedback=0.5)])
def test_unsupported_methods_say_which_and_why(run, option):
    _, cache = model_of(**option).run_with_cache(TOKENS, n_iterations=T)
    for method in ("decompose_resid", "get_full_resid_decomposition"):
        with pytest.raises(NotImplementedError, match=f"^{method}: this model") as err:
            getattr(cache, method)()
        assert "\n" not in str(err.value)
    assert cache.stack_head_results(incl_remainder=True).sum(0).shape == (2, 4, 16)  # still exact
    _, _, looped = run
    for method in ("compute_ssm_state", "compute_ssm_effective_attention"):
        with pytest.raises(NotImplementedError, match=f"^{method}: a looped transformer has attention blocks"):
            getattr(looped, method)()
    if hasattr(ActivationCache, "ssm_layers"):  # TransformerLens 4.x
        assert looped.ssm_layers() == []
