"""Packed-bit scoring and selection for DASH-KV: one API, several implementations.

Scores and top-k (the first decode path, to be retired): `hamming_scores` / `asymmetric_scores`
score N cached key codes per (batch, KV head); `select_topk` picks the top k in time linear in N;
`hamming_topk` does both.

Selection primitives (the fast decode path, DESIGN.md section 3), in distance units and with no
sort and no top_k over N on any backend:
  `hamming_histogram`  one pass over the codes: the distances D = sum_g popcount(q_g XOR k) of
                       each row's selectable slots [lo, hi) and their histogram over [0, G*b];
  `distance_histogram` the histogram of distances computed elsewhere (the asymmetric ones);
  `calibrate_distances` DASH-KV's consensus and momentum discounts, and the new histogram;
  `rank_threshold`     (T, ties) of a rank k from the cumulative histogram;
  `select_ranks`       the slots of rank in [k_a, k_b) (rank order: distance, then slot),
                       ascending, in a fixed-size index list, by one prefix-sum pass over N.
  `select_tiers`       `select_ranks` of consecutive ranges [0, k1), [k1, k1 + k2): DASH-KV's tiers.

Sparse attention over the rows a slot list names (DESIGN.md section 3.4), the gather fused into
the kernel (no [B, Hkv, K, D] copy of the rows in memory):
  `gathered_logits`    scale * q_g . k_cache[slot] per slot (the exact tokens: K rows read);
  `gathered_attention` softmax over a list's logits (exact and approximate) times the V rows
                       read by slot, and the logsumexp (weights = exp(logit - lse));
  `code_logits`        tier 2's approximate logits from the codes read by slot: the hash
                       similarity scaled plus the residual MLP of the per-group agreement.
Slots outside [0, N), -1 by convention, are unused wherever they sit in a list. With `layer=`,
a stacked cache [L, B, Hkv, N, D] is read in place (no copy of the layer).

Kernel entries take `implementation=None | "xla" | "pallas_tpu" | "pallas_gpu" | "interpret" |
"interpret_gpu" | "cpu"` (see `api.py`); "cpu" is the native CPU kernels (`cpu_native.cc`, XLA
FFI calls built by `make native`), for the selection and sparse attention entries; they read
rows fastest from huge pages, which `huge_pages.restart_with_huge_pages` asks malloc for.
"""

from pallas_kernels.api import (
    IMPLEMENTATIONS,
    Implementation,
    asymmetric_scores,
    available_implementations,
    calibrate_distances,
    code_logits,
    distance_histogram,
    gathered_attention,
    gathered_logits,
    hamming_histogram,
    hamming_scores,
    hamming_topk,
    rank_threshold,
    resolve_implementation,
    select_ranks,
    select_tiers,
    select_topk,
)
from pallas_kernels.common import ASYMMETRIC_SENTINEL, DISTANCE_SENTINEL, HAMMING_SENTINEL
from pallas_kernels.packing import pack_bits, unpack_bits
from pallas_kernels.reference import (
    asymmetric_scores_reference,
    code_logits_reference,
    gathered_attention_reference,
    gathered_logits_reference,
    hamming_histogram_reference,
    hamming_scores_reference,
    select_ranks_reference,
    select_tiers_reference,
    select_topk_reference,
)

__all__ = [
    "ASYMMETRIC_SENTINEL",
    "DISTANCE_SENTINEL",
    "HAMMING_SENTINEL",
    "IMPLEMENTATIONS",
    "Implementation",
    "asymmetric_scores",
    "asymmetric_scores_reference",
    "available_implementations",
    "calibrate_distances",
    "code_logits",
    "code_logits_reference",
    "distance_histogram",
    "gathered_attention",
    "gathered_attention_reference",
    "gathered_logits",
    "gathered_logits_reference",
    "hamming_histogram",
    "hamming_histogram_reference",
    "hamming_scores",
    "hamming_scores_reference",
    "hamming_topk",
    "pack_bits",
    "rank_threshold",
    "resolve_implementation",
    "select_ranks",
    "select_ranks_reference",
    "select_tiers",
    "select_tiers_reference",
    "select_topk",
    "select_topk_reference",
    "unpack_bits",
]
