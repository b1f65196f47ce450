"""Packed-bit scoring and selection for DASH-KV: one API, several implementations.

`hamming_scores` / `asymmetric_scores` score N cached key codes per (batch, KV head);
`select_topk` picks the top k in time linear in N; `hamming_topk` does both. Each scorer takes
`implementation=None | "xla" | "pallas_tpu" | "pallas_gpu" | "interpret" | "interpret_gpu"`
(see `api.py`).
"""

from pallas_kernels.api import (
    IMPLEMENTATIONS,
    Implementation,
    asymmetric_scores,
    available_implementations,
    hamming_scores,
    hamming_topk,
    resolve_implementation,
    select_topk,
)
from pallas_kernels.common import ASYMMETRIC_SENTINEL, HAMMING_SENTINEL
from pallas_kernels.packing import pack_bits, unpack_bits
from pallas_kernels.reference import (
    asymmetric_scores_reference,
    hamming_scores_reference,
    select_topk_reference,
)

__all__ = [
    "ASYMMETRIC_SENTINEL",
    "HAMMING_SENTINEL",
    "IMPLEMENTATIONS",
    "Implementation",
    "asymmetric_scores",
    "asymmetric_scores_reference",
    "available_implementations",
    "hamming_scores",
    "hamming_scores_reference",
    "hamming_topk",
    "pack_bits",
    "resolve_implementation",
    "select_topk",
    "select_topk_reference",
    "unpack_bits",
]
