"""Import trained checkpoints of the paper's code and its predecessor as a LoopedTransformer.

Two weight layouts are read (docs/fidelity.md, "Checkpoints the paper's code writes"):

- **paper** (Loop-Think-Generalize ``gpt_utils_*.py: RecurrentGPT2Block``): ``token_embedding.weight``,
  ``position_embedding.weight`` (learned positions only), ``blocks.{i}.{ln_1,attn.c_attn,attn.c_proj,ln_2,
  mlp.c_fc,mlp.c_proj}.*``, ``ln_f.*``, ``lm_head.weight`` (the tied embedding). As a state-dict file
  (``.safetensors``, ``.pt``, ``.bin``) or as the training scripts' checkpoint dict, whose
  ``model_state_dict`` holds those keys (prefixed ``_orig_mod.`` when trained with ``torch.compile``).
  The GPT-2 settings the keys cannot tell (heads, activation, LayerNorm eps) come from a ``config.json``
  beside the file (a GPT2Config) or from arguments; otherwise GPT2Config's defaults apply.
- **hf** (GrokkedTransformer, transformers ``save_pretrained`` of ``GPT2LMHeadModel``): a directory with
  ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin`` (keys ``transformer.wte.weight``,
  ``transformer.h.{i}.*``, ...).

An L-block checkpoint looped R times is the GPT-2 of R * L layers whose layer ``t * L + l`` carries block
``l``'s weights (``tests/test_pretrained.py`` checks the logits against transformers' own forward).
Pickled files are read with ``torch.load(weights_only=True)`` only: no code in a checkpoint runs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# GPT2Config's defaults (transformers), used when no config.json says otherwise.
GPT2_DEFAULTS = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
_ACT = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu",
        "swish": "silu"}
_PAPER_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_IGNORED_BLOCK_KEYS = ("attn.bias", "attn.masked_bias")  # transformers' causal-mask buffers, not weights
_BLOCK_KEYS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
               "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ---------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------
def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is one clear line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path}: cannot be read with torch.load(weights_only=True) ({first})") from None


def _read_weights(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"checkpoint {path}: not a readable safetensors file ({err})") from None
    if path.suffix in (".pt", ".bin", ".pth"):
        obj = _torch_load(path)
        if isinstance(obj, Mapping) and "model_state_dict" in obj:  # the paper's training checkpoints
            obj = obj["model_state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise ValueError(f"checkpoint {path}: expected a state dict (name -> tensor) or a dict with "
                             "'model_state_dict'")
        return dict(obj)
    raise ValueError(f"checkpoint {path}: unknown file type {path.suffix!r}; expected .safetensors, .pt or .bin")


def read_checkpoint(src: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any] | None, Path]:
    """(state dict with any ``_orig_mod.`` prefix removed, the config.json beside it or None, weights path).

    ``src`` is a weights file or a directory holding ``model.safetensors`` / ``pytorch_model.bin``.
    """
    src = Path(src)
    if src.is_dir():
        found = [src / name for name in _WEIGHT_FILES if (src / name).is_file()]
        if not found:
            raise FileNotFoundError(f"checkpoint directory {src}: no {' or '.join(_WEIGHT_FILES)}")
        weights = found[0]
    elif src.is_file():
        weights = src
    else:
        raise FileNotFoundError(f"checkpoint {src}: no such file or directory")
    state = _read_weights(weights)
    if state and all(k.startswith("_orig_mod.") for k in state):
        state = {k[len("_orig_mod."):]: v for k, v in state.items()}
    config_path = weights.parent / "config.json"
    hf_config = None
    if config_path.is_file():
        try:
            hf_config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path}: not valid JSON ({err})") from None
        if not isinstance(hf_config, dict):
            raise ValueError(f"{config_path}: expected a JSON object (a GPT2Config)")
    return state, hf_config, weights


def checkpoint_layout(state: Mapping[str, Tensor]) -> str:
    """"paper" (RecurrentGPT2Block) or "hf" (GPT2LMHeadModel); ValueError otherwise."""
    if "token_embedding.weight" in state:
        return "paper"
    if "transformer.wte.weight" in state:
        return "hf"
    sample = ", ".join(sorted(state)[:4])
    raise ValueError(f"checkpoint: neither the paper's layout (token_embedding.weight, blocks.*) nor GPT2LMHeadModel's "
                     f"(transformer.wte.weight, transformer.h.*); its first keys: {sample}")


# ---------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------
def _block_weights(prefix: str, i: int, get, n_heads: int) -> dict[str, Tensor]:
    """One GPT2Block's Conv1D weights ([in, out]) -> looplens's per-head weights of core block ``i``."""

    def shaped(key: str, *shape: int) -> Tensor:
        t = get(prefix + key)
        if tuple(t.shape) != shape:
            raise ValueError(f"checkpoint: {prefix}{key} has shape {tuple(t.shape)}, expected {shape}")
        return t

    d_model = get(prefix + "ln_1.weight").shape[0]
    if d_model % n_heads:
        raise ValueError(f"checkpoint: d_model {d_model} is not divisible by n_heads {n_heads}")
    d_head = d_model // n_heads
    d_mlp = get(prefix + "mlp.c_fc.weight").shape[-1]
    # c_attn is [d_model, 3 * d_model]: q | k | v side by side, each [d_model, head * d_head]
    qkv = shaped("attn.c_attn.weight", d_model, 3 * d_model).reshape(d_model, 3, n_heads, d_head).permute(1, 2, 0, 3)
    b_qkv = shaped("attn.c_attn.bias", 3 * d_model).reshape(3, n_heads, d_head)
    out = {
        "ln1.w": shaped("ln_1.weight", d_model), "ln1.b": shaped("ln_1.bias", d_model),
        "attn.W_Q": qkv[0], "attn.W_K": qkv[1], "attn.W_V": qkv[2],
        "attn.b_Q": b_qkv[0], "attn.b_K": b_qkv[1], "attn.b_V": b_qkv[2],
        "attn.W_O": shaped("attn.c_proj.weight", d_model, d_model).reshape(n_heads, d_head, d_model),
        "attn.b_O": shaped("attn.c_proj.bias", d_model),
        "ln2.w": shaped("ln_2.weight", d_model), "ln2.b": shaped("ln_2.bias", d_model),
        "mlp.W_in": shaped("mlp.c_fc.weight", d_model, d_mlp), "mlp.b_in": shaped("mlp.c_fc.bias", d_mlp),
        "mlp.W_out": shaped("mlp.c_proj.weight", d_mlp, d_model), "mlp.b_out": shaped("mlp.c_proj.bias", d_model),
    }
    return {f"core.{i}.{k}": v.contiguous() for k, v in out.items()}


def convert_state(
    state: Mapping[str, Tensor],
    hf_config: Mapping[str, Any] | None = None,
    n_iterations: int = 1,
    **overrides: Any,
):
    """(LoopedConfig, looplens state dict) from a paper- or hf-layout state dict.

    ``overrides`` set LoopedConfig fields the weights cannot tell (n_heads, act_fn, ln_eps, n_ctx,
    pad_token_id, input_injection, ...); they win over ``hf_config`` (a GPT2Config dict).
    Raises ValueError naming unknown keys, missing keys or shape mismatches.
    """
    from looplens.models.config import LoopedConfig

    layout = checkpoint_layout(state)
    if hf_config is None and overrides.get("n_heads") is None:
        raise ValueError("checkpoint: no GPT-2 config: the number of heads cannot be read from the weights; put the "
                         "GPT2Config's config.json beside the weights or pass n_heads (CLI: --n-heads)")
    cfg_in = {**GPT2_DEFAULTS, **(hf_config or {})}
    if cfg_in.get("add_cross_attention"):
        raise ValueError("checkpoint config: add_cross_attention is set; looplens blocks have no cross-attention")
    if cfg_in.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("checkpoint config: scale_attn_by_inverse_layer_idx is set; looplens does not scale attention "
                         "by layer index")
    if cfg_in.get("scale_attn_weights", True) is False:
        raise ValueError("checkpoint config: scale_attn_weights is false; looplens always scales by 1/sqrt(d_head)")
    if layout == "paper":
        names = {"embed": "token_embedding.weight", "pos": "position_embedding.weight", "ln_f": "ln_f.",
                 "head": "lm_head.weight", "block": _PAPER_BLOCK, "prefix": "blocks.{i}."}
        extra_ok = {"pe"}  # the sinusoidal buffer: refused below with its own message
    else:
        names = {"embed": "transformer.wte.weight", "pos": "transformer.wpe.weight", "ln_f": "transformer.ln_f.",
                 "head": "lm_head.weight", "block": _HF_BLOCK, "prefix": "transformer.h.{i}."}
        extra_ok = set()
    if "pe" in state:
        raise ValueError("checkpoint: sinusoidal positions (buffer 'pe') are not supported; looplens has learned "
                         "positions or none")

    used: set[str] = set()

    def get(key: str) -> Tensor:
        if key not in state:
            raise ValueError(f"checkpoint: missing tensor {key!r}")
        used.add(key)
        return state[key].detach().to(torch.float32)

    blocks = sorted({int(m.group(1)) for k in state if (m := names["block"].match(k))})
    if not blocks:
        raise ValueError("checkpoint: no transformer blocks found")
    if blocks != list(range(len(blocks))):
        raise ValueError(f"checkpoint: block indices {blocks} are not 0..{len(blocks) - 1}")
    for k in state:
        m = names["block"].match(k)
        if m and m.group(2) in _IGNORED_BLOCK_KEYS:
            used.add(k)
    W_E = get(names["embed"])
    d_vocab, d_model = W_E.shape
    n_heads = overrides.pop("n_heads", None) or cfg_in.get("n_head") or cfg_in.get("num_attention_heads")
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads < 1:
        raise ValueError(f"checkpoint config: n_head must be a positive integer, got {n_heads!r}")
    out: dict[str, Tensor] = {"embed.W_E": W_E}
    positional = "none"
    n_ctx = cfg_in.get("n_positions") or cfg_in.get("n_ctx") or 512
    if names["pos"] in state:
        positional = "learned"
        out["pos_embed.W_pos"] = get(names["pos"])
        n_ctx = out["pos_embed.W_pos"].shape[0]
    if names["pos"] in state and out["pos_embed.W_pos"].shape[1] != d_model:
        raise ValueError(f"checkpoint: {names['pos']} has shape {tuple(out['pos_embed.W_pos'].shape)}, expected "
                         f"[n_positions, {d_model}]")
    for i in blocks:
        block = _block_weights(names["prefix"].format(i=i), i, get, n_heads)
        if block[f"core.{i}.ln1.w"].shape[0] != d_model:
            raise ValueError(f"checkpoint: block {i} has width {block[f'core.{i}.ln1.w'].shape[0]}, the embedding "
                             f"{d_model}")
        out.update(block)
    for leaf, key in (("w", "weight"), ("b", "bias")):
        t = get(names["ln_f"] + key)
        if tuple(t.shape) != (d_model,):
            raise ValueError(f"checkpoint: {names['ln_f']}{key} has shape {tuple(t.shape)}, expected ({d_model},)")
        out[f"ln_final.params.{leaf}"] = t
    tie = True
    if names["head"] in state:
        head = get(names["head"])
        if head.shape != W_E.shape:
            raise ValueError(f"checkpoint: {names['head']} has shape {tuple(head.shape)}, the embedding "
                             f"{tuple(W_E.shape)}")
        if not torch.equal(head, W_E):
            tie = False
            out["unembed.W_U_untied"] = head.T.contiguous()
    if names["head"].replace("weight", "bias") in state:
        raise ValueError("checkpoint: the lm_head has a bias; the paper's and GPT-2's lm_head have none")
    unknown = sorted(set(state) - used - extra_ok)
    if unknown:
        raise ValueError(f"checkpoint: unknown tensor(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    act = cfg_in.get("activation_function")
    if act not in _ACT:
        raise ValueError(f"checkpoint config: activation_function {act!r} is not supported "
                         f"(supported: {', '.join(_ACT)})")
    settings = {
        "d_vocab": int(d_vocab), "n_ctx": int(n_ctx), "d_model": int(d_model), "n_heads": n_heads,
        "d_mlp": int(out["core.0.mlp.W_in"].shape[1]), "n_blocks": len(blocks), "n_iterations": int(n_iterations),
        "act_fn": _ACT[act], "positional": positional, "ln_eps": float(cfg_in["layer_norm_epsilon"]),
        "tie_embeddings": tie, "unembed_bias": False,
        "pad_token_id": 0 if layout == "paper" else cfg_in.get("pad_token_id"),
    }
    settings.update(overrides)
    try:
        cfg = LoopedConfig(**settings)
    except ValueError as err:
        raise ValueError(f"checkpoint: {err}") from None
    return cfg, out


def select_tokens(cfg, state: dict[str, Tensor], rows: Sequence[int]):
    """Re-index the vocabulary: new token id ``i`` takes the old row ``rows[i]`` (-1: a zero row).

    Logits of the kept tokens are unchanged (each is its own dot product); tokens not kept drop out of
    the softmax.
    """
    index = torch.as_tensor(list(rows), dtype=torch.long)
    if index.numel() == 0 or int(index.max()) >= cfg.d_vocab:
        raise ValueError(f"token map: source ids must be < the checkpoint's vocabulary size {cfg.d_vocab}")
    keep = index.clamp(min=0)
    state = dict(state)
    W_E = state["embed.W_E"][keep].clone()
    W_E[index < 0] = 0.0
    state["embed.W_E"] = W_E
    if "unembed.W_U_untied" in state:
        W_U = state["unembed.W_U_untied"][:, keep].clone()
        W_U[:, index < 0] = 0.0
        state["unembed.W_U_untied"] = W_U
    return cfg.replace(d_vocab=len(index)), state


def from_pretrained(
    src: str | os.PathLike | Mapping[str, Tensor],
    n_iterations: int = 1,
    *,
    config: Mapping[str, Any] | None = None,
    token_rows: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
):
    """A LoopedTransformer (eval mode) from a paper- or hf-layout checkpoint, looped ``n_iterations`` times.

    ``src``: a weights file, a transformers model directory, or a state dict. ``config``: a GPT2Config dict
    (default: the ``config.json`` beside the weights, if any). ``token_rows``: re-index the vocabulary
    (see :func:`select_tokens`). ``overrides``: LoopedConfig fields (``n_heads=...``, ``pad_token_id=...``).
    """
    from looplens.models.looped import LoopedTransformer

    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"n_iterations must be a positive integer, got {n_iterations!r}")
    if isinstance(src, Mapping):
        state, found, where = dict(src), None, "state dict"
        if state and all(k.startswith("_orig_mod.") for k in state):
            state = {k[len("_orig_mod."):]: v for k, v in state.items()}
    else:
        state, found, weights = read_checkpoint(src)
        where = str(weights)
    try:
        cfg, converted = convert_state(state, config if config is not None else found, n_iterations, **overrides)
        if token_rows is not None:
            cfg, converted = select_tokens(cfg, converted, token_rows)
    except ValueError as err:
        raise ValueError(f"{where}: {str(err).removeprefix('checkpoint: ')}") from None
    model = LoopedTransformer(cfg)
    missing = sorted(set(model.state_dict()) - set(converted))
    if missing:
        raise ValueError(f"{where}: the converted weights miss {missing[:5]}")
    model.load_state_dict(converted, strict=True)
    return model.to(device).eval()


def paper_vocab(vocab_json: str | os.PathLike) -> list[str]:
    """The paper's token list: vocab.json with "<pad>" prepended when absent (gpt_utils_*.py: load_vocab)."""
    path = Path(vocab_json)
    try:
        tokens = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the vocabulary ({err})") from None
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{path}: expected a JSON list of token strings")
    return tokens if "<pad>" in tokens else ["<pad>", *tokens]


def token_rows_for(vocab, source_tokens: Sequence[str], d_vocab: int, added_tokens: Mapping[str, int] | None = None
                   ) -> list[int]:
    """For each looplens token id of ``vocab`` (a data.Vocab), the checkpoint row of the same token.

    ``source_tokens``: the checkpoint's tokens in id order (:func:`paper_vocab`); ``added_tokens``: a
    transformers ``added_tokens.json`` (token -> id), which wins where given. Our ``e17`` is upstream
    ``<e_17>``, ``r3`` is ``<r_3>``, the pad is ``<pad>`` (-1, a zero row, when the checkpoint has none).
    """
    ids = {t: i for i, t in enumerate(source_tokens)}
    if added_tokens:
        ids.update({str(t): int(i) for t, i in added_tokens.items()})
    rows, missing = [], []
    for token in vocab.tokens:
        upstream = "<pad>" if token == vocab.tokens[vocab.pad_id] else f"<{token[0]}_{token[1:]}>"
        row = ids.get(upstream)
        if row is None:
            if token == vocab.tokens[vocab.pad_id]:
                row = -1
            else:
                missing.append(upstream)
                continue
        if row >= d_vocab:
            raise ValueError(f"token {upstream} has id {row} in the vocabulary, but the checkpoint has only {d_vocab} rows")
        rows.append(row)
    if missing:
        raise ValueError(f"the checkpoint's vocabulary lacks {len(missing)} of the dataset's tokens, e.g. {missing[:3]}")
    return rows


# ---------------------------------------------------------------------------------------------------
# A run directory from a checkpoint (looplens import-checkpoint)
# ---------------------------------------------------------------------------------------------------
def _dataset_and_tokens(data: str | os.PathLike, run_dir: Path):
    """(data.Dataset, the checkpoint's token list or None) for ``--data``.

    A looplens dataset is used as it is (the checkpoint's ids must be ours). The paper's data directory is
    imported once into ``<run parent>/.datasets/imported-<sha of its files>`` (a name ``looplens data``
    never writes) and its vocab.json gives the checkpoint's token ids.
    """
    import hashlib

    from looplens.data.grokked import import_grokked
    from looplens.data.storage import META, load_dataset

    data = Path(data)
    if (data / META).is_file():
        return load_dataset(data), None
    if not (data / "vocab.json").is_file() or not (data / "train.json").is_file():
        raise FileNotFoundError(f"--data {data}: neither a looplens dataset ({META}) nor the paper's data directory "
                                "(vocab.json, train.json, test.json)")
    digest = hashlib.sha256()
    for name in ("train.json", "test.json", "vocab.json"):
        if (data / name).is_file():
            digest.update(name.encode() + b"\0" + (data / name).read_bytes())
    dst = run_dir.resolve().parent / ".datasets" / f"imported-{digest.hexdigest()[:16]}"
    if not dst.is_dir():
        try:
            import_grokked(data, dst)
        except FileExistsError:  # another import of the same files finished first: use it
            pass
    return load_dataset(dst), paper_vocab(data / "vocab.json")


def _hf_source_ids(weights: Path, source_tokens: list[str], d_vocab: int) -> dict[str, int]:
    """A GPT2LMHeadModel's ids of the dataset's tokens: its added_tokens.json, else vocab.json's tokens
    appended after GPT-2's own (the predecessor's ``--add_tokens``)."""
    added = weights.parent / "added_tokens.json"
    if added.is_file():
        try:
            ids = json.loads(added.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{added}: not valid JSON ({err})") from None
        return {str(k): int(v) for k, v in ids.items()}
    listed = [t for t in source_tokens if t != "<pad>"]
    offset = d_vocab - len(listed)
    if offset < 0:
        raise ValueError(f"{weights}: {d_vocab} token rows, fewer than vocab.json's {len(listed)} tokens")
    return {t: offset + i for i, t in enumerate(listed)}


def import_run(
    src: str | os.PathLike,
    out: str | os.PathLike,
    n_iterations: int,
    *,
    data: str | os.PathLike,
    n_heads: int | None = None,
    step: int = 0,
    overwrite: bool = False,
    command: list[str] | None = None,
) -> Path:
    """Write a run directory for a checkpoint of the paper's code (see :mod:`models.import_cli`).

    The run holds config.json (the imported model's settings in the model section, the dataset's in the
    data section; ``imported`` records the source and its sha256), metrics.csv with one evaluation (every
    evaluation split at ``n_iterations``, at ``step``), a "finished" summary.json with those accuracies and one
    checkpoint at ``step``. Written to a temporary folder and renamed into place.
    """
    import hashlib

    from looplens.data.provenance import atomic_dir, provenance
    from looplens.models.checkpoint import save_checkpoint
    from looplens.models.looped import LoopedTransformer
    from looplens.models.train.config import TrainConfig
    from looplens.models.train.evaluation import EvalSet, evaluate_set, split_accuracy
    from looplens.models.train.run import METRICS_COLUMNS, RUN_FORMAT, RunPaths, format_row, write_json

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"--step must be an integer >= 0, got {step!r}")
    state, hf_config, weights = read_checkpoint(src)
    layout = checkpoint_layout(state)
    ds, source_tokens = _dataset_and_tokens(data, out)
    overrides = {"n_heads": n_heads} if n_heads else {}
    try:
        cfg, converted = convert_state(state, hf_config, n_iterations, **overrides)
        if source_tokens is not None:
            if layout == "hf":  # ids come from the tokenizer's added tokens, not vocab.json's positions
                rows = token_rows_for(ds.vocab, [], cfg.d_vocab, _hf_source_ids(weights, source_tokens, cfg.d_vocab))
            else:
                rows = token_rows_for(ds.vocab, source_tokens, cfg.d_vocab)
            cfg, converted = select_tokens(cfg, converted, rows)
        elif cfg.d_vocab != len(ds.vocab):
            raise ValueError(f"the checkpoint has {cfg.d_vocab} token rows, the dataset's vocabulary {len(ds.vocab)}; "
                             "pass the paper's data directory (with vocab.json) so ids can be mapped")
        cfg = cfg.replace(pad_token_id=ds.vocab.pad_id)
    except ValueError as err:
        raise ValueError(f"{weights}: {str(err).removeprefix('checkpoint: ')}") from None
    width = max(int(ds.encode(s).tokens.shape[1]) for s in ds.split_names)
    if cfg.positional == "learned" and cfg.n_ctx < width:
        raise ValueError(f"{weights}: {cfg.n_ctx} learned positions, but the dataset's queries have {width} tokens")
    if cfg.positional == "none":
        cfg = cfg.replace(n_ctx=max(cfg.n_ctx, width))
    model = LoopedTransformer(cfg)
    model.load_state_dict(converted, strict=True)
    model.vocab = ds.vocab
    model.eval()
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("d_vocab", "n_ctx")}
    train_cfg = TrainConfig.from_dict({"data": ds.config.to_dict(), "model": settings, "run": {"max_steps": step}})
    source_sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    imported = {"source": str(Path(src).resolve()), "weights": str(weights.resolve()), "sha256": source_sha,
                "layout": layout, "data": str(Path(data).resolve()), "n_iterations": n_iterations}
    eval_names = [s for s in ds.split_names if s != "train"]
    # one evaluation, so the run's curves, summary and the app's pages have the imported model's accuracy
    with torch.no_grad():
        evalset = EvalSet.build({name: ds.encode(name) for name in eval_names}, batch_size=1024)
        rows = evaluate_set(model, evalset, [n_iterations])
    rows = [{**row, "step": step, "epoch": None, "stage": 0} for row in rows]
    final = {name: split_accuracy(rows, name, n_iterations) for name in eval_names}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        paths = RunPaths(tmp)
        save_checkpoint(model, paths.checkpoint(step), step=step, epoch=None, seed=None,
                        dataset_checksum=ds.checksum, stage=0, run=out.name, train_iterations=n_iterations,
                        imported=imported)
        (tmp / "metrics.csv").write_text(",".join(METRICS_COLUMNS) + "\n" + "".join(map(format_row, rows)),
                                         encoding="utf-8")
        write_json(paths.config, {
            "format": RUN_FORMAT, "name": out.name, "config": train_cfg.to_dict(), "model_config": cfg.to_dict(),
            "dataset": {"path": str(Path(ds.path).resolve()), "checksum": ds.checksum, "dirname": ds.dirname,
                        "split_names": ds.split_names, "max_hops": ds.max_hops},
            "eval": {"splits": eval_names, "iterations": [n_iterations]},
            "provenance": {**provenance(), "seed": None, "device": "cpu", "device_name": "cpu", "torch_threads": None},
            "command": command or ["import-checkpoint", str(src)], "resumes": [],
            "n_parameters": sum(p.numel() for p in model.parameters()), "imported": imported,
        })
        write_json(paths.summary, {
            "status": "finished", "stop_reason": "imported", "final_step": step, "last_saved_step": step,
            "epoch": None, "stage": 0, "learnable_depth": None, "stages_passed": [], "last_eval_step": step,
            "final_accuracy": {k: v for k, v in final.items() if v is not None}, "train_iterations": n_iterations, "wall_seconds": 0.0, "steps_per_second": None,
            "checkpoints": [step], "imported": imported,
        })
    return out
