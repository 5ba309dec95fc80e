"""The one public loop driver, ``model.steps``: per-iteration steps, resuming, and binding safety."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from looplens.models import LoopedConfig, LoopedTransformer, LoopStep

ROOT = Path(__file__).resolve().parents[1]
TOKENS = torch.tensor([[1, 12, 15, 17], [3, 14, 16, 0], [5, 13, 0, 0]])
VARIANTS = {
    "plain": {},
    "prelude_coda": dict(n_prelude=1, n_coda=1),
    "inject_add": dict(input_injection="add"),
    "inject_concat_prelude": dict(input_injection="concat", n_prelude=1),
    "feedback_coda": dict(feedback=0.5, n_coda=1),
}


def model_of(**kw) -> LoopedTransformer:
    cfg = LoopedConfig(**{**dict(d_vocab=23, n_ctx=5, d_model=16, n_heads=2, n_blocks=2, n_iterations=3, seed=0), **kw})
    model = LoopedTransformer(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random biases and gains too, so nothing passes by symmetry
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_steps_yield_each_iterations_state_and_readout(variant):
    model = model_of(**VARIANTS[variant])
    T = 4
    logits, cache = model.run_with_cache(TOKENS, n_iterations=T)
    with torch.no_grad():
        steps = list(model.steps(TOKENS, T))
    assert [s.iteration for s in steps] == list(range(T)) and all(isinstance(s, LoopStep) for s in steps)
    assert [s.is_last for s in steps] == [False] * (T - 1) + [True]
    for step in steps:
        torch.testing.assert_close(step.state, cache[f"loop.{step.iteration}.hook_state"])
        # stopping after t + 1 iterations is exactly a (t + 1)-iteration run, coda included
        torch.testing.assert_close(step.answer_logits(), model.predict(TOKENS, n_iterations=step.iteration + 1))
    torch.testing.assert_close(steps[-1].readout(), logits)
    torch.testing.assert_close(steps[0].loop_input, cache[f"blocks.{model.cfg.n_prelude}.hook_resid_pre"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_resuming_at_any_virtual_layer_or_iteration_equals_the_full_run(variant):
    model = model_of(**VARIANTS[variant])
    T, P = 3, model.cfg.n_prelude
    logits, cache = model.run_with_cache(TOKENS, n_iterations=T)
    loop_input = cache[f"blocks.{P}.hook_resid_pre"]
    first_coda = P + T * model.cfg.n_blocks
    with torch.no_grad():
        for v in range(model.cfg.n_virtual_layers(T)):
            state = cache[f"blocks.{v}.hook_resid_pre"]
            if v >= first_coda:
                resumed = model.readout(state, T, start_layer=v)
            else:
                resumed = list(model.steps(TOKENS, T, start_layer=v, state=state, loop_input=loop_input))[-1].readout()
            torch.testing.assert_close(resumed, logits, msg=lambda m, v=v: f"layer {v}: {m}")
        for t in range(T):
            state = loop_input if t == 0 else cache[f"loop.{t - 1}.hook_state"]
            steps = list(model.steps(TOKENS, T, start=t, state=state, loop_input=loop_input))
            assert [s.iteration for s in steps] == list(range(t, T))
            torch.testing.assert_close(steps[-1].readout(), logits)


def test_resuming_in_the_prelude_recomputes_the_injected_loop_input():
    model = model_of(input_injection="add", n_prelude=1)
    _, cache = model.run_with_cache(TOKENS, n_iterations=3)
    patched = cache["blocks.0.hook_resid_pre"] + 0.5
    with torch.no_grad():
        expected = model.run_with_hooks(TOKENS, n_iterations=3, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: patched)])
        resumed = list(model.steps(TOKENS, 3, start_layer=0, state=patched,
                                   loop_input=cache["blocks.1.hook_resid_pre"]))  # the unpatched input: not used
    torch.testing.assert_close(resumed[-1].readout(), expected)
    torch.testing.assert_close(resumed[0].loop_input, model.blocks[0](patched))


def test_resumed_hooks_fire_from_the_resumed_layer_on():
    model = model_of()
    _, cache = model.run_with_cache(TOKENS, n_iterations=3)
    fired = []
    hooks = [(f"blocks.{v}.hook_resid_pre", lambda x, hook: fired.append(hook.name)) for v in range(6)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        list(model.steps(TOKENS, 3, start_layer=3, state=cache["blocks.3.hook_resid_pre"]))
    assert fired == [f"blocks.{v}.hook_resid_pre" for v in (3, 4, 5)]


def test_step_level_calls_bind_the_layers_they_run():
    """A coda bound for a shorter run must not stand in for a core block of a longer one."""
    model = model_of(n_prelude=1, n_coda=1)
    with torch.no_grad():
        model(TOKENS, n_iterations=3)  # virtual layer 7 is the coda here, core block 0 of iteration 3 below
        state = model.embed_tokens(TOKENS)
        for t in range(4):
            state = model.iterate(state, t)
        torch.testing.assert_close(model.readout(state, 4), model(TOKENS, n_iterations=4))
        torch.testing.assert_close(model.readout(state, 4), model.readout(state, 4))  # and back, bound again
    assert model.at_iterations(4).blocks[9].attn.W_Q is model.coda[0].attn.W_Q


def test_truncated_backprop_through_the_driver():
    model = model_of()
    model.train()
    loss = list(model.steps(TOKENS, 4, backprop_last=1))[-1].answer_logits().sum()
    loss.backward()
    grad = model.pos_embed.W_pos.grad  # (W_E is also the unembedding, after the cut)
    assert grad is None or bool((grad == 0).all())  # the positions enter before the cut only
    assert model.core[0].attn.W_Q.grad is not None


def test_driver_bad_arguments_give_clear_errors():
    model = model_of(input_injection="add", n_coda=1)
    state = torch.zeros(3, 4, 16)
    cases = [
        (dict(start=3), "start must be an iteration"),
        (dict(start=-1), "start must be an iteration"),
        (dict(start=1), "needs `state`"),
        (dict(start=1, state=state), "pass loop_input"),
        (dict(start_layer=6, state=state), "start_layer must be a prelude or loop layer"),
        (dict(start=1, start_layer=2, state=state), "not both"),
        (dict(start=1, state=torch.zeros(3, 4, 8)), "state must have shape"),
        (dict(backprop_last=4), "backprop_last"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.steps(TOKENS, 3, **kwargs)  # eager: raises before the first iteration is asked for
    with pytest.raises(ValueError, match="start_layer must be a coda layer"):
        model.readout(state, 3, start_layer=5)


def test_nothing_outside_the_model_calls_its_private_loop_methods():
    pattern = re.compile(r"\b(?!self\b)\w+\.(_grow|_bind|_loop_states|_check_tokens|_check_iterations|_steps|_block)\b")
    offenders = []
    for folder in ("interp", "analyses", "app", "models", "data"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name in ("looped.py", "hooked.py") and path.parent.name == "models":
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "private model methods called from outside the model:\n" + "\n".join(offenders)
