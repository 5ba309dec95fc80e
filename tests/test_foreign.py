"""Foreign looped modules behind looplens's hook names (models/foreign.py, ``wrap_looped``).

Two modules are written here as their authors would: the paper's looped GPT-2 (transformers GPT2Block
layers looped R times, tied lm_head) and a Huginn-shaped prelude / recurrent core / coda model with
input injection. Every analysis on the wrapped module must equal the same analysis on the same weights
imported into LoopedTransformer (from_pretrained for the paper's layout), at 1e-4.
"""

from __future__ import annotations

import pandas as pd
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
from looplens.models import LoopedConfig, LoopedTransformer, from_pretrained, retrofit_loop, wrap_looped
from looplens.models.pretrained import _block_weights
from torch import nn
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

L, D, H, V, P, R = 2, 16, 2, 13, 5, 3
ATOL = 1e-4


def gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=V, n_positions=P, n_embd=D, n_layer=L, n_head=H, _attn_implementation="eager",
                      bos_token_id=None, eos_token_id=None)


def causal_mask(n: int) -> torch.Tensor:
    """The additive [1, 1, q, k] mask transformers' eager attention adds to the scores."""
    return torch.full((n, n), float("-inf")).triu(1)[None, None]


def block_out(out):
    # transformers < 5 returns a tuple from GPT2Block, >= 5 (installed: 5.x) the hidden state itself
    return out[0] if isinstance(out, tuple) else out


class PaperLoopedGPT2(nn.Module):
    """The paper's model (gpt_utils_*.py RecurrentGPT2Block), its attribute names and loop."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.token_embedding = nn.Embedding(V, D)
        self.position_embedding = nn.Embedding(P, D)
        self.blocks = nn.ModuleList(GPT2Block(gpt2_config(), layer_idx=i) for i in range(L))
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied
        self.R = R
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("blocks."):
                    p.normal_(0.0, 0.2)
                elif name.startswith("ln_f"):
                    p.add_(0.1 * torch.randn_like(p))
        self.eval()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.token_embedding(tokens) + self.position_embedding(pos)
        mask = causal_mask(tokens.shape[1])
        for _ in range(self.R):
            for block in self.blocks:
                h = block_out(block(h, attention_mask=mask))
        return self.lm_head(self.ln_f(h))


class HuginnShaped(nn.Module):
    """Prelude -> (inject the prelude's output, recurrent core) x num_steps -> coda; Huginn's layout."""

    def __init__(self, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.wte = nn.Embedding(V, D)
        self.prelude = nn.ModuleList([GPT2Block(gpt2_config(), layer_idx=0)])
        self.core_block = nn.ModuleList(GPT2Block(gpt2_config(), layer_idx=i) for i in range(L))
        self.coda = nn.ModuleList([GPT2Block(gpt2_config(), layer_idx=0)])
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "block" in name or name.startswith(("prelude", "coda")):
                    p.normal_(0.0, 0.2)
                elif name.startswith("lm_head"):
                    p.normal_(0.0, 1.0)  # answers that vary with the query (patching needs differing pairs)
        self.eval()

    def forward(self, tokens: torch.Tensor, num_steps: int = R) -> torch.Tensor:
        mask = causal_mask(tokens.shape[1])
        e = self.wte(tokens)
        for block in self.prelude:
            e = block_out(block(e, attention_mask=mask))
        h = e
        for step in range(num_steps):
            if step > 0:  # input injection ("add", as LoopedConfig.input_injection)
                h = h + e
            for block in self.core_block:
                h = block_out(block(h, attention_mask=mask))
        for block in self.coda:
            h = block_out(block(h, attention_mask=mask))
        return self.lm_head(self.ln_f(h))


def huginn_as_looplens(module: HuginnShaped) -> LoopedTransformer:
    """The same weights in LoopedTransformer (n_prelude=1, n_coda=1, input_injection="add")."""
    cfg = LoopedConfig(d_vocab=V, n_ctx=P, d_model=D, n_heads=H, n_blocks=L, n_iterations=R, n_prelude=1, n_coda=1,
                       input_injection="add", positional="none", act_fn="gelu_new", unembed_bias=False,
                       tie_embeddings=False, pad_token_id=0)
    sd = module.state_dict()
    state = {"embed.W_E": sd["wte.weight"], "ln_final.params.w": sd["ln_f.weight"],
             "ln_final.params.b": sd["ln_f.bias"], "unembed.W_U_untied": sd["lm_head.weight"].T.contiguous()}
    for prefix, target, n in (("prelude", "prelude", 1), ("core_block", "core", L), ("coda", "coda", 1)):
        for i in range(n):
            for k, v in _block_weights(f"{prefix}.{i}.", i, sd.__getitem__, H).items():
                state[k.replace("core.", f"{target}.", 1)] = v
    model = LoopedTransformer(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


def queries(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, V, (n, P), generator=g)
    tokens[: n // 2, -1] = 0  # right padding: readout at position P - 2 for half the queries
    return tokens


@pytest.fixture(scope="module")
def paper():
    module = PaperLoopedGPT2()
    config = {**gpt2_config().to_dict()}
    reference = from_pretrained(module.state_dict(), n_iterations=R, config=config)
    wrapped = wrap_looped(module, blocks="blocks", n_iterations=R, final_norm="ln_f", unembed="lm_head",
                          embed="token_embedding", attn="attn", mlp="mlp", iterations_attr="R", pad_token_id=0,
                          n_ctx=P)
    return module, wrapped, reference


@pytest.fixture(scope="module")
def huginn():
    module = HuginnShaped()
    reference = huginn_as_looplens(module)
    wrapped = wrap_looped(module, blocks="core_block", n_iterations=R, prelude="prelude", coda="coda",
                          embed="wte", attn="attn", mlp="mlp", iterations_kwarg="num_steps", pad_token_id=0, n_ctx=P)
    return module, wrapped, reference


def both(request, name):
    return request.getfixturevalue(name)


# ---------------------------------------------------------------------------------------------------
# Hook names and the cache
# ---------------------------------------------------------------------------------------------------
def test_hook_names_per_iteration_are_pinned(paper):
    _, wrapped, _ = paper
    _, cache = wrapped.run_with_cache(queries(), n_iterations=2)
    expected = []  # in firing order
    for t in range(2):
        for l in range(L):
            v = t * L + l
            expected += [f"blocks.{v}.{h}" for h in ("hook_resid_pre", "attn.hook_pattern", "hook_attn_out",
                                                      "hook_mlp_out", "hook_resid_post")]
        expected.append(f"loop.{t}.hook_state")
    assert list(cache.keys()) == expected
    # T iterations give T distinct entries per block, and the aliases name the same tensors
    assert not torch.equal(cache["blocks.1.hook_resid_post"], cache["blocks.3.hook_resid_post"])
    for t in range(2):
        for l in range(L):
            assert torch.equal(cache[f"loop.{t}.blocks.{l}.hook_resid_post"], cache[f"blocks.{t * L + l}.hook_resid_post"])
        assert torch.equal(cache[f"loop.{t}.hook_state"], cache[f"blocks.{t * L + L - 1}.hook_resid_post"])
    assert cache.model.cfg.n_layers == 2 * L


@pytest.mark.parametrize("name", ["paper", "huginn"])
@pytest.mark.parametrize("T", [R, R + 2, 1])
def test_logits_and_cache_equal_looplens_on_the_same_weights(request, name, T):
    module, wrapped, reference = both(request, name)
    x = queries()
    with torch.no_grad():
        got, cache = wrapped.run_with_cache(x, n_iterations=T)
        want, ref_cache = reference.run_with_cache(x, n_iterations=T)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    names = [k for k in cache.keys() if k.startswith("blocks.")]
    assert len(names) >= reference.cfg.n_virtual_layers(T) * 2
    for key in names:
        torch.testing.assert_close(cache[key], ref_cache[key], atol=ATOL, rtol=0, msg=key)
    assert module.R == R if name == "paper" else True  # the loop count is restored after the run


def test_module_is_unchanged_outside_the_wrapper(paper):
    module, wrapped, _ = paper
    x = queries()
    with torch.no_grad():
        direct = module(x)
        with wrapped.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: a * 0)]):
            again = module(x)  # not a wrapper run: the hook points are not on the module's path
    torch.testing.assert_close(direct, again, atol=0, rtol=0)
    assert set(module.state_dict()) == set(PaperLoopedGPT2().state_dict())
    assert sum(p.numel() for p in wrapped.parameters()) == sum(p.numel() for p in module.parameters())


def test_a_hook_changes_the_modules_own_forward(paper):
    _, wrapped, reference = paper
    x = queries()

    def zero(a, hook):
        return torch.zeros_like(a)

    hooks = [("loop.1.blocks.0.hook_attn_out", zero)]
    with torch.no_grad():
        got = wrapped.run_with_hooks(x, fwd_hooks=hooks)
        want = reference.run_with_hooks(x, fwd_hooks=hooks)
        plain = wrapped(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got - plain).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------
# The analyses equal LoopedTransformer's on the same weights
# ---------------------------------------------------------------------------------------------------
def assert_frames_close(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["paper", "huginn"])
def test_logit_lens_and_hops_equal(request, name):
    _, wrapped, reference = both(request, name)
    x = queries()
    answers = torch.arange(1, 7)
    bridges = torch.tensor([[2], [3], [-1], [4], [5], [6]])
    for kw in ({"positions": "all"}, {"positions": "readout", "n_iterations": R + 1}):
        got = logit_lens(wrapped, x, {"answer": answers, "bridge_1": bridges[:, 0]}, progress=False, **kw)
        want = logit_lens(reference, x, {"answer": answers, "bridge_1": bridges[:, 0]}, progress=False, **kw)
        assert len(got) > 0
        assert_frames_close(got, want)
    _, cache = wrapped.run_with_cache(x)
    assert_frames_close(logit_lens(wrapped, x, cache=cache, progress=False),
                        logit_lens(reference, x, progress=False))
    assert_frames_close(locate_hops(wrapped, x, answers, bridges, progress=False),
                        locate_hops(reference, x, answers, bridges, progress=False))


def patching_pairs(model, n: int = 12):
    """Clean / corrupted queries (the same padding) on which the model's answers differ."""
    clean = queries(n)
    corrupted = torch.randint(1, V, clean.shape, generator=torch.Generator().manual_seed(9)) * (clean != 0)
    a, b = model.predict(clean).argmax(-1), model.predict(corrupted).argmax(-1)
    keep = a != b
    assert int(keep.sum()) >= 3
    return clean[keep], corrupted[keep], a[keep], b[keep]


@pytest.mark.parametrize("name", ["paper", "huginn"])
@pytest.mark.parametrize("hook", ["resid_pre", "resid_post"])
def test_patching_effects_equal(request, name, hook):
    _, wrapped, reference = both(request, name)
    args = patching_pairs(wrapped)
    kw = {"hook": hook, "progress": False, "batch_size": 40}
    got = activation_patching(wrapped, *args, **kw)
    want = activation_patching(reference, *args, **kw)
    assert set(got["stage"]) == ({"loop"} if name == "paper" else {"prelude", "loop", "coda"})
    assert got["effect"].abs().max() > 0.1  # something is restored: the comparison is not of zeros
    assert_frames_close(got, want)


def test_attn_out_patching_equal(paper):
    _, wrapped, reference = paper
    args = patching_pairs(wrapped)
    kw = {"hook": "attn_out", "by_position": False, "per_example": True, "progress": False}
    got = activation_patching(wrapped, *args, **kw)
    want = activation_patching(reference, *args, **kw)
    assert got["effect"].abs().max() > 0.01
    assert_frames_close(got, want)


@pytest.mark.parametrize("name", ["paper", "huginn"])
def test_fixed_points_overthinking_and_spectral_radius_equal(request, name):
    _, wrapped, reference = both(request, name)
    x = queries(4)
    answers = torch.tensor([1, 2, 3, 4])
    got = fixed_points(wrapped, x, n_iterations=6, progress=False)
    assert set(got["measure"]) == {"relative_change", "cosine_to_final", "norm", "attention_drift"}
    assert_frames_close(got, fixed_points(reference, x, n_iterations=6, progress=False))
    assert_frames_close(overthinking(wrapped, x, answers, max_iterations=5, progress=False),
                        overthinking(reference, x, answers, max_iterations=5, progress=False))
    got = spectral_radius(wrapped, x, n_iterations=3, n_steps=8, progress=False)
    want = spectral_radius(reference, x, n_iterations=3, n_steps=8, progress=False)
    pd.testing.assert_frame_equal(got, want, check_exact=False, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------
def test_errors_name_the_problem(paper):
    module, wrapped, _ = paper
    with pytest.raises(ValueError, match="blocks='layers'.*no attribute 'layers'"):
        wrap_looped(module, blocks="layers", n_iterations=R)
    with pytest.raises(ValueError, match="expected an nn.ModuleList"):
        wrap_looped(module, blocks="ln_f", n_iterations=R)
    fixed = wrap_looped(PaperLoopedGPT2(), n_iterations=R)
    no_attn = wrap_looped(PaperLoopedGPT2(), n_iterations=R, iterations_attr="R")
    with pytest.raises(ValueError, match="blocks.4.attn.hook_pattern.*does not exist.*'hook_resid_post'"):
        spectral_radius(no_attn, queries(2), n_iterations=2, n_steps=2, progress=False)  # wrapped without attn=
    with pytest.raises(ValueError, match="loops a fixed 3 times.*iterations_attr"):
        fixed(queries(), n_iterations=5)
    wrong = wrap_looped(PaperLoopedGPT2(), n_iterations=2)  # the module loops R=3 times: the count is checked
    with pytest.raises(RuntimeError, match="made more than 4 loop-block calls, expected 2 iterations x 2 blocks"):
        wrong(queries())
    with pytest.raises(ValueError, match="token ids must be in"):
        wrapped(torch.tensor([[V]]))


# ---------------------------------------------------------------------------------------------------
# Training-free retrofitted loops
# ---------------------------------------------------------------------------------------------------
def vanilla_stack(seed: int = 0) -> LoopedTransformer:
    cfg = LoopedConfig(d_vocab=V, n_ctx=P, d_model=D, n_heads=H, n_blocks=4, n_iterations=1, seed=seed, init_std=0.2)
    return LoopedTransformer(cfg).eval()


@pytest.mark.parametrize("K", [1, 3])
def test_retrofitting_every_block_undamped_is_the_model_run_longer(K):
    vanilla = vanilla_stack()
    looped = retrofit_loop(vanilla, (0, 4), K)
    x = queries()
    with torch.no_grad():
        torch.testing.assert_close(looped(x), vanilla(x, n_iterations=K), atol=ATOL, rtol=0)
        # and the per-iteration state is the vanilla model's resid_post after each pass through its stack
        _, cache = looped.run_with_cache(x)
        _, ref = vanilla.run_with_cache(x, n_iterations=K)
    for t in range(K):
        torch.testing.assert_close(cache[f"loop.{t}.hook_state"], ref[f"blocks.{4 * t + 3}.hook_resid_post"],
                                   atol=ATOL, rtol=0)


def test_retrofitted_loop_hook_names_and_damping():
    vanilla = vanilla_stack()
    x = queries()
    looped = retrofit_loop(vanilla, (1, 3), 3, damping=0.5)
    assert (looped.cfg.n_prelude, looped.cfg.n_blocks, looped.cfg.n_coda) == (1, 1, 1)
    _, cache = looped.run_with_cache(x)
    assert [k for k in cache.keys() if k.endswith("resid_post")] == [f"blocks.{v}.hook_resid_post" for v in range(5)]
    # one damped step: x + 0.5 (f(x) - x), f = blocks 1 and 2 of the trained model
    _, ref = vanilla.run_with_cache(x)
    x0 = ref["blocks.1.hook_resid_pre"]
    torch.testing.assert_close(cache["loop.0.hook_state"], x0 + 0.5 * (ref["blocks.2.hook_resid_post"] - x0),
                               atol=ATOL, rtol=0)
    frozen = retrofit_loop(vanilla, (1, 3), 4, damping=0.0)  # a = 0: the loop leaves the state where it is
    fp = fixed_points(frozen, x, n_iterations=4, per_block=False, attention=False, progress=False)
    assert fp.loc[fp["measure"] == "relative_change", "value"].abs().max() == 0.0
    lens = logit_lens(looped, x, progress=False, n_iterations=5)
    assert sorted(lens["stage"].unique()) == ["coda", "embed", "loop", "prelude"]
    with pytest.raises(ValueError, match="damping must be in"):
        retrofit_loop(vanilla, (1, 3), damping=1.5)
    with pytest.raises(ValueError, match="range start < stop within 0..4"):
        retrofit_loop(vanilla, (3, 1))
    with pytest.raises(ValueError, match="vanilla stack"):
        retrofit_loop(LoopedTransformer(vanilla.cfg.replace(n_iterations=2)), (0, 1))


@pytest.mark.slow
def test_shipped_vanilla_retrofit_study():
    """The study in docs/foreign.md ("Retrofitting the shipped vanilla model"): recomputed, its claims checked."""
    from looplens.analyses import shipped_run_path
    from looplens.interp import fixed_point_summary
    from looplens.models.train import load_run

    run = load_run(shipped_run_path() / "vanilla")
    vanilla, ds = run.load_model(), run.dataset
    ents = torch.arange(1, 1 + ds.vocab.n_entities)

    def accuracy(model, split):
        enc = ds.encode(split)
        return float((ents[model.predict(enc.tokens)[:, ents].argmax(-1)] == enc.answers).float().mean())

    assert accuracy(vanilla, "test_inferred_id") == 1.0 and accuracy(vanilla, "test_inferred_ood") == 0.0
    acc = {(a, K): accuracy(retrofit_loop(vanilla, (1, 3), K, damping=a), "test_inferred_id")
           for a in (0.5, 1.0) for K in (2, 8)}
    assert acc[(0.5, 2)] == 1.0  # two half steps keep the answer
    assert acc[(1.0, 2)] < 0.8 and acc[(1.0, 8)] < 0.1 and acc[(0.5, 8)] < 0.1  # more loops break it
    for K in (2, 8, 16):  # OOD stays (near) zero
        assert accuracy(retrofit_loop(vanilla, (1, 3), K, damping=1.0), "test_inferred_ood") < 0.05
    fp = fixed_points(retrofit_loop(vanilla, (1, 3), 1, damping=0.5), ds.encode("test_inferred_id").tokens[:200],
                      n_iterations=32, positions="readout", per_block=False, attention=False, progress=False)
    change = fp[fp["measure"] == "relative_change"].groupby("iteration")["value"].median()
    assert change.iloc[0] > 0.2 and change.iloc[31] < 0.06  # the state slows down ...
    assert not fixed_point_summary(fp, tol=1e-2)["converged"].any()  # ... but settles nowhere within 32


def test_hidden_state_passed_by_keyword(paper):
    """transformers-style callers pass the stream as hidden_states=...: the hooks find it there too."""
    module, _, reference = paper

    class KeywordCaller(PaperLoopedGPT2):
        def forward(self, tokens):
            pos = torch.arange(tokens.shape[1])
            h = self.token_embedding(tokens) + self.position_embedding(pos)
            for _ in range(self.R):
                for block in self.blocks:
                    h = block_out(block(hidden_states=h, attention_mask=causal_mask(tokens.shape[1])))
            return self.lm_head(self.ln_f(h))

    caller = KeywordCaller()
    caller.load_state_dict(module.state_dict())
    wrapped = wrap_looped(caller.eval(), n_iterations=R, embed="token_embedding", pad_token_id=0)
    x = queries()
    with torch.no_grad():
        got, cache = wrapped.run_with_cache(x)
        want, ref = reference.run_with_cache(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["loop.2.blocks.1.hook_resid_pre"], ref["loop.2.blocks.1.hook_resid_pre"],
                               atol=ATOL, rtol=0)
