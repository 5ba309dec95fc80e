"""interp.fixed_points / fixed_point_summary / spectral_radius against closed forms and brute force."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from looplens.interp import fixed_point_summary, fixed_points, spectral_radius
from looplens.interp.plots import fixed_points_figure
from looplens.models import LoopedConfig, LoopedTransformer

D = 8
TOKENS = torch.tensor([[1, 2, 3], [4, 5, 0]])


def affine_model():
    """A loop whose iteration is a known affine map h -> h M + x B at every position.

    Every block is the identity (all block weights zero) and the concat input injection [h; x] @ W_inject
    with W_inject = [M; B] is the only computation, applied at iterations t >= 1 (at t = 0 the state is
    the input x). M is non-normal: spectral radius 0.6, a larger spectral norm. The fixed point is
    h* = x B (I - M)^-1 and h_t - h* = (h_{t-1} - h*) M.
    """
    cfg = LoopedConfig(d_vocab=11, n_ctx=4, d_model=D, n_heads=2, n_blocks=1, n_iterations=3, seed=0,
                       input_injection="concat", positional="none")
    model = LoopedTransformer(cfg)
    gen = torch.Generator().manual_seed(0)
    P = torch.eye(D) + 0.4 * torch.randn(D, D, generator=gen)  # a non-orthogonal change of basis
    eig = torch.tensor([0.6, -0.5, 0.45, 0.3, -0.2, 0.1, 0.05, 0.0])
    M = torch.linalg.solve(P, torch.diag(eig) @ P)  # P^-1 diag P: eigenvalues eig, not normal
    B = 0.5 * torch.randn(D, D, generator=gen)
    with torch.no_grad():
        for p in model.core[0].parameters():
            p.zero_()
        model.W_inject.copy_(torch.cat([M, B]))
    return model.eval(), M.double(), B.double()


def test_fixed_points_of_an_affine_loop_match_the_closed_form():
    model, M, B = affine_model()
    T, tol = 40, 1e-4
    fp = fixed_points(model, TOKENS, n_iterations=T, progress=False)
    rel = fp[(fp.measure == "relative_change") & (fp.block == -1)]
    x = model.embed.W_E.detach().double()[TOKENS]  # [batch, pos, d]
    readout = [2, 1]
    for ex in range(2):
        for pos in range(readout[ex] + 1):
            h_prev = h = x[ex, pos]
            expected = []
            for t in range(T):
                h = h if t == 0 else h @ M + x[ex, pos] @ B
                expected.append(float((h - h_prev).norm() / h_prev.norm()))
                h_prev = h
            got = rel[(rel.example == ex) & (rel.position == pos)].sort_values("iteration")["value"].to_numpy()
            np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6)
            converged = next(t for t in range(T) if all(e < tol for e in expected[t:]))
            summary = fixed_point_summary(fp, tol=tol)
            row = summary[(summary.example == ex) & (summary.position == pos)].iloc[0]
            assert row["converged"] and row["converged_iteration"] == converged
            assert converged > 1  # t = 0 changes nothing (blocks are the identity), yet that is not convergence
            h_star = x[ex, pos] @ B @ torch.linalg.inv(torch.eye(D, dtype=torch.float64) - M)
            assert float((h - h_star).norm() / h_star.norm()) < 1e-5  # the recursion reached h*
    # the one block's resid_post is the state: same relative change for t >= 1; attention has no weights
    per_block = fp[(fp.measure == "relative_change") & (fp.block == 0)]
    merged = per_block.merge(rel, on=["example", "iteration", "position"], suffixes=("", "_state"))
    assert len(merged) == (T - 1) * 5
    np.testing.assert_allclose(merged["value"], merged["value_state"], rtol=1e-6)
    np.testing.assert_allclose(fp[fp.measure == "attention_drift"]["value"], 0.0, atol=1e-7)
    cos = fp[(fp.measure == "cosine_to_final") & (fp.iteration == T - 1)]
    np.testing.assert_allclose(cos["value"], 1.0, atol=1e-6)

    sr = spectral_radius(model, TOKENS, n_iterations=T, n_steps=100, progress=False)
    np.testing.assert_allclose(sr["spectral_radius"], 0.6, rtol=2e-3)
    norm = float(torch.linalg.matrix_norm(M, ord=2))
    assert norm > 0.7  # non-normal: the norm is a strict upper bound here
    np.testing.assert_allclose(sr["spectral_norm"], norm, rtol=1e-3)
    assert (sr["fixed_point_residual"] < 1e-5).all()


def test_spectral_radius_matches_the_full_jacobian_of_a_random_model():
    cfg = LoopedConfig(d_vocab=23, n_ctx=5, d_model=16, n_heads=2, n_blocks=2, n_iterations=3, seed=0)
    model = LoopedTransformer(cfg).eval()
    tokens = torch.tensor([[1, 12, 15, 17]])
    T = 6
    sr = spectral_radius(model, tokens, n_iterations=T, n_steps=200, progress=False)
    # brute force: the 64 x 64 Jacobian of one more iteration at the state after T iterations
    _, cache = model.run_with_cache(tokens, n_iterations=T)
    state = cache[f"loop.{T - 1}.hook_state"]
    J = torch.autograd.functional.jacobian(lambda h: model.iterate(h.view(1, 4, 16), T).reshape(-1),
                                           state.reshape(-1))
    rho = float(torch.linalg.eigvals(J).abs().max())
    sigma = float(torch.linalg.matrix_norm(J, ord=2))
    assert sr["spectral_radius"].iloc[0] == pytest.approx(rho, rel=1e-2)
    assert sr["spectral_norm"].iloc[0] == pytest.approx(sigma, rel=1e-3)
    with torch.no_grad():
        residual = float((model.iterate(state, T) - state).norm() / state.norm())
    assert sr["fixed_point_residual"].iloc[0] == pytest.approx(residual, rel=1e-4)


def test_attention_drift_and_per_block_change_match_the_cache():
    cfg = LoopedConfig(d_vocab=23, n_ctx=5, d_model=16, n_heads=2, n_blocks=2, n_iterations=3, seed=0)
    model = LoopedTransformer(cfg).eval()
    tokens = torch.tensor([[1, 12, 15, 17], [3, 14, 0, 0]])
    fp = fixed_points(model, tokens, n_iterations=4, positions="readout", batch_size=1, progress=False)
    _, cache = model.run_with_cache(tokens, n_iterations=4)
    drift = fp[fp.measure == "attention_drift"]
    for ex, pos, t, l, h in [(0, 3, 1, 0, 1), (1, 1, 3, 1, 0)]:
        a_t = cache[f"loop.{t}.blocks.{l}.attn.hook_pattern"][ex, h, pos]
        a_s = cache[f"loop.{t - 1}.blocks.{l}.attn.hook_pattern"][ex, h, pos]
        row = drift[(drift.example == ex) & (drift.iteration == t) & (drift.block == l) & (drift["head"] == h)]
        assert len(row) == 1 and row["position"].iloc[0] == pos
        assert row["value"].iloc[0] == pytest.approx(float(0.5 * (a_t - a_s).abs().sum()), rel=1e-4, abs=1e-7)
        r_t = cache[f"loop.{t}.blocks.{l}.hook_resid_post"][ex, pos]
        r_s = cache[f"loop.{t - 1}.blocks.{l}.hook_resid_post"][ex, pos]
        block = fp[(fp.measure == "relative_change") & (fp.example == ex) & (fp.iteration == t) & (fp.block == l)]
        assert block["value"].iloc[0] == pytest.approx(float((r_t - r_s).norm() / r_s.norm()), rel=1e-4)
    assert set(fp["position"]) == {3, 1} and fp["is_readout"].all()
    norms = fp[(fp.measure == "norm") & (fp.iteration == 2)].sort_values("example")["value"].to_numpy()
    np.testing.assert_allclose(norms, cache["loop.2.hook_state"][[0, 1], [3, 1]].norm(dim=-1).numpy(), rtol=1e-5)


def test_summary_needs_the_change_to_stay_below_tol():
    rows = [(0, "relative_change", t, -1, -1, 0, 1, True, v) for t, v in enumerate([1.0, 1e-5, 0.3, 1e-3, 1e-5, 1e-6])]
    rows += [(0, "relative_change", t, -1, -1, 1, 2, False, v) for t, v in enumerate([1.0, 0.5, 0.2, 0.1, 0.05, 0.01])]
    fp = pd.DataFrame(rows, columns=["example", "measure", "iteration", "block", "head", "position", "token",
                                     "is_readout", "value"])
    s = fixed_point_summary(fp, tol=1e-2)
    assert s["converged"].tolist() == [True, False]
    assert s["converged_iteration"].tolist()[0] == 3 and s["converged_iteration"].isna().tolist() == [False, True]
    assert s["final_relative_change"].tolist() == [1e-6, 0.01]
    with pytest.raises(ValueError, match="tol"):
        fixed_point_summary(fp, tol=0)


FP_SCHEMA = [("example", "int64"), ("measure", "object"), ("iteration", "int64"), ("block", "int64"),
             ("head", "int64"), ("position", "int64"), ("token", "int64"), ("is_readout", "bool"), ("value", "float64")]
SUMMARY_SCHEMA = [("example", "int64"), ("position", "int64"), ("token", "int64"), ("is_readout", "bool"),
                  ("n_iterations", "int64"), ("tol", "float64"), ("converged", "bool"), ("converged_iteration", "Int64"),
                  ("final_relative_change", "float64")]
SPECTRAL_SCHEMA = [("example", "int64"), ("n_iterations", "int64"), ("spectral_radius", "float64"),
                   ("spectral_norm", "float64"), ("fixed_point_residual", "float64"), ("n_steps", "int64")]


def test_schemas_errors_state_and_figure():
    model, _, _ = affine_model()
    model.train()
    schema = lambda df: [(c, str(t)) for c, t in df.dtypes.items()]  # noqa: E731
    fp = fixed_points(model, TOKENS, n_iterations=5, progress=False)
    assert schema(fp) == FP_SCHEMA
    assert schema(fixed_point_summary(fp)) == SUMMARY_SCHEMA
    assert schema(spectral_radius(model, TOKENS, n_iterations=3, n_steps=4, progress=False)) == SPECTRAL_SCHEMA
    assert set(fp["measure"]) == {"relative_change", "cosine_to_final", "norm", "attention_drift"}
    assert model.training and not any(hp.fwd_hooks for hp in model.hook_dict.values())
    with pytest.raises(ValueError, match="n_iterations"):
        fixed_points(model, TOKENS, n_iterations=0, progress=False)
    with pytest.raises(ValueError, match="positions"):
        fixed_points(model, TOKENS, positions="last", progress=False)
    with pytest.raises(ValueError, match="n_steps"):
        spectral_radius(model, TOKENS, n_steps=0, progress=False)
    fig = fixed_points_figure(fp)
    assert fig.layout.yaxis.type == "log" and len(fig.data) == 3  # one line per position
    assert len(fixed_points_figure(fp, "attention_drift").data) == 2  # one block x two heads
