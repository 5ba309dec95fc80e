"""Related architectures as LoopedTransformer options (issue 18.2): hyper-connections on the loop
(``hyper_streams``, Hyperloop) and two-timescale loops (``slow_period``, HRM). Checked against hand-unrolled
references, through the loop driver, the hook names, run_with_cache, the interp functions, training and
checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from looplens.interp import (
    activation_patching,
    fixed_points,
    locate_hops,
    logit_lens,
    overthinking,
    spectral_radius,
)
from looplens.models import LoopedConfig, LoopedTransformer
from looplens.models.components import TransformerBlock
from transformer_lens.hook_points import HookPoint

ROOT = Path(__file__).resolve().parents[1]
TOKENS = torch.tensor([[1, 12, 15, 17], [3, 14, 16, 0], [5, 13, 0, 0]])
BASE = dict(d_vocab=23, n_ctx=5, d_model=16, n_heads=2, n_blocks=2, n_iterations=3, seed=0)
ARCHS = {
    "hyper3": dict(hyper_streams=3),
    "hyper2_prelude_coda": dict(hyper_streams=2, n_prelude=1, n_coda=1),
    "slow2": dict(slow_period=2),
    "slow3_fast1_prelude_coda": dict(slow_period=3, n_fast_blocks=1, n_prelude=1, n_coda=1),
}


def model_of(**kw) -> LoopedTransformer:
    model = LoopedTransformer(LoopedConfig(**{**BASE, **kw}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random mixing, depth weights, biases and gains: nothing passes by symmetry
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def reference(model: LoopedTransformer, tokens: torch.Tensor, T: int) -> torch.Tensor:
    """The architecture written out from the docstrings, with fresh blocks on the model's weights."""
    cfg = model.cfg
    block = lambda p: TransformerBlock(cfg, p).eval()  # noqa: E731
    x = model.embed(tokens) + (model.pos_embed(tokens) if cfg.positional == "learned" else 0)
    for p in model.prelude:
        x = block(p)(x)
    if cfg.hyper_streams > 1:
        streams = [x] * cfg.hyper_streams
        W, w = model.hyper.W_mix, torch.cat([torch.ones(1), model.hyper.w_depth])
        for _ in range(T):
            mixed = [sum(W[i, j] * streams[j] for j in range(cfg.hyper_streams)) for i in range(cfg.hyper_streams)]
            y = mixed[0]
            for p in model.core:
                y = block(p)(y)
            streams = [mixed[i] + w[i] * (y - mixed[0]) for i in range(cfg.hyper_streams)]
        state = streams[0]
    else:
        z_H, z_L = torch.zeros_like(x), torch.zeros_like(x)
        for _ in range(T):
            for _ in range(cfg.slow_period):
                z_L = z_L + z_H + x
                for p in model.fast:
                    z_L = block(p)(z_L)
            z_H = z_H + z_L
            for p in model.core:
                z_H = block(p)(z_H)
        state = z_H
    for p in model.coda:
        state = block(p)(state)
    return model.unembed(model.ln_final(state))


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------
def test_options_default_off_and_validate():
    cfg = LoopedConfig(d_vocab=9, n_ctx=3)
    assert (cfg.hyper_streams, cfg.slow_period, cfg.n_fast_blocks) == (1, 0, None)
    hrm = LoopedConfig(d_vocab=9, n_ctx=3, n_blocks=3, slow_period=2)
    assert hrm.n_fast_blocks == 3 and LoopedConfig.from_dict(hrm.to_dict()) == hrm
    for bad, words in [
        (dict(hyper_streams=2, slow_period=2), "separate architectures"),
        (dict(hyper_streams=2, input_injection="add"), "input_injection must be 'none'"),
        (dict(slow_period=2, input_injection="concat"), "input_injection must be 'none'"),
        (dict(hyper_streams=2, feedback=0.5), "readout feedback"),
        (dict(n_fast_blocks=2), "needs slow_period > 0"),
        (dict(hyper_streams=0), "hyper_streams"),
        (dict(slow_period=-1), "slow_period"),
    ]:
        with pytest.raises(ValueError, match=words):
            LoopedConfig(d_vocab=9, n_ctx=3, **bad)


def test_options_off_is_the_plain_model_bit_for_bit():
    plain = LoopedTransformer(LoopedConfig(**BASE)).eval()
    off = LoopedTransformer(LoopedConfig(**BASE, hyper_streams=1, slow_period=0)).eval()
    assert plain.state_dict().keys() == off.state_dict().keys() and not off.carries_state
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), off.state_dict().values(), strict=True))
    assert torch.equal(plain(TOKENS), off(TOKENS))


def test_new_weights_are_drawn_after_the_plain_ones():
    """The same seed gives every shared weight the plain model's value (hyper: and the same function at init)."""
    plain = LoopedTransformer(LoopedConfig(**BASE)).eval()
    for kw in ({"hyper_streams": 3}, {"slow_period": 2}):
        other = LoopedTransformer(LoopedConfig(**BASE, **kw)).eval()
        own = plain.state_dict()
        for name, value in other.state_dict().items():
            if name in own:
                assert torch.equal(value, own[name]), (kw, name)
    hyper = LoopedTransformer(LoopedConfig(**BASE, hyper_streams=3)).eval()
    with torch.no_grad():  # W_mix = I, w_depth = 0, streams = copies of the input: the plain loop
        torch.testing.assert_close(hyper(TOKENS, n_iterations=5), plain(TOKENS, n_iterations=5))
        streams = list(hyper.steps(TOKENS, 2))[-1].carry
    loop_input = hyper.embed_tokens(TOKENS)
    for i in (1, 2):  # the extra streams hold the loop's input at init
        torch.testing.assert_close(streams[:, :, i], loop_input)


# ---------------------------------------------------------------------------------------------------
# Computation and the loop driver
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_model_equals_the_hand_written_reference(arch):
    model = model_of(**ARCHS[arch])
    with torch.no_grad():
        for T in (1, 4):
            torch.testing.assert_close(model(TOKENS, n_iterations=T), reference(model, TOKENS, T))


@pytest.mark.parametrize("arch", ARCHS)
def test_steps_states_carry_and_readout(arch):
    model = model_of(**ARCHS[arch])
    cfg, T = model.cfg, 4
    logits, cache = model.run_with_cache(TOKENS, n_iterations=T)
    with torch.no_grad():
        steps = list(model.steps(TOKENS, T))
    for step in steps:
        t = step.iteration
        # (the cached run takes the explicit attention path, steps() SDPA: equal up to float rounding)
        torch.testing.assert_close(step.state, cache[f"loop.{t}.hook_state"], atol=1e-4, rtol=1e-4)
        # the readout state is the last core block's output: the logit lens of the last layer is the model's
        assert torch.equal(cache[f"loop.{t}.hook_state"], cache[model.hook_name("hook_resid_post", t, cfg.n_blocks - 1)])
        torch.testing.assert_close(step.answer_logits(), model.predict(TOKENS, n_iterations=t + 1))
        if cfg.hyper_streams > 1:
            assert step.carry.shape == (*TOKENS.shape, cfg.hyper_streams, cfg.d_model)
            torch.testing.assert_close(step.carry, cache[f"loop.{t}.hook_streams"], atol=1e-4, rtol=1e-4)
            assert torch.equal(step.carry[:, :, 0], step.state)
        else:
            torch.testing.assert_close(step.carry, cache[f"loop.{t}.fast.{cfg.slow_period - 1}.hook_state"],
                                       atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steps[-1].readout(), logits)
    torch.testing.assert_close(model.answer_logits_by_iteration(TOKENS, T)[-1], model.predict(TOKENS, T))


@pytest.mark.parametrize("arch", ARCHS)
def test_resuming_at_any_layer_or_iteration_equals_the_full_run(arch):
    model = model_of(**ARCHS[arch])
    T, P = 3, model.cfg.n_prelude
    logits, cache = model.run_with_cache(TOKENS, n_iterations=T)
    loop_input = cache[f"blocks.{P}.hook_resid_pre"]  # not these loops' input (what patching passes): not used
    first_coda = P + T * model.cfg.n_blocks
    with torch.no_grad():
        steps = list(model.steps(TOKENS, T))
        for v in range(model.cfg.n_virtual_layers(T)):
            state = cache[f"blocks.{v}.hook_resid_pre"]
            if v >= first_coda:
                resumed = model.readout(state, T, start_layer=v)
            else:
                resumed = list(model.steps(TOKENS, T, start_layer=v, state=state))[-1].readout()
            torch.testing.assert_close(resumed, logits, msg=lambda m, v=v: f"layer {v}: {m}")
        for t in range(1, T):
            state = cache[f"loop.{t - 1}.hook_state"]
            for carry in (None, steps[t - 1].carry):  # the tokens' own carry, recomputed or given
                resumed = list(model.steps(TOKENS, T, start=t, state=state, carry=carry, loop_input=loop_input))
                assert [s.iteration for s in resumed] == list(range(t, T))
                torch.testing.assert_close(resumed[-1].readout(), logits)


def test_a_patched_resume_patches_that_activation_alone():
    """Resuming from a changed resid_pre equals the full run with that activation replaced by a hook."""
    for kw in ({"hyper_streams": 3}, {"slow_period": 2}):
        model = model_of(**kw)
        v = model.virtual_layer(1, 1)
        _, cache = model.run_with_cache(TOKENS, n_iterations=3)
        patched = cache[f"blocks.{v}.hook_resid_pre"] * 0.5 + 0.3
        with torch.no_grad():
            expected = model.run_with_hooks(TOKENS, n_iterations=3,
                                            fwd_hooks=[(f"blocks.{v}.hook_resid_pre", lambda x, hook, p=patched: p)])
            resumed = list(model.steps(TOKENS, 3, start_layer=v, state=patched))[-1].readout()
        torch.testing.assert_close(resumed, expected)


def test_step_level_calls_and_bad_inputs():
    hyper = model_of(hyper_streams=2)
    x = hyper.embed_tokens(TOKENS)
    with pytest.raises(ValueError, match="iterate_carried"):
        hyper.iterate(x, 0, x)
    with torch.no_grad():
        state, carry = hyper.iterate_carried(*hyper.initial_state(x), 0, x)
        torch.testing.assert_close(state, next(iter(hyper.steps(TOKENS, 1))).state)
    with pytest.raises(ValueError, match="carry resumes"):
        list(hyper.steps(TOKENS, 3, start_layer=3, state=x, carry=carry))
    with pytest.raises(ValueError, match="carry resumes"):
        list(model_of().steps(TOKENS, 3, start=1, state=x, carry=carry))


def test_gradients_reach_the_new_weights_and_backprop_last_cuts_the_carry():
    for kw, names in (({"hyper_streams": 3}, ["hyper.W_mix", "hyper.w_depth"]), ({"slow_period": 2}, ["fast.0.attn.W_Q"])):
        model = model_of(**kw).train()
        model(TOKENS, n_iterations=3, return_type="loss", targets=torch.tensor([2, 4, 6])).backward()
        grads = dict(model.named_parameters())
        for name in names:
            assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, (kw, name)
        model.zero_grad()
        loss = model(TOKENS, n_iterations=3, return_type="loss", targets=torch.tensor([2, 4, 6]), backprop_last=1)
        loss.backward()
        assert grads["embed.W_E"].grad is not None  # through the readout (tied) only ...
        if "hyper_streams" in kw:  # ... the mixing still gets the last iteration's gradient
            assert grads["hyper.W_mix"].grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# Hook names and the cache
# ---------------------------------------------------------------------------------------------------
def test_hook_names_per_stream_and_per_level_are_pinned():
    hyper = model_of(hyper_streams=2)
    assert "loop.0.hook_streams" in hyper.hook_dict and "loop.0.fast.0.hook_state" not in hyper.hook_dict
    names = [n for n in hyper.hook_dict if n.startswith("loop.1.")]
    assert names == ["loop.1.hook_state", "loop.1.hook_streams"]
    hrm = model_of(slow_period=2, n_fast_blocks=1)
    names = [n for n in hrm.hook_dict if n.startswith("loop.1.") and ".attn." not in n and ".ln" not in n and ".mlp." not in n]
    assert names == [
        "loop.1.hook_state",
        *[f"loop.1.fast.{s}.{rest}" for s in (0, 1) for rest in (
            "blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out",
            "blocks.0.hook_resid_post", "hook_state")],
    ]
    assert hrm.canonical_name("loop.1.slow.blocks.1.hook_resid_post") == "blocks.3.hook_resid_post"
    assert hrm.canonical_name("loop.1.slow.hook_state") == "loop.1.hook_state"
    assert hyper.canonical_name("loop.1.slow.hook_state") == "loop.1.slow.hook_state"  # no slow level there
    assert isinstance(hrm.mod_dict["loop.2.slow.blocks.0.attn.hook_pattern"], HookPoint)


@pytest.mark.parametrize("kw", [{"hyper_streams": 3}, {"slow_period": 2}])
def test_run_with_cache_keeps_every_iteration(kw):
    model = model_of(**kw)
    T = 5
    _, cache = model.run_with_cache(TOKENS, n_iterations=T)
    if model.cfg.hyper_streams > 1:
        per_iter = [cache[f"loop.{t}.hook_streams"] for t in range(T)]
        assert per_iter[0].shape == (3, 4, 3, 16)
    else:
        per_iter = [cache[f"loop.{t}.fast.{s}.hook_state"] for t in range(T) for s in range(2)]
        assert len(per_iter) == 2 * T
        torch.testing.assert_close(cache["loop.3.slow.hook_state"], cache["loop.3.hook_state"])
        torch.testing.assert_close(cache["loop.3.slow.blocks.1.hook_resid_post"], cache["loop.3.hook_state"])
        fast = cache["loop.2.fast.1.blocks.0.hook_resid_pre"]  # the fast input: z_L + z_H + x
        expected = cache["loop.2.fast.0.hook_state"] + cache["loop.1.hook_state"] + cache["blocks.0.hook_resid_pre"] * 0
        torch.testing.assert_close(fast - expected, model.embed_tokens(TOKENS).detach())
    assert all(not torch.equal(a, b) for a, b in zip(per_iter, per_iter[1:]))
    with pytest.raises(NotImplementedError, match="hyper_streams|slow_period"):
        cache.decompose_resid()
    # an alias hook fires in run_with_hooks
    seen = []
    name = "loop.1.slow.blocks.0.hook_resid_pre" if model.cfg.slow_period else "loop.1.hook_streams"
    model.run_with_hooks(TOKENS, n_iterations=2, fwd_hooks=[(name, lambda x, hook: seen.append(x.shape))])
    assert len(seen) == 1


# ---------------------------------------------------------------------------------------------------
# Interp functions
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{"hyper_streams": 3}, {"slow_period": 2}])
def test_interp_functions_run_and_read_what_the_readout_reads(kw):
    model = model_of(**kw)
    T = 3
    answers = torch.tensor([2, 4, 6])
    lens = logit_lens(model, TOKENS, answers, n_iterations=T, positions="readout", progress=False)
    last = lens[lens.layer == lens.layer.max()].sort_values("example")
    assert last.top_token.tolist() == model.predict(TOKENS, T).argmax(-1).tolist()
    hops = locate_hops(model, TOKENS, answers, n_iterations=T, progress=False)
    assert len(hops) == 3
    fixed = fixed_points(model, TOKENS, n_iterations=T, progress=False)
    assert set(fixed.measure) == {"relative_change", "norm", "cosine_to_final", "attention_drift"}
    radius = spectral_radius(model, TOKENS, n_iterations=T, n_steps=6, progress=False)
    assert radius.spectral_radius.notna().all() and (radius.spectral_norm > 0).all()
    curves = overthinking(model, TOKENS, answers, max_iterations=T, progress=False)
    assert len(curves) == 3 * T


@pytest.mark.parametrize("kw", [{"hyper_streams": 3}, {"slow_period": 2}])
def test_activation_patching_equals_a_manual_patch(kw):
    model = model_of(**kw)
    clean, corrupted = TOKENS[:2], torch.tensor([[2, 12, 15, 17], [4, 14, 16, 0]])
    ans_c, ans_x = torch.tensor([2, 4]), torch.tensor([6, 8])
    T = 2
    df = activation_patching(model, clean, corrupted, ans_c, ans_x, n_iterations=T, hook="resid_pre",
                             progress=False, per_example=True)
    _, clean_cache = model.run_with_cache(clean, n_iterations=T)
    rows = torch.arange(2)
    for _, cell in df.sample(6, random_state=0).iterrows():
        v, p = int(cell.layer), int(cell.position)

        def patch(x, hook, v=v, p=p):
            x = x.clone()
            x[:, p] = clean_cache[f"blocks.{v}.hook_resid_pre"][:, p]
            return x

        with torch.no_grad():
            logits = model.run_with_hooks(corrupted, n_iterations=T, fwd_hooks=[(f"blocks.{v}.hook_resid_pre", patch)])
        read = logits[rows, model.readout_positions(corrupted)]
        metric = (read[rows, ans_c] - read[rows, ans_x])[int(cell.pair)]
        assert float(metric) == pytest.approx(cell.metric, abs=1e-4)


# ---------------------------------------------------------------------------------------------------
# Checkpoints, training
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{"hyper_streams": 3}, {"slow_period": 2, "n_fast_blocks": 1}])
def test_save_load_round_trip(tmp_path, kw):
    model = model_of(**kw)
    model.save(tmp_path / "m")
    loaded = LoopedTransformer.load(tmp_path / "m" / "model").eval()
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded(TOKENS, n_iterations=4), model(TOKENS, n_iterations=4))


def test_retrofit_refuses_these_options_naming_them():
    from looplens.models import retrofit_loop

    for kw in ({"hyper_streams": 2}, {"slow_period": 2}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            retrofit_loop(model_of(**kw, n_iterations=1), (0, 1))


def test_ensemble_refuses_these_options_naming_them():
    from looplens.models.train import preset
    from looplens.models.train.ensemble import check_batchable

    for override in ("model.hyper_streams=2", "model.slow_period=2"):
        with pytest.raises(ValueError, match=override.split("=")[0]):
            check_batchable(preset("smoke-composition").with_overrides([override]))


@pytest.mark.slow
@pytest.mark.parametrize("override", [["model.hyper_streams=2"], ["model.slow_period=2", "model.n_iterations=1"]])
def test_smoke_training_learns(tmp_path, override):
    from looplens.models.train import load_run, preset, train

    cfg = preset("smoke-composition").with_overrides([*override, "run.max_steps=150", "eval.every=150"])
    result = train(cfg, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    rows = run.metrics[run.metrics.split == "train_batch"]
    assert result.step == 150
    # 150 steps of the smoke run (chance: 1/40): the loss falls and training accuracy leaves chance
    assert rows.loss.iloc[-3:].mean() < 0.92 * rows.loss.iloc[:3].mean()
    assert rows.accuracy.iloc[-3:].mean() > 0.08
    model = run.load_model()  # the checkpoint round-trips through the run directory with its options
    assert model.carries_state
    assert (model.cfg.hyper_streams, model.cfg.slow_period) == (cfg.model.hyper_streams, cfg.model.slow_period)


# ---------------------------------------------------------------------------------------------------
# The studies in docs/foreign.md: each block run as written, its findings checked
# ---------------------------------------------------------------------------------------------------
def _run_doc_study(heading: str) -> dict:
    """Run the python block under ``heading`` in docs/foreign.md (as test_docs_examples does); its namespace."""
    text = (ROOT / "docs" / "foreign.md").read_text(encoding="utf-8")
    code = text.split(f"\n{heading}\n", 1)[1].split("```python\n", 1)[1].split("\n```", 1)[0]
    namespace: dict = {"__name__": "__doc_study__"}
    exec(compile(code, f"docs/foreign.md ({heading})", "exec"), namespace)
    return namespace


def _final_accuracy(run, split: str, iterations: int) -> float:
    m = run.metrics
    row = m[(m.split == split) & (m.iterations == iterations) & (m.step == m.step.max())]
    return float(row.accuracy.iloc[0])


@pytest.mark.slow
def test_hyperloop_study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _run_doc_study("### Study: a tiny two-stream loop")
    run, model, per_stream, hops = ns["run"], ns["model"], ns["per_stream"], ns["hops"]
    assert _final_accuracy(run, "train_inferred", 4) > 0.9 and _final_accuracy(run, "train_inferred", 2) < 0.8
    assert _final_accuracy(run, "test_inferred_id", 4) < 0.2
    for t in range(4):
        bridge0, answer0, cos0 = per_stream[t, 0]
        bridge1, answer1, cos1 = per_stream[t, 1]
        assert abs(answer1 - answer0) <= 0.05 and abs(bridge1 - bridge0) <= 0.07  # both streams carry them
        assert cos1 > cos0  # stream 1 keeps more of the loop's input
    assert per_stream[0, 0][1] < 0.3 and per_stream[3, 0][1] > 0.9
    W, w = model.hyper.W_mix.detach(), model.hyper.w_depth.detach()
    assert W[0, 0] > 1.1 and W[0, 1] > 0.1 and w[0] > 0.1 and 0.5 < W[1, 1] < 0.95  # moved off I and 0
    assert (hops.fraction_resolved > 0.9).all()
    assert hops.loc[1, "iteration_mean"] < hops.loc[2, "iteration_mean"]  # the bridge before the answer


@pytest.mark.slow
def test_hrm_study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _run_doc_study("### Study: which level resolves each hop")
    run, levels, hops, located = ns["run"], ns["levels"], ns["hops"], ns["located"]
    assert _final_accuracy(run, "train_inferred", 2) > 0.95 and _final_accuracy(run, "test_inferred_id", 2) < 0.2
    assert list(levels) == ["input", "cycle 0 fast 0", "cycle 0 fast 1", "cycle 0 slow",
                            "cycle 1 fast 0", "cycle 1 fast 1", "cycle 1 slow"]
    assert max(levels["input"]) < 0.1
    bridge, answer = levels["cycle 0 slow"]
    assert bridge > 0.9 and answer > 0.9  # the first slow update resolves both hops ...
    assert max(levels["cycle 0 fast 0"] + levels["cycle 0 fast 1"]) < 0.4  # ... the fast steps before it neither
    assert min(levels["cycle 1 fast 0"] + levels["cycle 1 fast 1"]) > 0.8  # z_L reads it back through z_H
    assert min(levels["cycle 1 slow"]) > 0.98
    assert (hops.fraction_resolved > 0.95).all() and (hops.iteration_mean < 0).all()
    before = located[located.resolved].groupby("hop")["iteration"].apply(lambda it: float((it == -1).mean()))
    assert 0.2 < before[1] < 0.45 and 0.15 < before[2] < 0.4  # decoded from z_L after cycle 0's fast steps
