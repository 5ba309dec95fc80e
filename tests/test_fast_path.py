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


def test_a_pre_forward_hook_on_an_inner_hook_point_fires():
    """A forward pre-hook counts as a hook everywhere: the block leaves its one-function path and the
    LayerNorm its fused kernel, so the pre-hook on hook_scale runs and can edit the scale."""
    model = _model()
    tokens = _tokens()
    base = model(tokens)
    seen = []
    handle = model.blocks[1].ln2.hook_scale.register_forward_pre_hook(lambda m, args: (seen.append(1), (2 * args[0],))[1])
    try:
        out = model(tokens)
    finally:
        handle.remove()
    assert seen == [1] and not torch.allclose(out, base)


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


def test_block_function_equals_the_module_path_with_dropout_and_gradients():
    """With no hook a block runs as block_forward (one function); a no-op hook on each block's resid_mid sends
    it through the modules with the same fused kernels: the same numbers, random dropout masks and gradients."""
    model = _model(dropout=0.2).train()
    tokens, targets = _tokens(), torch.arange(16) % CFG["d_vocab"]

    def run(hooks):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with model.hooks(fwd_hooks=hooks):
            loss = model(tokens, return_type="loss", targets=targets)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fast_loss, fast_grads = run([])
    module_loss, module_grads = run([(lambda name: name.endswith("hook_resid_mid"), lambda x, hook: x)])
    torch.testing.assert_close(fast_loss, module_loss, atol=1e-6, rtol=1e-6)
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, module_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    torch.manual_seed(4)
    other = model(tokens, return_type="loss", targets=targets)
    assert not torch.isclose(other, fast_loss)  # dropout is live: another mask, another loss


def test_residual_stream_hooks_fire_around_the_block_function():
    """hook_resid_pre / hook_resid_post bound the block, so hooks there (run_with_cache of the residual
    stream, resid patching) keep the one-function block; their hooks fire and can edit."""
    from unittest import mock

    from looplens.models import components

    model = _model()
    tokens = _tokens()
    layers = model.cfg.n_layers
    with mock.patch.object(components, "block_forward", wraps=components.block_forward) as fn:
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: "hook_resid_p" in name)
        assert fn.call_count == layers
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.hook_resid_pre", lambda x, hook: torch.zeros_like(x))])
        assert fn.call_count == 2 * layers
    _, full = model.run_with_cache(tokens)  # every hook: the module path
    assert len(cache) == 2 * layers
    for name in cache.keys():
        torch.testing.assert_close(cache[name], full[name], atol=1e-6, rtol=1e-6)
    state = torch.zeros(*tokens.shape, model.cfg.d_model)
    for v in range(2, layers):
        state = model.blocks[v](state)
    torch.testing.assert_close(zeroed, model.unembed(model.ln_final(state)), atol=1e-5, rtol=1e-5)


def test_module_hooks_and_replaced_submodules_are_honoured_by_the_block_function():
    """The one-function block only stands in when nothing could observe or change its modules: a plain
    torch hook on a compute module, a global module hook and a submodule a user swapped in all run."""
    from torch import nn

    model = _model()
    tokens = _tokens()
    base = model(tokens)
    seen = []
    handle = model.blocks[1].attn.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    model(tokens)
    handle.remove()
    assert seen == [torch.Size([16, 3, CFG["d_model"]])]

    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(type(module)))
    try:
        model(tokens)
    finally:
        handle.remove()
    assert seen.count(type(model.blocks[0].mlp)) == model.cfg.n_layers

    class Silent(nn.Module):  # an ablation: the block's MLP writes nothing
        calls = 0

        def forward(self, x):
            Silent.calls += 1
            return torch.zeros_like(x)

    original = model.blocks[0].mlp
    model.blocks[0].mlp = Silent()
    ablated = model(tokens)
    assert Silent.calls == 1 and not torch.allclose(ablated, base)
    model.blocks[0].mlp = original
    torch.testing.assert_close(model(tokens), base)  # back in place: the function path again, same numbers
    fresh = _model()  # swapped before its first forward: honoured too
    fresh.blocks[1].mlp = Silent()
    fresh(tokens)
    assert Silent.calls == 2
    plain = [block._fast() for model_ in (_model(), _model(n_prelude=1, n_coda=1, feedback=1.0)) for block in model_.blocks]
    assert all(plain)  # every block the models build takes the one-function path


def test_a_forward_fuses_each_blocks_qkv_weights_once_and_a_scope_never_goes_stale():
    from unittest import mock

    from looplens.models.components import reuse_weights

    model = _model()
    tokens = _tokens()
    params = model.core[0].attn
    with mock.patch.object(torch, "stack", wraps=torch.stack) as stack:
        model(tokens)
    assert stack.call_count == 2 * CFG["n_blocks"]  # weights + biases per physical block, not per layer (x3)
    with reuse_weights():
        with torch.no_grad():
            frozen = params.fused_qkv()
        assert params.fused_qkv()[0].requires_grad and not frozen[0].requires_grad  # grad mode: rebuilt
        W, b = params.fused_qkv()
        assert params.fused_qkv()[0] is W  # reused
        with torch.no_grad():
            params.W_K.add_(1.0)  # an in-place edit (its version moves): rebuilt, with the edit
        W_edited, _ = params.fused_qkv()
        torch.testing.assert_close(W_edited - W.detach(), torch.cat([torch.zeros(CFG["d_model"], CFG["d_model"]),
                                                                     torch.ones(CFG["d_model"], CFG["d_model"]),
                                                                     torch.zeros(CFG["d_model"], CFG["d_model"])], 1))
    assert params.fused_qkv()[0] is not params.fused_qkv()[0]  # outside a scope: built per call


# --- torch.compile and host reads (issue 16.2, 16.3) ----------------------------------------------------
HOST_READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy")


class _CountHostReads(torch.overrides.TorchFunctionMode):
    """Counts reads of tensor values into Python: each is a device synchronisation on a GPU."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _device_side_checks():
    """host_checks() as on a GPU or under torch.compile: value checks become device-side asserts."""
    from unittest import mock

    return mock.patch("looplens.models.hooked.host_checks", return_value=False), \
        mock.patch("looplens.models.looped.host_checks", return_value=False)


def test_device_side_checks_still_reject_bad_token_ids_and_padding_only_queries():
    model = _model()
    a, b = _device_side_checks()
    with a, b:
        with pytest.raises(RuntimeError, match="token ids must be in"):
            model(torch.tensor([[1, CFG["d_vocab"], 2]]))
        with pytest.raises(RuntimeError, match="only of padding"):
            model.predict(torch.tensor([[1, 2, 3], [0, 0, 0]]))
    with pytest.raises(ValueError, match="got min 1, max 40"):  # eager CPU: the bad value is named
        model(torch.tensor([[1, CFG["d_vocab"], 2]]))


def test_a_training_step_reads_no_tensor_values_on_the_host(tmp_path):
    from looplens.models.train import preset
    from looplens.models.train.optim import make_optimizer
    from looplens.models.train.trainer import Trainer

    for supervise in ("last", "from_hops"):
        cfg = preset("smoke-composition").with_overrides([f"recurrence.supervise={supervise}", "model.feedback=1.0"])
        trainer = Trainer(cfg, tmp_path / supervise, progress=False, command=None)
        # fused AdamW, as the trainer builds it on CUDA (torch's unfused CPU AdamW reads its step count)
        trainer.optimizer = make_optimizer(trainer.model, cfg.optim, fused=True)
        trainer.train_step()
        a, b = _device_side_checks()
        with a, b, _CountHostReads() as counter:
            trainer.train_step()
        assert counter.reads == [], supervise
        with _CountHostReads() as counter:  # the counter works: eager CPU checks do read
            trainer.train_step()
        assert counter.reads, supervise


COMPILE_CHECK = """
import torch
from looplens.models import LoopedConfig, LoopedTransformer
model = LoopedTransformer(LoopedConfig(d_vocab=40, n_ctx=3, d_model=32, n_heads=4, n_blocks=2, n_iterations=3,
                                       feedback=1.0, seed=0)).eval()
tokens = torch.randint(1, 40, (16, 3), generator=torch.Generator().manual_seed(1))
explanation = torch._dynamo.explain(model)(tokens)
assert explanation.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
eager = model(tokens)
_, eager_cache = model.run_with_cache(tokens)
model.compile()
torch.testing.assert_close(model(tokens), eager, atol=1e-5, rtol=1e-5)
logits, cache = model.run_with_cache(tokens)
torch.testing.assert_close(logits, eager, atol=1e-5, rtol=1e-5)
assert set(cache.keys()) == set(eager_cache.keys()) and len(cache.keys()) > 100
torch.testing.assert_close(cache["blocks.3.ln1.hook_scale"], eager_cache["blocks.3.ln1.hook_scale"])
zeroed = model.run_with_hooks(tokens, fwd_hooks=[("blocks.5.hook_resid_pre", lambda x, hook: torch.zeros_like(x))])
assert not torch.allclose(zeroed, eager)
print("ok", explanation.graph_count)
"""


@pytest.mark.slow
def test_compiled_model_has_no_graph_breaks_and_hooks_and_cache_still_work():
    # a subprocess: the test run's jaxtyping/beartype call checks (pytest addopts) do not trace under dynamo
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", COMPILE_CHECK], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0 and done.stdout.startswith("ok 1"), done.stderr[-3000:]


def test_evaluation_chunked_by_query_length_gives_the_rows_of_padded_chunks():
    """Issue 16.6: EvalSet chunks hold one query length each (no position computed for padding); with a
    causal mask and the readout at the last real token this changes no number."""
    from looplens.models.train.evaluation import EvalSet, _chunks, evaluate_set

    model = _model(feedback=1.0).eval()
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([2] * 40 + [3] * 50)
    tokens = torch.randint(1, CFG["d_vocab"], (90, 3), generator=gen)
    tokens[lengths == 2, 2] = 0  # right padding
    answers = torch.randint(1, CFG["d_vocab"], (90,), generator=gen)
    group = torch.arange(90) % 3
    chunks = _chunks(lengths, 32)
    assert [c[2] for c in chunks] == [2, 2, 3, 3] and [c[1] - c[0] for c in chunks] == [32, 8, 32, 18]
    by_length = EvalSet(tokens, answers, group, [("a", 1), ("b", 2), ("c", 2)], chunks)
    padded = EvalSet(tokens, answers, group, by_length.groups, [(0, 32, 3), (32, 64, 3), (64, 90, 3)])
    rows, rows_padded = evaluate_set(model, by_length, [1, 3]), evaluate_set(model, padded, [1, 3])
    assert [r["n"] for r in rows] == [30, 30, 30, 30, 30, 30]
    for r, q in zip(rows, rows_padded, strict=True):
        assert r["accuracy"] == q["accuracy"] and r["loss"] == pytest.approx(q["loss"], rel=1e-5, abs=1e-6)


COMPILE_TRAIN_CHECK = """
import tempfile, warnings
from pathlib import Path
import pandas as pd, torch
from looplens.models.train import preset, train
warnings.filterwarnings("ignore")
cfg = preset("smoke-composition").with_overrides(["run.max_steps=6", "eval.every=3", "run.log_every=3"])
with tempfile.TemporaryDirectory() as tmp:
    frames = {}
    for flag in ("false", "true"):
        result = train(cfg.with_overrides([f"run.compile={flag}"]), Path(tmp) / flag, progress=False)
        frames[flag] = pd.read_csv(result.path / "metrics.csv")
    a, b = frames["false"], frames["true"]
    assert a[["step", "split", "hops", "iterations"]].equals(b[["step", "split", "hops", "iterations"]])
    assert ((a["loss"] - b["loss"]).abs() <= 1e-4 * (1 + a["loss"].abs())).all(), (a["loss"] - b["loss"]).abs().max()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step really was compiled
print("ok")
"""


@pytest.mark.slow
def test_run_compile_trains_the_same_numbers_as_eager():
    # a subprocess, as above: the test run's jaxtyping/beartype call checks do not trace under dynamo
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", COMPILE_TRAIN_CHECK], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]


def test_batch_indices_reach_the_device_unchanged_and_the_compile_mode_is_checked():
    """Issue 16.3: row indices and hop counts go to the device through sampling.to_device (pinned and
    non-blocking on a GPU); run.compile_mode is torch.compile's mode, validated with the config."""
    import numpy as np
    from looplens.models.train import preset
    from looplens.models.train.sampling import to_device

    rows = np.array([[3, 1], [0, 2]])[:, ::-1]  # a non-contiguous view, as slices of draws can be
    index = to_device(rows, torch.device("cpu"))
    assert index.dtype == torch.int64 and index.tolist() == [[1, 3], [2, 0]]
    cfg = preset("smoke-composition").with_overrides(["run.compile_mode=reduce-overhead"])
    assert cfg.run.compile_mode == "reduce-overhead"
    with pytest.raises(ValueError, match="run.compile_mode"):
        preset("smoke-composition").with_overrides(["run.compile_mode=fastest"])
