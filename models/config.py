"""LoopedConfig: the model's settings, validated, JSON round-trippable, readable by TransformerLens.

TransformerLens's analysis code (ActivationCache, patching, utils) reads a handful of attributes from
``model.cfg``; the ones it needs and we do not otherwise use are fixed class-level constants below
(normalization_type, attn_only, ...). ``n_layers`` is derived: the number of *virtual* layers one run
with the default iteration count unrolls into, so ``cfg.n_layers`` always matches the hook names
``blocks.0 .. blocks.{n_layers-1}`` of that run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from looplens.data.validation import check, setting, validate

ActFn = Literal["gelu", "gelu_new", "relu", "silu"]
_ACT_FNS = ("gelu", "gelu_new", "relu", "silu")
_POSITIONAL = ("none", "learned")
_INJECTION = ("none", "add", "concat")


@dataclass
class LoopedConfig:
    """Settings of a :class:`~models.LoopedTransformer`.

    The paper's section-5 model is ``LoopedConfig(d_vocab=..., n_ctx=4, d_model=768, n_heads=12,
    n_blocks=4, n_iterations=R, positional="learned")``; its section-6 model uses
    ``positional="none", zero_init_out=True``.

    >>> cfg = LoopedConfig(d_vocab=50, n_ctx=8, d_model=32, n_heads=4, n_blocks=2, n_iterations=3)
    >>> cfg.d_head, cfg.d_mlp, cfg.n_layers
    (8, 128, 6)
    >>> LoopedConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    d_vocab: int = setting(ge=1)
    n_ctx: int = setting(ge=1)
    d_model: int = setting(128, ge=1)
    n_heads: int = setting(4, ge=1)
    d_head: int | None = setting(None, ge=1)  # default d_model // n_heads
    d_mlp: int | None = setting(None, ge=1)  # default 4 * d_model
    n_blocks: int = setting(4, ge=1)  # physical blocks inside the loop (weights exist once each)
    n_iterations: int = setting(4, ge=1)  # default recurrence; forward(..., n_iterations=T) overrides per call
    act_fn: str = setting("gelu", choices=_ACT_FNS)
    positional: str = setting("learned", choices=_POSITIONAL)  # "learned" absolute positions, or "none" (NoPE, section 6)
    ln_eps: float = setting(1e-5, gt=0)
    dropout: float = setting(0.0, ge=0, lt=1)  # attention-pattern and residual (attn_out, mlp_out) dropout: GPT-2's attn/resid_pdrop
    # dropout of the embedded input (GPT-2's embd_pdrop; None: dropout). The paper's depth code sets only
    # embd_pdrop (0.0) and keeps GPT-2's attn/resid_pdrop 0.1 (docs/fidelity.md).
    embed_dropout: float | None = setting(None, ge=0, lt=1)
    tie_embeddings: bool = True  # W_U = W_E^T, as in the paper (GPT-2 style)
    zero_init_out: bool = False  # W_O and W_out start at zero: every block is the identity at init
    init_std: float = setting(0.02, gt=0)  # std of every weight matrix at init (GPT-2's 0.02)
    # std of the token and position embeddings at init (None: init_std). The paper's code builds its
    # embeddings with plain nn.Embedding, so they keep torch's N(0, 1) (docs/fidelity.md).
    embed_init_std: float | None = setting(None, gt=0)
    unembed_bias: bool = True  # b_U; the paper's tied lm_head has none (docs/fidelity.md)
    n_prelude: int = setting(0, ge=0)  # blocks before the loop (Huginn's prelude), run once
    n_coda: int = setting(0, ge=0)  # blocks after the loop (Huginn's coda), run once
    input_injection: str = setting("none", choices=_INJECTION)  # re-inject the embedded input at each iteration t >= 1
    # Readout feedback: before each iteration t >= 1, add feedback * softmax(readout(state)) @ W_E to the
    # state at every position: the model's own soft answer so far, re-embedded (0: off, the paper's model).
    feedback: float = setting(0.0, ge=0)
    # Hyper-connections on the loop (Hyperloop; Zhu et al. 2024): the state between iterations is
    # hyper_streams residual streams mixed by learned matrices (LoopedTransformer._hyper_iteration). 1: off.
    hyper_streams: int = setting(1, ge=1)
    # Two timescales (HRM; Wang et al. 2025): each iteration runs a fast module slow_period times on z_L,
    # then the core blocks (the slow module) update z_H once; the readout reads z_H. 0: off.
    slow_period: int = setting(0, ge=0)
    n_fast_blocks: int | None = setting(None, ge=1)  # physical blocks of the fast module (default n_blocks)
    pad_token_id: int | None = 0  # right padding; the readout position is the last non-pad token
    seed: int | None = setting(None, ge=0)  # init seed (None: use the global RNG)
    device: str = field(default="cpu", compare=False)

    # TransformerLens reads these; fixed by our architecture (pre-LN, LayerNorm, no rotary, ...).
    normalization_type = "LN"
    attn_only = False
    n_key_value_heads = None
    positional_embedding_type = "standard"
    final_rms = False
    use_attn_result = False
    use_split_qkv_input = False
    use_attn_in = False
    use_hook_mlp_in = False
    default_prepend_bos = False
    tokenizer_prepends_bos = False
    parallel_attn_mlp = False
    original_architecture = "looplens.LoopedTransformer"
    model_name = "looplens-looped"

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"LoopedConfig: {what}")

        check(self, "LoopedConfig: ")  # types, ranges and choices of every field (pydantic, data/validation.py)
        if self.d_head is None:
            need(self.d_model % self.n_heads == 0,
                 f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) unless d_head is set")
            self.d_head = self.d_model // self.n_heads
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if self.hyper_streams > 1 or self.slow_period:
            arch = f"hyper_streams={self.hyper_streams}" if self.hyper_streams > 1 else f"slow_period={self.slow_period}"
            need(not (self.hyper_streams > 1 and self.slow_period),
                 "hyper_streams > 1 and slow_period > 0 are separate architectures; set one of them")
            need(self.input_injection == "none",
                 f"{arch} carries the loop's input itself (extra streams / fast-module injection); "
                 f"input_injection must be 'none', got {self.input_injection!r}")
            need(not self.feedback, f"{arch} does not support readout feedback; set feedback=0 (got {self.feedback})")
        if self.slow_period:
            if self.n_fast_blocks is None:
                self.n_fast_blocks = self.n_blocks
        else:
            need(self.n_fast_blocks is None,
                 f"n_fast_blocks={self.n_fast_blocks} needs slow_period > 0 (the fast module of a two-timescale loop)")
        if self.pad_token_id is not None:
            need(0 <= self.pad_token_id < self.d_vocab,
                 f"pad_token_id must be in [0, d_vocab={self.d_vocab}), got {self.pad_token_id}")

    # --- derived ---------------------------------------------------------------------------------
    def n_virtual_layers(self, n_iterations: int | None = None) -> int:
        """Virtual layers of a run: prelude + n_iterations * n_blocks + coda."""
        t = self.n_iterations if n_iterations is None else n_iterations
        return self.n_prelude + t * self.n_blocks + self.n_coda

    @property
    def n_layers(self) -> int:
        """TransformerLens's layer count: the virtual layers of a run at the default iteration count."""
        return self.n_virtual_layers()

    @property
    def attn_scale(self) -> float:
        return self.d_head**0.5

    # --- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("device")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopedConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LoopedConfig: unknown key(s) {unknown}; known keys: {sorted(known - {'device'})}")
        return cls(**validate(cls, d, "LoopedConfig: "))  # checked before construction: errors name the key

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoopedConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> LoopedConfig:
        """A copy with some fields changed (re-validated)."""
        return dataclasses.replace(self, **changes)
