"""interp.activation_patching's fast resid_pre path (issue 16.5: only layers >= and positions >= the
patched cell are computed) against one hooked forward per cell; models it cannot handle fall back."""

from __future__ import annotations

import pytest
import torch
from looplens.interp import activation_patching, logit_diff
from looplens.interp import patching as patching_module
from looplens.models import LoopedConfig, LoopedTransformer
from looplens.models.foreign import ForeignLoopedModel

V = 12


def make_model(**kw) -> LoopedTransformer:
    base = dict(d_vocab=V, n_ctx=4, d_model=16, n_heads=2, n_blocks=2, n_iterations=3, seed=0)
    base.update(kw)
    model = LoopedTransformer(LoopedConfig(**base))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # large random weights: answers depend on the query, effects are far from 0 / 1
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4
                    + (1.0 if p.ndim == 1 and p.shape[0] == model.cfg.d_model else 0.0))
    return model.eval()


def padded_pairs(n: int = 24):
    """Right-padded queries of lengths 2..4; corrupted differs from clean in one random non-pad token."""
    gen = torch.Generator().manual_seed(5)
    lengths = torch.arange(n) % 3 + 2
    clean = torch.randint(1, V, (n, 4), generator=gen) * (torch.arange(4) < lengths[:, None])
    corrupted = clean.clone()
    where = (torch.rand(n, generator=gen) * lengths).long()
    corrupted[torch.arange(n), where] = (clean[torch.arange(n), where] + 1 + torch.randint(0, V - 2, (n,), generator=gen)
                                         ) % (V - 1) + 1
    return clean, corrupted, torch.randint(1, V, (n,), generator=gen), torch.randint(1, V, (n,), generator=gen)


def reference(model, clean, corrupted, clean_ans, corrupted_ans):
    """Effect of every (layer, position) cell by a hooked forward of the whole model per cell: [layers, pos]."""
    T = model.cfg.n_iterations
    rows = torch.arange(clean.shape[0])
    readout = model.readout_positions(clean)
    with torch.no_grad():
        logits, cache = model.run_with_cache(clean)
        m_clean = logit_diff(logits[rows, readout], clean_ans, corrupted_ans).mean()
        m_corr = logit_diff(model(corrupted)[rows, readout], clean_ans, corrupted_ans).mean()
        n_layers = model.cfg.n_prelude + T * model.cfg.n_blocks + model.cfg.n_coda
        out = torch.empty(n_layers, clean.shape[1])
        for v in range(n_layers):
            name = f"blocks.{v}.hook_resid_pre"
            for p in range(clean.shape[1]):
                def hook(x, hook, p=p, name=name):
                    x = x.clone()
                    x[:, p] = cache[name][:, p]
                    return x
                with model.hooks(fwd_hooks=[(name, hook)]):
                    m = logit_diff(model(corrupted)[rows, readout], clean_ans, corrupted_ans).mean()
                out[v, p] = (m - m_corr) / (m_clean - m_corr)
    return out


def sweep(model, args, **kw):
    got = activation_patching(model, *args, hook="resid_pre", progress=False, **kw)
    return torch.tensor(got["effect"].to_numpy(), dtype=torch.float32).view(-1, args[0].shape[1])


@pytest.fixture
def count_fast(monkeypatch):
    calls = []
    real = patching_module._sweep_suffix

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(patching_module, "_sweep_suffix", spy)
    return calls


@pytest.mark.parametrize("kw", [{}, {"positional": "none", "n_prelude": 1}, {"n_blocks": 4, "n_iterations": 1}])
def test_fast_path_equals_one_forward_per_cell_with_padding(kw, count_fast):
    model = make_model(**kw)
    args = padded_pairs()
    want = reference(model, *args)
    got = sweep(model, args)
    assert count_fast == [1]  # the fast path ran
    assert want.abs().max() > 0.1 and want.std() > 0.05  # effects that differ between cells
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_fast_path_per_example_and_subsets_equal_the_exact_path(count_fast, monkeypatch):
    model = make_model()
    args = padded_pairs()
    kw = {"hook": "resid_pre", "progress": False, "per_example": True, "layers": [1, 4], "positions": [0, 2]}
    fast = activation_patching(model, *args, **kw)
    monkeypatch.setattr(patching_module, "_fast_path_applies", lambda *a: False)
    exact = activation_patching(model, *args, **kw)
    assert count_fast == [1]
    assert (fast["effect"] - exact["effect"]).abs().max() < 1e-4
    assert fast[["layer", "position", "pair"]].equals(exact[["layer", "position", "pair"]])


@pytest.mark.parametrize("kw", [{"input_injection": "add"}, {"feedback": 1.0}, {"n_coda": 1}])
def test_models_the_fast_path_cannot_handle_fall_back_to_the_exact_path(kw, count_fast):
    model = make_model(**kw)
    args = padded_pairs()
    torch.testing.assert_close(sweep(model, args), reference(model, *args), atol=1e-4, rtol=0)
    assert count_fast == []


def test_foreign_wrappers_other_hooks_and_options_fall_back():
    applies = patching_module._fast_path_applies
    model = make_model()
    assert applies(model, "resid_pre", True)
    assert not applies(model, "resid_post", True) and not applies(model, "resid_pre", False)
    foreign = object.__new__(ForeignLoopedModel)  # a wrapper of another library's model: its blocks may differ
    foreign.__dict__.update(model.__dict__)
    assert not applies(foreign, "resid_pre", True)
    with model.hooks(fwd_hooks=[("blocks.2.hook_resid_mid", lambda x, hook: x)]):  # a caller's hook must fire
        assert not applies(model, "resid_pre", True)


def test_position_0_reuses_the_clean_run_with_a_ready_cache_and_one_token_queries(count_fast, monkeypatch):
    """A patch at position 0 restores that position's whole input, so from the patched layer on it is the clean
    run's: the fast path takes its keys / values from the clean run (a row read at position 0 gets the clean
    metric); with a ready clean cache the clean logits come from its last residual. Both equal one forward
    per cell; a cache without every layer's resid_pre still works (no reuse)."""
    model = make_model()
    clean, corrupted, ca, xa = padded_pairs()
    clean[:4, 1:] = 0  # one-token queries, corrupted at position 0
    corrupted[:4] = clean[:4]
    corrupted[:4, 0] = clean[:4, 0] % (V - 1) + 1
    args = (clean, corrupted, ca, xa)
    want = reference(model, *args)
    kv_widths = []
    real_kv = patching_module._kv
    monkeypatch.setattr(patching_module, "_kv", lambda m, p, r: kv_widths.append(r.shape[1]) or real_kv(m, p, r))
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    torch.testing.assert_close(sweep(model, args, clean_cache=cache), want, atol=1e-4, rtol=0)
    assert 1 in kv_widths  # position 0's keys / values were taken from the clean run
    torch.testing.assert_close(sweep(model, args), want, atol=1e-4, rtol=0)
    with torch.no_grad():
        _, partial = model.run_with_cache(clean, names_filter=lambda n: n == "blocks.4.hook_resid_pre")
    torch.testing.assert_close(sweep(model, args, clean_cache=partial, layers=[4]), want[4:5], atol=1e-4, rtol=0)
    assert count_fast == [1, 1, 1]
