"""looplens interp: analyses of looped (and vanilla) transformers as plain functions returning DataFrames.

Each function takes the model, the queries (token ids or strings such as "e17 r3 r9") and optionally a
cache, and returns a tidy pandas DataFrame (one row per measurement; columns documented in each
docstring). Figure builders over those frames live in :mod:`interp.plots`. See docs/interp.md.

>>> from looplens.interp import logit_lens, locate_hops, activation_patching, fixed_points
"""

from looplens.interp._common import layer_table
from looplens.interp.attention import attention_by_iteration
from looplens.interp.fixed_points import fixed_point_summary, fixed_points, spectral_radius
from looplens.interp.grokking import grokking_stages, read_metrics
from looplens.interp.hops import hop_resolution_distribution, locate_hops, resolve_hops, summarize_hops
from looplens.interp.lens import hop_targets, logit_lens
from looplens.interp.mirroring import linear_cka, mirroring_heatmap, mirroring_summary, stage_mirroring
from looplens.interp.overthinking import overthinking, overthinking_summary
from looplens.interp.patching import activation_patching, logit_diff, make_patching_pairs

__all__ = [
    "activation_patching",
    "attention_by_iteration",
    "fixed_point_summary",
    "fixed_points",
    "grokking_stages",
    "hop_resolution_distribution",
    "hop_targets",
    "layer_table",
    "linear_cka",
    "locate_hops",
    "logit_diff",
    "logit_lens",
    "make_patching_pairs",
    "mirroring_heatmap",
    "mirroring_summary",
    "overthinking",
    "overthinking_summary",
    "read_metrics",
    "resolve_hops",
    "spectral_radius",
    "stage_mirroring",
    "summarize_hops",
]
