"""Importing the paper's checkpoints (models/pretrained.py, `looplens import-checkpoint`) and the paper
presets' fidelity table (docs/fidelity.md).

The reference for every logit check is transformers' own GPT-2 forward at a small random config (no
downloads): an L-block checkpoint looped R times must equal a GPT2LMHeadModel of R * L layers whose layer
t * L + l carries block l's weights (fp32, eval mode, atol 1e-4).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import torch
from looplens.models import LoopedTransformer, from_pretrained
from looplens.models.pretrained import convert_state
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

ROOT = Path(__file__).resolve().parents[1]
L, D, H, V, P = 2, 32, 4, 23, 6
ATOL = 1e-4


def gpt2_config(n_layer: int, vocab: int = V, positions: int = P) -> GPT2Config:
    return GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=D, n_layer=n_layer, n_head=H,
                      _attn_implementation="eager", bos_token_id=None, eos_token_id=None)


def random_blocks(seed: int = 0) -> torch.nn.ModuleList:
    torch.manual_seed(seed)
    blocks = torch.nn.ModuleList(GPT2Block(gpt2_config(L)) for _ in range(L))
    with torch.no_grad():
        for p in blocks.parameters():  # large random weights: every path (biases, LN) matters
            p.normal_(0.0, 0.3)
    return blocks


def paper_state(blocks, seed: int = 1, vocab: int = V, positions: int | None = P) -> dict[str, torch.Tensor]:
    """A RecurrentGPT2Block state dict (gpt_utils_systematicity.py key names)."""
    g = torch.Generator().manual_seed(seed)
    state = {"token_embedding.weight": torch.randn(vocab, D, generator=g),
             "ln_f.weight": 1 + 0.1 * torch.randn(D, generator=g), "ln_f.bias": 0.1 * torch.randn(D, generator=g)}
    if positions:
        state["position_embedding.weight"] = torch.randn(positions, D, generator=g)
    for i, block in enumerate(blocks):
        for key, value in block.state_dict().items():
            state[f"blocks.{i}.{key}"] = value.clone()
    state["lm_head.weight"] = state["token_embedding.weight"]  # tied, as in the paper's model
    return state


def unrolled_reference(blocks, state: dict, R: int) -> GPT2LMHeadModel:
    """transformers' GPT2LMHeadModel with R * L layers; layer t * L + l carries block l."""
    positions = state["position_embedding.weight"].shape[0] if "position_embedding.weight" in state else P
    ref = GPT2LMHeadModel(gpt2_config(R * L, vocab=state["token_embedding.weight"].shape[0],
                                      positions=positions)).eval()
    weights = {"transformer.wte.weight": state["token_embedding.weight"],
               "transformer.ln_f.weight": state["ln_f.weight"], "transformer.ln_f.bias": state["ln_f.bias"],
               "lm_head.weight": state["token_embedding.weight"]}
    # NoPE (the depth code): transformers' GPT-2 always adds positions, so give it zero ones
    weights["transformer.wpe.weight"] = state.get("position_embedding.weight", torch.zeros(P, D))
    for t in range(R):
        for l, block in enumerate(blocks):
            for key, value in block.state_dict().items():
                weights[f"transformer.h.{t * L + l}.{key}"] = value
    missing, unexpected = ref.load_state_dict(weights, strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("attn.bias")], (missing, unexpected)
    return ref


def tokens(n: int = 7, length: int = P, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("fmt", ["safetensors", "pt-state-dict", "training-checkpoint-compiled"])
def test_paper_checkpoint_is_logit_equal_to_transformers_gpt2(tmp_path, fmt, R):
    blocks = random_blocks()
    state = paper_state(blocks)
    if fmt == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path))  # safetensors refuses shared memory
    elif fmt == "pt-state-dict":
        path = tmp_path / "model.pt"
        torch.save(state, path)
    else:  # what train_*.py write, trained with torch.compile: '_orig_mod.' keys plus optimizer state
        path = tmp_path / "checkpoint_epoch_11.pt"
        opt = torch.optim.AdamW(blocks.parameters(), lr=1e-4)
        torch.save({"epoch": 10, "model_state_dict": {f"_orig_mod.{k}": v for k, v in state.items()},
                    "optimizer_state_dict": opt.state_dict(), "loss": 0.5}, path)
    (tmp_path / "config.json").write_text(json.dumps(gpt2_config(L).to_dict()))
    model = from_pretrained(path, n_iterations=R)
    assert model.cfg.n_blocks == L and model.cfg.act_fn == "gelu_new" and not model.cfg.unembed_bias
    ref = unrolled_reference(blocks, state, R)
    x = tokens()
    with torch.no_grad():
        expected = ref(x).logits
        got = model(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # the classmethod is the same import
    again = LoopedTransformer.from_pretrained(path, n_iterations=R)
    torch.testing.assert_close(again(x), got, atol=0, rtol=0)


@pytest.mark.parametrize("R", [1, 2])
def test_gpt2lmheadmodel_directory_is_logit_equal(tmp_path, R):
    torch.manual_seed(5)
    small = GPT2LMHeadModel(gpt2_config(L)).eval()
    with torch.no_grad():
        for p in small.parameters():
            p.normal_(0.0, 0.3)
    small.save_pretrained(tmp_path / "ckpt")
    blocks = small.transformer.h
    state = {"token_embedding.weight": small.transformer.wte.weight.detach(),
             "position_embedding.weight": small.transformer.wpe.weight.detach(),
             "ln_f.weight": small.transformer.ln_f.weight.detach(), "ln_f.bias": small.transformer.ln_f.bias.detach()}
    ref = unrolled_reference(blocks, state, R)
    model = LoopedTransformer.from_pretrained(tmp_path / "ckpt", n_iterations=R)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=ATOL, rtol=0)
    if R == 1:  # one iteration is the saved model itself
        with torch.no_grad():
            torch.testing.assert_close(model(x), small(x).logits, atol=ATOL, rtol=0)


def test_nope_checkpoint_of_the_depth_code(tmp_path):
    """gpt_utils_extrapolation.py with positional_embedding_type='none' has no position_embedding."""
    blocks = random_blocks(2)
    state = paper_state(blocks, positions=None)
    model = from_pretrained(state, n_iterations=2, n_heads=H, n_ctx=50)
    assert model.cfg.positional == "none"
    ref = unrolled_reference(blocks, state, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), ref(tokens()).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.update({"blocks.0.attn.extra": torch.zeros(1)}), "unknown tensor(s) ['blocks.0.attn.extra']"),
    (lambda s: s.update({"blocks.1.mlp.c_proj.weight": torch.zeros(5, D)}), "blocks.1.mlp.c_proj.weight has shape (5, 32)"),
    (lambda s: s.pop("ln_f.bias"), "missing tensor 'ln_f.bias'"),
    (lambda s: s.update({"lm_head.bias": torch.zeros(V)}), "lm_head has a bias"),
])
def test_bad_checkpoints_give_one_line_errors(tmp_path, edit, message):
    state = paper_state(random_blocks())
    edit(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        from_pretrained(path, n_iterations=2, n_heads=H)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_missing_config_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(paper_state(random_blocks()), path)
    with pytest.raises(ValueError, match="number of heads cannot be read .* --n-heads"):
        from_pretrained(path, n_iterations=1)
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown file type '.txt'"):
        from_pretrained(tmp_path / "junk.txt")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        from_pretrained(tmp_path)


def test_pickles_load_with_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code from a checkpoint",))

    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"x": Evil()}}, path)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        from_pretrained(path, n_heads=H)


def test_untied_head_is_kept(tmp_path):
    state = paper_state(random_blocks())
    state["lm_head.weight"] = torch.randn(V, D)
    cfg, converted = convert_state(state, None, 1, n_heads=H)
    assert not cfg.tie_embeddings and torch.equal(converted["unembed.W_U_untied"], state["lm_head.weight"].T)


# ---------------------------------------------------------------------------------------------------
# looplens import-checkpoint: a run directory that eval, the app and interp open
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The paper's data directory (our exporter's output) and a paper-layout checkpoint trained on nothing,
    whose vocabulary follows vocab.json with '<pad>' prepended (load_vocab)."""
    from looplens.data import DataConfig, build_dataset, export_grokked

    root = tmp_path_factory.mktemp("imported")
    cfg = DataConfig(task="composition", world="random-tail", n_entities=30, n_relations=6, out_degree=3,
                     phi=2.0, test_id_fraction=0.1, eval_max=40, seed=3)
    grokked = export_grokked(build_dataset(cfg, root / "ds"), root / "paper-data")
    vocab = ["<pad>", *json.loads((grokked / "vocab.json").read_text())]
    blocks = random_blocks(4)
    state = paper_state(blocks, vocab=len(vocab), positions=5)  # the paper's n_positions = 5
    ckpt = root / "checkpoint_epoch_3.pt"
    torch.save({"epoch": 2, "model_state_dict": state}, ckpt)
    return root, grokked, ckpt, state, vocab


def test_import_checkpoint_cli_round_trip(imported, tmp_path):
    from looplens.analyses.cli import main
    from looplens.models.train import load_run

    root, grokked, ckpt, state, vocab = imported
    out = root / "runs" / "paper-r3"
    assert main(["import-checkpoint", str(ckpt), "--iterations", "3", "--n-heads", str(H), "--data", str(grokked),
                 "--out", str(out)]) == 0
    run = load_run(out)
    model = run.load_model()
    assert model.cfg.n_iterations == 3 and run.config.train_iterations == 3
    # token ids went through vocab.json: our e5 is the paper's <e_5>
    ours, theirs = model.vocab.encode("e5")[0], vocab.index("<e_5>")
    assert torch.equal(model.W_E[ours], state["token_embedding.weight"][theirs])
    # the paper's model on the paper's ids gives the logits ours gives on our ids (for the kept tokens)
    blocks = torch.nn.ModuleList(GPT2Block(gpt2_config(L)) for _ in range(L))
    for i, block in enumerate(blocks):
        block.load_state_dict({k[len(f"blocks.{i}."):]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")})
    ref = unrolled_reference(blocks, state, 3)
    query = ["e5 r2 r4", "e11 r0 r1"]
    ids = model.to_tokens(query)
    paper_ids = torch.tensor([[vocab.index(f"<{t[0]}_{t[1:]}>") for t in q.split()] for q in query])
    rows = [vocab.index("<pad>")] + [vocab.index(f"<{t[0]}_{t[1:]}>") for t in model.vocab.tokens[1:]]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(paper_ids).logits[..., rows], atol=ATOL, rtol=0)
    # eval opens it
    assert main(["eval", str(out), "--iterations", "1:4", "--out", str(tmp_path / "eval.csv")]) == 0
    assert (tmp_path / "eval.csv").read_text().count("\n") > 4
    # refuses to overwrite, and a second import reuses the imported dataset
    assert main(["import-checkpoint", str(ckpt), "--iterations", "3", "--n-heads", str(H), "--data", str(grokked),
                 "--out", str(out)]) == 2
    assert len(list((root / "runs" / ".datasets").iterdir())) == 1


@pytest.mark.slow
def test_imported_run_opens_in_interp_and_app(imported, monkeypatch):
    from looplens.analyses.cli import main
    from looplens.app.runs import RUNS_ENV
    from looplens.interp import logit_lens
    from looplens.models.train import load_run
    from streamlit.testing.v1 import AppTest

    root, grokked, ckpt, _, _ = imported
    out = root / "runs" / "paper-r2"
    assert main(["import-checkpoint", str(ckpt), "--iterations", "2", "--n-heads", str(H), "--data", str(grokked),
                 "--out", str(out)]) == 0
    run = load_run(out)
    model = run.load_model()
    frame = logit_lens(model, model.to_tokens(["e1 r0 r1", "e2 r3"]))
    assert len(frame) and {0, 1} <= set(frame["iteration"])  # -1: the embedding
    from looplens.app import cli as app_cli

    monkeypatch.setenv(RUNS_ENV, str(out))
    at = AppTest.from_file(str(Path(app_cli.__file__).with_name("main.py")), default_timeout=120).run()
    assert not at.exception and not at.error, ([e.value for e in at.exception], [e.value for e in at.error])
    for page in ("training", "query", "iterations", "patching", "depth"):
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception and not at.error, (page, [e.value for e in at.exception], [e.value for e in at.error])
    # the import evaluated the model once: curves and summary have its accuracy
    assert len(run.metrics) and set(run.summary["final_accuracy"]) >= {"test_inferred_id", "test_inferred_ood"}


def test_import_errors_name_the_problem(imported, tmp_path):
    from looplens.analyses.cli import main

    root, grokked, ckpt, _, _ = imported
    assert main(["import-checkpoint", str(ckpt), "--iterations", "2", "--data", str(tmp_path),
                 "--n-heads", str(H), "--out", str(tmp_path / "r")]) == 2
    small = tmp_path / "small.pt"
    torch.save(paper_state(random_blocks(), vocab=7, positions=5), small)
    assert main(["import-checkpoint", str(small), "--iterations", "2", "--data", str(grokked), "--n-heads", str(H),
                 "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------------
# docs/fidelity.md <-> the paper presets
# ---------------------------------------------------------------------------------------------------
def fidelity_rows(section: str) -> list[tuple[str, str]]:
    """(looplens key, preset value) of every row of a docs/fidelity.md table with both in backticks."""
    text = (ROOT / "docs" / "fidelity.md").read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6:
            continue
        key, value = re.fullmatch(r"`([a-z_]+\.[a-z_]+)`.*", cells[3]), re.fullmatch(r"`(.+)`", cells[4])
        if key and value:
            rows.append((key.group(1), value.group(1)))
    return rows


@pytest.mark.parametrize(("section", "preset_name"), [("Composition", "paper-composition-code"),
                                                        ("Depth extrapolation", "paper-depth")])
def test_fidelity_table_matches_the_paper_presets(section, preset_name):
    from looplens.models.train.presets import preset

    cfg = preset(preset_name)
    rows = fidelity_rows(section)
    assert len(rows) >= 15, rows
    for key, value in rows:
        want = tomllib.loads(f"v = {value}")["v"]
        assert cfg.get(key) == want, f"{preset_name}: {key} is {cfg.get(key)!r}, docs/fidelity.md says {want!r}"


def test_text_and_code_presets_differ_only_where_the_paper_does():
    from looplens.models.train.presets import preset

    text, code = preset("paper-composition"), preset("paper-composition-code")
    assert sorted(text.differences(code)) == ["optim.batch_size", "optim.decay_steps", "optim.schedule",
                                              "optim.weight_decay", "run.max_steps"]
    assert text.optim.label_smoothing == code.optim.label_smoothing == 0.1  # the text gives none: the code's
    dyn = preset("paper-depth-dynamic").eval
    assert (dyn.halting, dyn.halting_eps, dyn.halting_entropy, dyn.halting_max_iterations) == ("kl+entropy", 0.5, 3.24, 8)


def test_gpt2lmheadmodel_ids_map_through_added_tokens(imported, tmp_path):
    """The predecessor's GPT2LMHeadModel has GPT-2's own tokens first and the data's tokens added after
    (--add_tokens): added_tokens.json gives their ids."""
    from looplens.models.pretrained import import_run
    from looplens.models.train import load_run

    _, grokked, _, _, vocab = imported
    listed = vocab[1:]  # vocab.json's tokens (no <pad> in it)
    base = 11  # stand-in for GPT-2's 50,257 own tokens
    torch.manual_seed(6)
    hf = GPT2LMHeadModel(gpt2_config(L, vocab=base + len(listed), positions=5)).eval()
    hf.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "added_tokens.json").write_text(json.dumps({t: base + i for i, t in enumerate(listed)}))
    run = load_run(import_run(tmp_path / "ckpt", tmp_path / "runs" / "hf", 2, data=grokked))
    model = run.load_model()
    e7 = model.vocab.encode("e7")[0]
    assert torch.equal(model.W_E[e7], hf.transformer.wte.weight[base + listed.index("<e_7>")].detach())
    assert torch.equal(model.W_E[model.vocab.pad_id], torch.zeros(D))  # GPT-2 has no <pad>: a zero row


def test_embed_dropout_is_separate_from_block_dropout():
    """The depth code's GPT2Config: embd_pdrop 0 (--dropout), attn/resid_pdrop 0.1 (defaults)."""
    from looplens.models import LoopedConfig

    cfg = LoopedConfig(d_vocab=V, n_ctx=P, d_model=D, n_heads=H, n_blocks=1, n_iterations=2, dropout=0.5,
                       embed_dropout=0.0, seed=0)
    model = LoopedTransformer(cfg).train()
    x = tokens()
    torch.manual_seed(0)
    embedded = model.embed_tokens(x)
    expected = model.embed.W_E[x] + model.pos_embed.W_pos[: x.shape[1]]
    torch.testing.assert_close(embedded, expected)  # no embedding dropout in training mode
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))  # the blocks' dropout still acts
    same = LoopedTransformer(cfg.replace(embed_dropout=None)).train()  # None: the blocks' rate
    assert same.embed_dropout.p == 0.5 and model.embed_dropout.p == 0.0
    with pytest.raises(ValueError, match="embed_dropout must be"):
        cfg.replace(embed_dropout=1.5)


@pytest.mark.slow
def test_imported_run_goes_through_every_study(imported):
    """`looplens report` on an imported run: every applicable study (logit lens, hop locator, activation
    patching, fixed points, overthinking, halting, grokking stages, shortcut) runs on it."""
    import pandas as pd
    from looplens.analyses.cli import main

    root, grokked, ckpt, _, _ = imported
    out = root / "runs" / "paper-r4"
    assert main(["import-checkpoint", str(ckpt), "--iterations", "4", "--n-heads", str(H), "--data", str(grokked),
                 "--out", str(out)]) == 0
    assert main(["report", str(out), "--quiet", "--n-queries", "16", "--max-iterations", "6", "--patch-pairs", "4",
                 "--fixed-point-iterations", "6"]) == 0
    studies = {p.name for p in (out / "report" / "studies").iterdir()}
    assert {"grokking", "halting", "mechanism", "overthinking", "systematic"} <= studies
    claims = pd.read_csv(out / "report" / "tables" / "claims.csv")
    assert len(claims) == 6 and claims["verdict"].notna().all()
