"""The looped model: hook names, invariants, TransformerLens machinery, halting, checkpoints, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from looplens.models import (
    EntropyHalting,
    KLEntropyHalting,
    KLHalting,
    LatentChangeHalting,
    LoopedConfig,
    LoopedTransformer,
    make_halting_rule,
)
from transformer_lens import patching


def tiny_cfg(**kw) -> LoopedConfig:
    base = dict(d_vocab=23, n_ctx=5, d_model=16, n_heads=2, n_blocks=2, n_iterations=3, seed=0)
    base.update(kw)
    return LoopedConfig(**base)


def randomise(model: LoopedTransformer, seed: int = 1) -> LoopedTransformer:
    """Give every parameter (biases, LN gains too) random values so no test passes by symmetry."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] == model.cfg.d_model else 0.0))
    return model.eval()


TOKENS = torch.tensor([[1, 12, 15, 17], [3, 14, 16, 0], [5, 13, 0, 0]])


# ---------------------------------------------------------------------------------------------------
# A reference written independently: plain tensor maths, weights unrolled by hand
# ---------------------------------------------------------------------------------------------------
def ref_block(x, p, cfg):
    def ln(x, w, b):
        x = x - x.mean(-1, keepdim=True)
        return x / (x.pow(2).mean(-1, keepdim=True) + cfg.ln_eps).sqrt() * w + b

    h = ln(x, p["ln1.w"], p["ln1.b"])
    q = torch.einsum("bpd,hde->bphe", h, p["attn.W_Q"]) + p["attn.b_Q"]
    k = torch.einsum("bpd,hde->bphe", h, p["attn.W_K"]) + p["attn.b_K"]
    v = torch.einsum("bpd,hde->bphe", h, p["attn.W_V"]) + p["attn.b_V"]
    s = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(cfg.d_head)
    n = x.shape[1]
    s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
    z = torch.einsum("bhqk,bkhe->bqhe", s.softmax(-1), v)
    x = x + torch.einsum("bqhe,hed->bqd", z, p["attn.W_O"]) + p["attn.b_O"]
    h = ln(x, p["ln2.w"], p["ln2.b"])
    post = F.gelu(h @ p["mlp.W_in"] + p["mlp.b_in"])
    return x + post @ p["mlp.W_out"] + p["mlp.b_out"], ln


def ref_forward(model, tokens, T, params_per_iteration=None):
    cfg = model.cfg
    sd = dict(model.state_dict())
    x = sd["embed.W_E"][tokens] + sd["pos_embed.W_pos"][: tokens.shape[1]]
    for t in range(T):
        for l in range(cfg.n_blocks):
            if params_per_iteration is not None:
                p = params_per_iteration[t][l]
            else:
                p = {k[len(f"core.{l}."):]: v for k, v in sd.items() if k.startswith(f"core.{l}.")}
            x, ln = ref_block(x, p, cfg)
    x = ln(x, sd["ln_final.params.w"], sd["ln_final.params.b"])
    return x @ sd["embed.W_E"].T + sd["unembed.b_U"]


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------
def test_config_round_trip_and_validation():
    cfg = tiny_cfg(input_injection="concat", n_prelude=1, n_coda=1, positional="none")
    assert LoopedConfig.from_json(cfg.to_json()) == cfg
    assert cfg.n_layers == 1 + 3 * 2 + 1
    with pytest.raises(ValueError, match="n_heads"):
        tiny_cfg(n_heads=3)
    with pytest.raises(ValueError, match="act_fn"):
        tiny_cfg(act_fn="tanh")
    with pytest.raises(ValueError, match="n_iterations"):
        tiny_cfg(n_iterations=0)
    with pytest.raises(ValueError, match="unknown key"):
        LoopedConfig.from_dict({**cfg.to_dict(), "n_layer": 3})


# ---------------------------------------------------------------------------------------------------
# Hook names: a public API
# ---------------------------------------------------------------------------------------------------
BLOCK_HOOKS = [
    "hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
    "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
    "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
]


def test_cache_hook_names_pinned():
    model = randomise(LoopedTransformer(tiny_cfg(n_iterations=2)))
    _, cache = model.run_with_cache(TOKENS)
    expected = ["hook_embed", "hook_pos_embed"]
    for t in range(2):
        for l in range(2):
            expected += [f"blocks.{2 * t + l}.{h}" for h in BLOCK_HOOKS]
        expected.append(f"loop.{t}.hook_state")
    expected += ["ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out"]
    assert list(cache.keys()) == expected


def test_iterations_give_distinct_cache_entries_and_aliases():
    model = randomise(LoopedTransformer(tiny_cfg(n_iterations=3)))
    _, cache = model.run_with_cache(TOKENS, n_iterations=6)
    assert cache.model.cfg.n_layers == 12
    posts = [cache[f"loop.{t}.blocks.1.hook_resid_post"] for t in range(6)]
    for t in range(6):
        assert torch.equal(posts[t], cache[f"blocks.{2 * t + 1}.hook_resid_post"])
        assert torch.equal(posts[t], cache[f"loop.{t}.hook_state"])
    for a in range(6):
        for b in range(a + 1, 6):
            assert not torch.allclose(posts[a], posts[b])
    # alias and virtual name are the same hook point object
    assert model.mod_dict["loop.4.blocks.0.attn.hook_pattern"] is model.mod_dict["blocks.8.attn.hook_pattern"]
    assert "loop.4.blocks.0.attn.hook_pattern" not in model.hook_dict  # cached once, under its real name
    assert model.canonical_name("loop.4.blocks.0.hook_resid_pre") == "blocks.8.hook_resid_pre"
    assert model.alias_name("blocks.9.mlp.hook_post") == "loop.4.blocks.1.mlp.hook_post"
    assert model.iteration_block(9, n_iterations=6) == ("loop", 4, 1)


def test_alias_hook_fires_and_on_demand_iterations():
    model = randomise(LoopedTransformer(tiny_cfg(n_iterations=2)))
    seen = {}

    def grab(x, hook):
        seen[hook.name] = x.clone()

    # iteration 9 does not exist yet: the name is created on demand
    model.run_with_hooks(TOKENS, n_iterations=10, fwd_hooks=[("loop.9.blocks.1.hook_resid_post", grab)])
    assert list(seen) == ["blocks.19.hook_resid_post"]
    with model.hooks(fwd_hooks=[("loop.11.hook_state", grab)]):
        model(TOKENS, n_iterations=12)
    assert "loop.11.hook_state" in seen
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())  # all removed


# ---------------------------------------------------------------------------------------------------
# Invariants the maths guarantees
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 3, 7])
def test_looped_equals_hand_unrolled_tied_blocks(T):
    model = randomise(LoopedTransformer(tiny_cfg()))
    torch.testing.assert_close(model(TOKENS, n_iterations=T), ref_forward(model, TOKENS, T), atol=1e-5, rtol=1e-5)


def test_sdpa_path_equals_explicit_pattern_path():
    model = randomise(LoopedTransformer(tiny_cfg()))
    fast = model(TOKENS, n_iterations=4)
    with model.hooks(fwd_hooks=[(lambda name: name.endswith("hook_pattern"), lambda x, hook: x)]):
        slow = model(TOKENS, n_iterations=4)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_shared_weights_accumulate_gradients_over_iterations():
    model = randomise(LoopedTransformer(tiny_cfg()))
    n_params = len(list(model.parameters()))
    model(TOKENS, n_iterations=9)
    assert len(list(model.parameters())) == n_params  # iterations add hooks, never weights
    T = 3
    targets = torch.tensor([4, 5, 6])
    loss = model(TOKENS, n_iterations=T, return_type="loss", targets=targets)
    loss.backward()
    # untied reference: an independent leaf copy of the core weights per iteration
    sd = model.state_dict()
    copies = [[{k[len(f"core.{l}."):]: v.clone().requires_grad_(True) for k, v in sd.items() if k.startswith(f"core.{l}.")}
               for l in range(2)] for _ in range(T)]
    logits = ref_forward(model, TOKENS, T, params_per_iteration=copies)
    pos = model.readout_positions(TOKENS)
    F.cross_entropy(logits[torch.arange(3), pos], targets).backward()
    for l in range(2):
        for name in ("attn.W_Q", "mlp.W_out", "ln2.w"):
            summed = sum(copies[t][l][name].grad for t in range(T))
            got = model.get_parameter(f"core.{l}.{name}").grad
            torch.testing.assert_close(got, summed, atol=1e-5, rtol=1e-4)
            assert not torch.allclose(copies[0][l][name].grad, summed)  # several iterations contributed


def test_padding_never_changes_the_answer():
    model = randomise(LoopedTransformer(tiny_cfg()))
    short = torch.tensor([[3, 14, 16]])
    padded = torch.tensor([[3, 14, 16, 0, 0]])
    torch.testing.assert_close(model.predict(short), model.predict(padded), atol=1e-6, rtol=1e-6)


def test_zero_init_out_makes_blocks_identity():
    model = LoopedTransformer(tiny_cfg(zero_init_out=True, positional="none")).eval()
    _, cache = model.run_with_cache(TOKENS, n_iterations=3)
    torch.testing.assert_close(cache["blocks.5.hook_resid_post"], cache["hook_embed"])


def test_variants_prelude_coda_injection_run_and_name_correctly():
    for injection in ("add", "concat"):
        cfg = tiny_cfg(n_prelude=1, n_coda=1, input_injection=injection, positional="none")
        model = randomise(LoopedTransformer(cfg))
        for T in (1, 4):
            _, cache = model.run_with_cache(TOKENS, n_iterations=T)
            assert cache.model.cfg.n_layers == 1 + 2 * T + 1
            assert f"blocks.{1 + 2 * T}.hook_resid_post" in cache.keys()  # the coda
            assert f"blocks.{2 + 2 * T}.hook_resid_post" not in cache.keys()
        # the coda uses its own weights, whatever its virtual index
        _, cache = model.run_with_cache(TOKENS, n_iterations=2)
        assert cache.model.blocks[5].attn.W_Q is model.coda[0].attn.W_Q
        assert cache.model.blocks[1].attn.W_Q is model.core[0].attn.W_Q
        assert cache.model.blocks[0].attn.W_Q is model.prelude[0].attn.W_Q


def test_input_injection_changes_later_iterations_only():
    base = randomise(LoopedTransformer(tiny_cfg(input_injection="none")))
    inj = LoopedTransformer(tiny_cfg(input_injection="add")).eval()
    inj.load_state_dict(base.state_dict())
    torch.testing.assert_close(base(TOKENS, n_iterations=1), inj(TOKENS, n_iterations=1))
    assert not torch.allclose(base(TOKENS, n_iterations=2), inj(TOKENS, n_iterations=2))


def test_truncated_backprop_stops_gradients():
    model = randomise(LoopedTransformer(tiny_cfg()))
    loss = model(TOKENS, n_iterations=3, return_type="loss", targets=torch.tensor([1, 2, 3]), backprop_last=1)
    loss.backward()
    assert model.pos_embed.W_pos.grad is None or float(model.pos_embed.W_pos.grad.abs().sum()) == 0.0
    assert float(model.core[0].attn.W_Q.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------------
# TransformerLens machinery on the looped model
# ---------------------------------------------------------------------------------------------------
def test_activation_cache_helpers():
    model = randomise(LoopedTransformer(tiny_cfg()))
    logits, cache = model.run_with_cache(TOKENS, n_iterations=4)
    acc = cache.accumulated_resid()
    assert acc.shape[0] == 4 * 2 + 1
    torch.testing.assert_close(acc[-1], cache["blocks.7.hook_resid_post"])
    parts = cache.decompose_resid()
    torch.testing.assert_close(parts.sum(0), cache["blocks.7.hook_resid_post"], atol=1e-5, rtol=1e-5)
    final = cache.apply_ln_to_stack(acc[-1:])  # centre and scale only, as TransformerLens defines it
    expected = cache["ln_final.hook_normalized"]
    torch.testing.assert_close(final[0], expected, atol=1e-4, rtol=1e-4)
    stacked = cache.stack_activation("resid_post")
    assert stacked.shape == (8, 3, 4, 16)
    # logit attribution of the final residual is the logit minus b_U (TL assumes the final LN's
    # affine is folded into W_U, so give it unit gain and zero bias here)
    with torch.no_grad():
        model.ln_final.w.fill_(1.0)
        model.ln_final.b.zero_()
    logits, cache = model.run_with_cache(TOKENS, n_iterations=4)
    acc = cache.accumulated_resid()
    answer = torch.tensor([4, 5, 6])
    # at the last position (TL 3.9 needs the stack position-sliced to broadcast against [batch] tokens);
    # logit_attrs applies the final LN scale itself
    attrs = cache.logit_attrs(acc[-1:, :, -1], tokens=answer, pos_slice=-1)
    expected = (logits - model.b_U)[torch.arange(3), -1, answer]
    torch.testing.assert_close(attrs[0], expected, atol=1e-4, rtol=1e-4)


def test_tl_patching_matches_manual_patch():
    model = randomise(LoopedTransformer(tiny_cfg()))
    clean = torch.tensor([[1, 12, 15, 17], [3, 14, 16, 18]])
    corrupt = torch.tensor([[2, 12, 15, 17], [4, 14, 16, 18]])
    answer = torch.tensor([7, 8])

    def metric(logits):
        return logits[torch.arange(2), -1, answer].mean()

    T = 3
    _, clean_cache = model.run_with_cache(clean, n_iterations=T)
    with model.iterations(T):
        tl = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
    assert tl.shape == (T * 2, 4)
    for layer, pos in [(0, 0), (3, 1), (5, 0)]:
        name = f"blocks.{layer}.hook_resid_pre"

        def patch(x, hook, pos=pos, name=name):
            x = x.clone()
            x[:, pos] = clean_cache[name][:, pos]
            return x

        manual = metric(model.run_with_hooks(corrupt, n_iterations=T, fwd_hooks=[(name, patch)]))
        torch.testing.assert_close(tl[layer, pos], manual, atol=1e-5, rtol=1e-5)
    # patching the first layer at every position restores the clean run exactly
    clean_metric = metric(model(clean, n_iterations=T))
    full = model.run_with_hooks(corrupt, n_iterations=T,
                                fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: clean_cache["blocks.0.hook_resid_pre"])])
    torch.testing.assert_close(metric(full), clean_metric)
    with model.iterations(T):
        heads = patching.get_act_patch_attn_head_out_by_pos(model, corrupt, clean_cache, metric)
    assert heads.shape == (T * 2, 4, 2)
    assert model.cfg.n_iterations == 3  # restored


def test_iterations_context_restores_on_error():
    model = LoopedTransformer(tiny_cfg())
    with pytest.raises(RuntimeError):
        with model.iterations(9):
            assert model.cfg.n_layers == 18
            raise RuntimeError("boom")
    assert model.cfg.n_iterations == 3 and model.cfg.n_layers == 6


# ---------------------------------------------------------------------------------------------------
# Halting
# ---------------------------------------------------------------------------------------------------
def _lp(*rows):
    return torch.tensor(rows, dtype=torch.float).log()


def test_halting_rules_on_constructed_distributions():
    sharp = _lp([0.97, 0.01, 0.01, 0.01])
    sharp2 = _lp([0.96, 0.02, 0.01, 0.01])
    flat = _lp([0.25, 0.25, 0.25, 0.25])
    other = _lp([0.01, 0.97, 0.01, 0.01])
    kw = dict(state=None, prev_state=None)
    kl = KLHalting(eps=0.01)
    assert bool(kl(iteration=2, logprobs=flat, prev_logprobs=flat, **kw))  # stable, but flat
    assert not bool(kl(iteration=2, logprobs=sharp, prev_logprobs=other, **kw))
    assert not bool(kl(iteration=1, logprobs=sharp, prev_logprobs=sharp, **kw))  # never before t=2
    paper = KLEntropyHalting(eps=0.01, entropy=1.0)
    assert not bool(paper(iteration=2, logprobs=flat, prev_logprobs=flat, **kw))  # entropy log(4) > 1
    assert bool(paper(iteration=2, logprobs=sharp, prev_logprobs=sharp2, **kw))
    assert bool(EntropyHalting(entropy=1.0)(iteration=3, logprobs=sharp, prev_logprobs=flat, **kw))
    lat = LatentChangeHalting(tol=0.1)
    s = torch.tensor([[1.0, 0.0]])
    assert bool(lat(iteration=2, logprobs=sharp, prev_logprobs=sharp, state=s * 1.05, prev_state=s))
    assert not bool(lat(iteration=2, logprobs=sharp, prev_logprobs=sharp, state=s * 1.5, prev_state=s))
    with pytest.raises(ValueError, match="halting rule"):
        make_halting_rule("never")


class ScriptedRule:
    """Halts sample i exactly at iteration stop_at[i]: checks forward_adaptive's bookkeeping."""

    def __init__(self, stop_at):
        self.stop_at = torch.tensor(stop_at)
        self.calls = []

    def __call__(self, *, iteration, logprobs, prev_logprobs, state, prev_state):
        self.calls.append(iteration)
        return self.stop_at == iteration


def test_forward_adaptive_stops_each_sample_where_told_and_freezes_it():
    model = randomise(LoopedTransformer(tiny_cfg()))
    rule = ScriptedRule([2, 5, 99])
    out = model.forward_adaptive(TOKENS, rule, max_iterations=6)
    assert out.iterations.tolist() == [2, 5, 6]
    assert out.halted.tolist() == [True, True, False]
    assert rule.calls == [2, 3, 4, 5, 6]
    for i, T in enumerate([2, 5, 6]):
        torch.testing.assert_close(out.logits[i], model.predict(TOKENS[i : i + 1], n_iterations=T)[0], atol=1e-5, rtol=1e-5)
    # all halted early -> loop stops early
    rule = ScriptedRule([2, 2, 2])
    out = model.forward_adaptive(TOKENS, rule, max_iterations=30)
    assert rule.calls == [2] and out.iterations.tolist() == [2, 2, 2]


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = randomise(LoopedTransformer(tiny_cfg(n_prelude=1, input_injection="concat")))
    model.save(tmp_path / "ckpt", step=12, seed=3, dataset_checksum="abc")
    loaded = LoopedTransformer.load(tmp_path / "ckpt", dataset_checksum="abc")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert torch.equal(model(TOKENS, n_iterations=4), loaded(TOKENS, n_iterations=4))
    meta = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    assert meta["step"] == 12 and meta["provenance"]["looplens_version"]
    with pytest.raises(ValueError, match="dataset_checksum"):
        LoopedTransformer.load(tmp_path / "ckpt", dataset_checksum="other")


def test_corrupted_or_mismatched_checkpoint_errors(tmp_path):
    model = randomise(LoopedTransformer(tiny_cfg()))
    model.save(tmp_path / "a")
    weights = tmp_path / "a" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        LoopedTransformer.load(tmp_path / "a")
    model.save(tmp_path / "b")
    sidecar = tmp_path / "b" / "model.json"
    meta = json.loads(sidecar.read_text())
    meta["config"]["d_mlp"] = 32
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape"):
        LoopedTransformer.load(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="not a looplens checkpoint"):
        LoopedTransformer.load(tmp_path / "nowhere")
    assert not list(tmp_path.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors():
    model = LoopedTransformer(tiny_cfg())
    with pytest.raises(TypeError, match="integer tensor"):
        model(TOKENS.float())
    with pytest.raises(ValueError, match="d_vocab"):
        model(torch.tensor([[1, 99]]))
    with pytest.raises(ValueError, match="n_ctx"):
        model(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="n_iterations"):
        model(TOKENS, n_iterations=0)
    with pytest.raises(ValueError, match="n_iterations"):
        model(TOKENS, n_iterations=-2)
    with pytest.raises(ValueError, match="shape"):
        model(torch.ones(2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(TOKENS, return_type="loss")
    with pytest.raises(ValueError, match="vocab"):
        model.to_tokens("e1 r2")


def test_fresh_model_binds_prelude_weights_for_step_level_calls():
    model = randomise(LoopedTransformer(tiny_cfg(n_prelude=1, n_coda=1)))
    assert model.blocks[0].attn.W_Q is model.prelude[0].attn.W_Q  # before any forward
    model.prepare(5)
    state = model.embed_tokens(TOKENS)
    for t in range(5):
        state = model.iterate(state, t, None)
    torch.testing.assert_close(model.readout(state, 5), model(TOKENS, n_iterations=5))


@pytest.mark.parametrize("n_coda", [0, 1])
def test_answer_logits_by_iteration_is_the_readout_after_each_iteration(n_coda):
    cfg = LoopedConfig(d_vocab=30, n_ctx=4, d_model=32, n_heads=4, n_blocks=2, n_iterations=3, n_coda=n_coda, seed=0)
    model = LoopedTransformer(cfg).eval()
    tokens = torch.tensor([[3, 21, 22, 0], [5, 23, 24, 25]])
    with torch.no_grad():
        out = model.answer_logits_by_iteration(tokens, n_iterations=3)
    assert out.shape == (3, 2, 30)
    torch.testing.assert_close(out[-1], model.predict(tokens, n_iterations=3))
    if n_coda == 0:  # without a coda, stopping after t iterations is exactly a t-iteration forward
        for t in (1, 2):
            torch.testing.assert_close(out[t - 1], model.predict(tokens, n_iterations=t))
    with pytest.raises(ValueError, match="backprop_last"):
        model.answer_logits_by_iteration(tokens, n_iterations=3, backprop_last=4)


def test_readout_feedback_adds_the_re_embedded_soft_answer_before_each_iteration():
    cfg = LoopedConfig(d_vocab=30, n_ctx=4, d_model=32, n_heads=4, n_blocks=2, n_iterations=3, feedback=0.5, seed=0)
    model = LoopedTransformer(cfg).eval()
    tokens = torch.tensor([[3, 21, 22, 0], [5, 23, 24, 25]])
    logits, cache = model.run_with_cache(tokens)
    assert [k for k in cache.keys() if "feedback" in k] == ["loop.1.hook_feedback", "loop.2.hook_feedback"]
    with torch.no_grad():  # by hand: LN_final + unembedding, softmax, back through W_E, scaled, added
        state = model.embed_tokens(tokens)
        for t in range(3):
            if t > 0:
                added = 0.5 * model.unembed(model.ln_final(state)).softmax(-1) @ model.W_E
                torch.testing.assert_close(cache[f"loop.{t}.hook_feedback"], added)
                state = state + added
            for v in range(2 * t, 2 * t + 2):
                state = model.blocks[v](state)
        torch.testing.assert_close(model.readout(state, 3), logits)
    # hooks fire once per forward: the readout used for feedback fires no ln_final / unembed hook
    assert cache["ln_final.hook_normalized"].shape == (2, 4, 32)
    plain = LoopedTransformer(LoopedConfig(d_vocab=30, n_ctx=4, d_model=32, n_heads=4, n_blocks=2, n_iterations=3, seed=0))
    assert not any("feedback" in name for name in plain.hook_dict)
    with pytest.raises(ValueError, match="feedback"):
        LoopedConfig(d_vocab=30, n_ctx=4, feedback=-1.0)


# ---------------------------------------------------------------------------------------------------
# Iterations beyond the trained count (hook modules grown on demand)
# ---------------------------------------------------------------------------------------------------
def test_grown_iterations_follow_the_models_train_eval_mode():
    model = randomise(LoopedTransformer(tiny_cfg(n_iterations=4, dropout=0.5)))  # eval mode
    with torch.no_grad():
        a, b = model(TOKENS, n_iterations=8), model(TOKENS, n_iterations=8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # no dropout in the grown iterations 5..8
    assert not any(m.training for m in model.modules())
    model.train()
    model(TOKENS, n_iterations=10)
    assert all(m.training for m in model.modules())  # grown while training: training, like the rest
    model.eval()
    model(TOKENS, n_iterations=11)
    assert not any(m.training for m in model.modules())


def test_tl_patching_runs_past_the_trained_iterations_and_matches_a_manual_patch():
    model = randomise(LoopedTransformer(tiny_cfg(n_blocks=1, n_iterations=4, dropout=0.5)))
    clean = torch.tensor([[1, 12, 15, 17], [3, 14, 16, 18]])
    corrupt = torch.tensor([[2, 12, 15, 17], [4, 14, 16, 18]])
    answer = torch.tensor([7, 8])

    def metric(logits):
        return logits[torch.arange(2), -1, answer].mean()

    T = 8
    _, clean_cache = model.run_with_cache(clean, n_iterations=T)
    with model.iterations(T):
        tl = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
    assert tl.shape == (T, 4)
    for layer, pos in [(1, 2), (5, 1), (7, 0)]:  # layers 5 and 7 are iterations the model never ran at 4
        name = f"blocks.{layer}.hook_resid_pre"

        def patch(x, hook, pos=pos, name=name):
            x = x.clone()
            x[:, pos] = clean_cache[name][:, pos]
            return x

        with torch.no_grad():
            manual = metric(model.run_with_hooks(corrupt, n_iterations=T, fwd_hooks=[(name, patch)]))
        torch.testing.assert_close(tl[layer, pos], manual, atol=1e-5, rtol=1e-5)


def test_tl_plumbing_lives_in_models_hooked_and_public_names_stay_importable():
    import looplens.models as models
    from looplens.models import hooked, looped

    for name in ("LoopedTransformer", "LoopedActivationCache", "ModelAtIterations", "AdaptiveOutput", "LoopStep"):
        assert getattr(models, name) is getattr(looped, name)
    for method in ("run_with_cache", "run_with_hooks", "hooks", "iterations", "setup", "canonical_name", "to_tokens"):
        assert getattr(LoopedTransformer, method).__module__ == hooked.__name__, method
    source = looped.__file__ and open(looped.__file__).read()
    assert "mod_dict" not in source and "ActivationCache(" not in source  # no TL plumbing in the architecture
