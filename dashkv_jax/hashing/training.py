"""Training the hashers: list-wise distillation, the sharded train step, Orbax, the whole run.

Data. Captured keys of every training window stay on the devices ([C, L, T, Hkv, D]); each
sampled query carries its queries [L, Hq, D], its window and position, the oracle's top-P keys
of every KV head and its softmax normalisers (`capture.oracle_targets`). A step takes B queries
(a permutation of all samples per epoch, fixed by the seed and the step) and, inside the jitted
step, draws per (query, layer) one key set shared by the KV heads: every head's top-P keys and
U keys drawn uniformly from the eligible ones, each weighted so that sums over the set estimate
sums over all eligible keys (1 for a top key, n_eligible / U for a uniform draw outside the
tops, 0 for repeats).

Loss (`loss="kl"`, the paper's). The teacher is the full-attention distribution of each query
head over all eligible keys before it (exact: its normaliser was computed over all of them);
the student's logits are the relaxed hash logits, `alpha_{l,g} <tanh(beta v_q), tanh(beta
u_k)> / b + Delta_l(agreement)`, with beta annealed from `beta_start` to `beta_end` (the
continuation method: the relaxation tends to the sign codes decoding uses); the per-head
KL is estimated on the weighted key set. Its direction (`kl_direction`): the paper's
`KL(P_student || P_teacher)` ("reverse", mode-seeking) lets a student with a bounded logit range
stay diffuse and miss the one key an induction head copies from; the forward
`KL(P_teacher || P_student)` charges every teacher key the student misses, which is what tier 1
is for. Forward is the default: on 8192 validation tokens at exact budget 1/32 it took DASH-KV
from +2.8% over full attention to +1.3% (SimHash +1.8%), and copies from 40% of the 50 worst
positions to 8% (`experiments/perplexity_gaps.py`, RESULTS.md).
A second KL trains the group selection (what tier 1 ranks by): the relaxed group similarity plus
the calibration discounts (consensus: a soft vote of the KV heads' first-pass tier 1 of
`consensus_fraction` of the eligible keys; momentum: the previous layer's teacher attention on
the key, DESIGN.md section 2) against the group's teacher distribution, through a learned
per-layer temperature. Plus a bit-balance and a quantisation loss (0.1 each, the paper's).
`loss="bt"` (the ablation) ranks the group similarity with Bradley-Terry pairs (oracle top key
over sampled key) instead, and trains the tier-2 logit and the discounts on the KLs with the
encoders' gradients stopped.

Positions. `max_shift` moves each sample's window a random offset later (keys and queries
rotated by it; RoPE attention depends on relative positions only, so targets stay exact).

Step. One `jax.jit` with explicit input and output shardings over a ("data", "layer") mesh:
samples split over "data", every per-layer array (parameters, optimizer moments, keys) split
over "layer". The same code runs on one CPU, 8 simulated CPU devices, a GPU or a pod slice.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dashkv_jax.errors import DashKVError
from dashkv_jax.hashing import artifact, retrieval
from dashkv_jax.hashing import capture as capture_lib
from dashkv_jax.hashing.capture import CaptureConfig, Captured, Targets
from dashkv_jax.hashing.encoders import SANDWICH, Hasher, HasherConfig, fit_input_stats
from dashkv_jax.models.llama import rope_frequencies
from dashkv_jax.models.loaders import DEFAULT_MODEL

Array = jax.Array


@dataclasses.dataclass(slots=True, frozen=True)
class TrainConfig:
    """The hasher's shape, the loss, the optimiser and the mesh."""

    # hasher (HasherConfig's fields of the same names)
    bits: int = 128
    kind: str = "asymmetric"  # or "symmetric"
    query_hidden: tuple[int, ...] = (256, 256)
    query_skip: bool = True
    residual_groups: int = 16
    residual_hidden: int = 16
    dense_first: int = SANDWICH[0]  # the sandwich decoding defaults to, in the artifact
    dense_last: int = SANDWICH[1]
    t_vote: int = 2
    # targets and loss
    loss: str = "kl"  # or "bt" (Bradley-Terry pairs: the ablation)
    kl_direction: str = "forward"  # KL(P_teacher || P_student); "reverse": the paper's
    positives: int = 16  # oracle top keys per (query, layer, KV head)
    negatives: int = 64  # uniform draws per (query, layer), shared by the KV heads
    beta_start: float = 1.0
    beta_end: float = 10.0
    selection_weight: float = 1.0
    balance_weight: float = 0.1
    quantization_weight: float = 0.1
    consensus_fraction: float = 1 / 32  # first-pass tier 1 of the soft vote, of eligible keys
    # RoPE position augmentation: each sample's keys and queries rotate by one offset drawn from
    # [0, max_shift] (-1: up to the model's context minus the window; 0: off, the default)
    max_shift: int = 0
    # optimiser
    steps: int = 600
    batch_size: int = 16  # sampled queries per step, each for all layers and KV heads
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    clip_norm: float = 1.0
    seed: int = 0
    # mesh: data_parallel * layer_parallel devices; -1 takes all devices left
    data_parallel: int = -1
    layer_parallel: int = 1
    # logging and checkpoints
    log_every: int = 25
    eval_every: int = 200
    eval_queries: int = 32  # per held-out window in periodic evaluations (all at the end)
    checkpoint_every: int = 100
    keep_checkpoints: int = 3

    def __post_init__(self):
        object.__setattr__(self, "query_hidden", tuple(self.query_hidden))
        if self.kind not in ("asymmetric", "symmetric"):
            raise DashKVError(f"can train 'asymmetric' or 'symmetric' hashers, got {self.kind!r}")
        if self.loss not in ("kl", "bt"):
            raise DashKVError(f"loss must be 'kl' or 'bt', got {self.loss!r}")
        if self.kl_direction not in ("reverse", "forward"):
            raise DashKVError(f"kl_direction must be 'reverse' or 'forward': {self.kl_direction!r}")
        if self.bits < 32 or self.bits % 32:
            raise DashKVError(f"bits must be a positive multiple of 32, got {self.bits}")
        for name in ("steps", "batch_size", "positives", "negatives", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise DashKVError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.beta_start <= self.beta_end:
            raise DashKVError(
                f"need 0 < beta_start <= beta_end: {self.beta_start}, {self.beta_end}"
            )

    def hasher_config(self, model_config, model_id: str | None = None, **fields) -> HasherConfig:
        return HasherConfig.for_model(
            model_config,
            model_id,
            bits=self.bits,
            kind=self.kind,
            query_hidden=self.query_hidden,
            query_skip=self.query_skip,
            residual_groups=self.residual_groups,
            residual_hidden=self.residual_hidden,
            dense_first=self.dense_first,
            dense_last=self.dense_last,
            t_vote=self.t_vote,
            **fields,
        )


# -- model, loss, step -------------------------------------------------------------------------


class Trainee(nnx.Module):
    """What the optimiser updates: the hasher, the selection's per-layer temperature and the
    Bradley-Terry ablation's pair scale."""

    def __init__(self, config: HasherConfig, *, rngs: nnx.Rngs):
        self.hasher = Hasher(config, rngs=rngs)
        # Selection logits gamma_l * S / (G b): relaxed similarities spread over a few units.
        self.selection_scale = nnx.Param(jnp.full((config.num_layers,), 8.0, jnp.float32))
        init = -0.5 * np.log(config.group_size * config.bits)  # BT pair logits near unit scale
        self.pair_scale = nnx.Param(jnp.full((config.num_layers,), init, jnp.float32))


def shift_positions(x: Array, offset: Array, inv_freq: Array) -> Array:
    """Post-RoPE vectors x [..., D] moved `offset` [...] positions later (rotate-half RoPE).

    RoPE rotates each pair (i, i + D/2) by position * inv_freq[i], so moving a token later is
    one more rotation; a query and a key moved by the same offset keep their dot product.
    """
    angles = offset[..., None].astype(jnp.float32) * inv_freq  # [..., D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def key_sample(batch: dict, rng: Array, num_layers: int, config: TrainConfig, sinks, window):
    """Per (query, layer) one key set for every KV head -> (index [B, L, J] int32, weight
    [B, L, J] float32, J = Hkv P + U): sums of weight x f(key) estimate sums over all eligible
    keys (module docstring)."""
    top = batch["top"]  # [B, L, Hkv, P]
    b = top.shape[0]
    top = top.reshape(b, num_layers, -1)  # [B, L, Hkv P]
    high = batch["position"] - window + 1  # eligible keys: [sinks, high)
    drawn = jax.random.randint(rng, (b, num_layers, config.negatives), sinks, high[:, None, None])
    index = jnp.concatenate([top, drawn], axis=-1)  # [B, L, J]
    n_top = top.shape[-1]
    same = index[..., :, None] == index[..., None, :]  # [B, L, J, J]
    earlier = jnp.tril(jnp.ones(same.shape[-2:], bool), -1)
    repeated_top = jnp.any(same[..., :n_top, :n_top] & earlier[:n_top, :n_top], axis=-1)
    drawn_in_top = jnp.any(same[..., n_top:, :n_top], axis=-1)
    eligible = (high - sinks).astype(jnp.float32)[:, None, None]
    weight = jnp.concatenate(
        [
            jnp.where(repeated_top, 0.0, 1.0),
            jnp.where(drawn_in_top, 0.0, eligible / config.negatives),
        ],
        axis=-1,
    )
    return index, weight


def _weighted_kl(student: Array, teacher_log: Array, weight: Array, direction: str) -> Array:
    """KL between the student softmax of `student` [..., J] (normalised on the weighted set)
    and the teacher's log-probabilities [..., J] (normalised over all keys) -> [...]."""
    log_w = jnp.log(jnp.maximum(weight, 1e-30))
    student_log = student - jax.nn.logsumexp(student + log_w, axis=-1, keepdims=True)
    present = weight > 0
    if direction == "reverse":
        p = jnp.exp(student_log) * weight
        return jnp.sum(jnp.where(present, p * (student_log - teacher_log), 0.0), axis=-1)
    p = jnp.exp(teacher_log) * weight
    return jnp.sum(jnp.where(present, p * (teacher_log - student_log), 0.0), axis=-1)


def _soft_threshold(values: Array, weight: Array, k: Array) -> Array:
    """The value whose weighted count of larger values reaches k: values, weight [..., J],
    k [...] -> [...] (the k-th largest over all keys, estimated on the weighted set)."""
    order = jnp.argsort(-values, axis=-1)
    sorted_values = jnp.take_along_axis(values, order, axis=-1)
    above = jnp.cumsum(jnp.take_along_axis(weight, order, axis=-1), axis=-1)
    position = jnp.sum(above < k[..., None], axis=-1)
    position = jnp.minimum(position, values.shape[-1] - 1)
    return jnp.take_along_axis(sorted_values, position[..., None], axis=-1)[..., 0]


def _pair_loss(scores: Array, probs: Array, n_top: int, scale: Array) -> Array:
    """Mean Bradley-Terry loss over (top, sampled) pairs ordered by exact attention.

    scores, probs [L, B, Hkv, J]: the first n_top keys are oracle tops, then sampled ones.
    """
    s_top, s_other = scores[..., :n_top, None], scores[..., None, n_top:]
    p_top, p_other = probs[..., :n_top, None], probs[..., None, n_top:]
    margin = scale[:, None, None, None, None] * (s_top - s_other)  # [L, B, Hkv, P, U]
    ordered = p_top > p_other  # a sampled key may itself be in the oracle's top
    return jnp.sum(jnp.where(ordered, jax.nn.softplus(-margin), 0.0)) / jnp.maximum(
        jnp.sum(ordered), 1
    )


def loss_fn(
    trainee: Trainee,
    keys: Array,  # [C, L, T, Hkv, D] training windows' keys
    batch: dict,  # queries [B,L,Hq,D], context [B], position [B], top [B,L,Hkv,P], lse [B,L,Hq]
    rng: Array,
    beta: Array,  # the relaxation's sharpness this step
    config: TrainConfig,
    sinks: int,
    window: int,
    inv_freq: Array | None = None,  # [D/2] the model's RoPE frequencies (for max_shift)
    max_shift: int = 0,
) -> tuple[Array, dict]:
    hasher = trainee.hasher
    c = hasher.config
    num_layers, hkv, g, d, bits = c.num_layers, c.num_kv_heads, c.group_size, c.head_dim, c.bits
    b = batch["position"].shape[0]
    index, weight = key_sample(batch, rng, num_layers, config, sinks, window)  # [B, L, J]
    index, weight = index.transpose(1, 0, 2), weight.transpose(1, 0, 2)  # [L, B, J]
    layers = jnp.arange(num_layers)[:, None, None]
    context = batch["context"][None, :, None]
    gathered = keys[context, layers, index]  # [L, B, J, Hkv, D]
    before = keys[context, jnp.maximum(layers - 1, 0), index]  # the previous layer's keys
    queries = batch["queries"].transpose(1, 0, 2, 3)  # [L, B, Hq, D]
    lse = batch["lse"].transpose(1, 0, 2)  # [L, B, Hq]

    # The teacher: exact log-probabilities of every query head over all eligible keys.
    logits = jnp.einsum("lbhgd,lbjhd->lbhgj", queries.reshape(num_layers, b, hkv, g, d), gathered)
    logits = logits.reshape(num_layers, b, -1, logits.shape[-1]) * d**-0.5  # [L, B, Hq, J]
    teacher_log = logits - lse[..., None]
    group_teacher = jnp.exp(teacher_log).reshape(num_layers, b, hkv, g, -1).mean(3)  # [L,B,Hkv,J]
    # Momentum's prior: the previous layer's teacher attention on the key, mean over heads.
    prev_q = jnp.concatenate([queries[:1], queries[:-1]], axis=0).reshape(num_layers, b, hkv, g, d)
    prev_lse = jnp.concatenate([lse[:1], lse[:-1]], axis=0)
    prev = jnp.einsum("lbhgd,lbjhd->lbhgj", prev_q, before).reshape(
        num_layers, b, -1, index.shape[-1]
    )
    prev = jnp.exp(prev * d**-0.5 - prev_lse[..., None]).mean(axis=2)  # [L, B, J]
    prev = jnp.where(layers == 0, 0.0, prev)

    if max_shift > 0:
        offset = jax.random.randint(jax.random.fold_in(rng, 1), (b,), 0, max_shift + 1)
        gathered = shift_positions(gathered, offset[None, :, None, None], inv_freq)
        queries = shift_positions(queries, offset[None, :, None], inv_freq)

    # The student: relaxed codes on both sides.
    k_logits = hasher.key_logits(gathered)  # [L, B, J, Hkv, bits]
    q_logits = hasher.query_logits(queries)  # [L, B, Hq, bits]
    k_soft, q_soft = jnp.tanh(beta * k_logits), jnp.tanh(beta * q_logits)
    if config.loss == "bt":  # the ablation: only the pairs train the encoders
        k_soft, q_soft = jax.lax.stop_gradient(k_soft), jax.lax.stop_gradient(q_soft)
    groups = c.residual_groups
    q_heads = q_soft.reshape(num_layers, b, hkv, g, groups, bits // groups)
    k_groups = k_soft.reshape(*k_soft.shape[:-1], groups, bits // groups)  # [L, B, J, Hkv, n, m]
    # Each group's relaxed inner product: the per-group agreement and, summed, the similarity.
    group_dot = jnp.einsum("lbhgnm,lbjhnm->lbhgjn", q_heads, k_groups)  # [L, B, Hkv, G, J, n]
    per_head = group_dot.sum(-1)  # [L, B, Hkv, G, J]
    similarity = per_head.reshape(num_layers, b, hkv * g, -1) / bits  # [L, B, Hq, J]
    agreement = 0.5 + group_dot.reshape(*similarity.shape, groups) * (0.5 * groups / bits)
    student = hasher.approx_logits(similarity, agreement)  # [L, B, Hq, J]
    head_weight = jnp.repeat(weight[:, :, None], hkv * g, axis=2)
    head_kl = jnp.mean(_weighted_kl(student, teacher_log, head_weight, config.kl_direction))

    # The group selection, calibrated as decoding does.
    group = per_head.sum(axis=3)  # [L, B, Hkv, J]: relaxed G b - 2 D
    consensus, momentum = hasher.discounts()  # [L], distance units
    eligible = (batch["position"] - window + 1 - sinks).astype(jnp.float32)  # [B]
    k1 = jnp.maximum(1.0, config.consensus_fraction * eligible)[None, :, None]  # [1, B, 1]
    head_weights = jnp.broadcast_to(weight[:, :, None], group.shape)
    threshold = jax.lax.stop_gradient(_soft_threshold(group, head_weights, k1))  # [L, B, Hkv]
    sharp = 8.0 / (g * bits) ** 0.5  # a vote turns over about one typical score spread
    votes = jax.nn.sigmoid(sharp * (group - threshold[..., None])).sum(axis=2)  # [L, B, J]
    agreed = jax.nn.sigmoid(4.0 * (votes - c.t_vote + 0.5))
    discount = consensus[:, None, None] * agreed + momentum[:, None, None] * prev  # [L, B, J]
    calibrated = group + 2.0 * discount[:, :, None]  # the similarity gains twice the distance
    gamma = trainee.selection_scale[...][:, None, None, None]
    selection = gamma * calibrated / (g * bits)
    log_group = jnp.log(jnp.maximum(group_teacher, 1e-30))
    selection_kl = jnp.mean(_weighted_kl(selection, log_group, head_weights, config.kl_direction))

    balance = jnp.mean(jnp.mean(k_soft, axis=(1, 2)) ** 2) + jnp.mean(jnp.mean(q_soft, 1) ** 2)
    quantization = jnp.mean((1 - jnp.abs(k_soft)) ** 2) + jnp.mean((1 - jnp.abs(q_soft)) ** 2)
    parts = {"head_kl": head_kl, "selection_kl": selection_kl, "balance": balance}
    loss = head_kl + config.selection_weight * selection_kl
    if config.loss == "bt":
        k_hard = jnp.tanh(beta * hasher.key_logits(gathered))
        q_hard = jnp.tanh(beta * hasher.query_logits(queries)).reshape(num_layers, b, hkv, g, -1)
        scores = jnp.einsum("lbhgx,lbjhx->lbhj", q_hard, k_hard)
        n_top = batch["top"].shape[-1] * hkv
        pairs = _pair_loss(scores, group_teacher, n_top, jnp.exp(trainee.pair_scale[...]))
        parts["pairs"] = pairs
        loss = loss + pairs
        balance = jnp.mean(jnp.mean(k_hard, axis=(1, 2)) ** 2) + jnp.mean(jnp.mean(q_hard, 1) ** 2)
    loss = loss + config.balance_weight * balance + config.quantization_weight * quantization
    return loss, parts


def make_optimizer(trainee: Trainee, config: TrainConfig) -> nnx.Optimizer:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=min(config.warmup_steps, config.steps - 1),  # the cosine needs a step
        decay_steps=config.steps,
        end_value=config.learning_rate * 0.01,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule, weight_decay=config.weight_decay),
    )
    return nnx.Optimizer(trainee, tx, wrt=nnx.Param)


def make_mesh(config: TrainConfig, devices=None) -> jax.sharding.Mesh:
    """A ("data", "layer") mesh of data_parallel x layer_parallel devices (Auto axes)."""
    devices = list(devices if devices is not None else jax.devices())
    layer = config.layer_parallel
    data = config.data_parallel if config.data_parallel > 0 else len(devices) // layer
    if data < 1 or data * layer > len(devices):
        raise DashKVError(
            f"a mesh of {data} x {layer} (data x layer) devices needs more than the "
            f"{len(devices)} available"
        )
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh(
        (data, layer), ("data", "layer"), axis_types=(auto, auto), devices=devices[: data * layer]
    )


def state_shardings(state, mesh) -> object:
    """Every array with a leading layer axis (all hasher parameters and their moments) splits
    over "layer"; scalars (step count, ...) are replicated."""

    def spec(x):
        return NamedSharding(mesh, P("layer") if x.ndim >= 1 else P())

    return jax.tree.map(spec, state)


def batch_shardings(mesh) -> dict:
    return {
        "queries": NamedSharding(mesh, P("data", "layer")),
        "context": NamedSharding(mesh, P("data")),
        "position": NamedSharding(mesh, P("data")),
        "top": NamedSharding(mesh, P("data", "layer")),
        "lse": NamedSharding(mesh, P("data", "layer")),
    }


def keys_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(None, "layer"))


def put(array: np.ndarray, sharding: NamedSharding) -> Array:
    """A global array from a host array every process holds in full (single or multi-host)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


_COMPILED_STEPS: dict = {}


def beta_at(step: Array, config: TrainConfig) -> Array:
    """The relaxation's sharpness at `step`: from beta_start to beta_end, linearly."""
    progress = jnp.minimum(step / max(config.steps - 1, 1), 1.0)
    return config.beta_start + (config.beta_end - config.beta_start) * progress


def _jit_train_step(graphdef, state, config, mesh, sinks, window, inv_freq, max_shift):
    """(the jitted step, its graphdef, the state's shardings) for one config and mesh."""
    state_sharding = state_shardings(state, mesh)
    base_rng = jax.random.key(config.seed)
    inv_freq = None if inv_freq is None else jnp.asarray(inv_freq, jnp.float32)

    def train_step(state, keys, batch):
        trainee, optimizer = nnx.merge(graphdef, state)
        step = optimizer.step[...]
        rng = jax.random.fold_in(base_rng, step)  # the step's own samples
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
        (loss, parts), grads = grad_fn(
            trainee, keys, batch, rng, beta_at(step, config), config, sinks, window, inv_freq,
            max_shift,
        )  # fmt: skip
        optimizer.update(trainee, grads)
        metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)}
        return nnx.state((trainee, optimizer)), metrics

    step = jax.jit(
        train_step,
        in_shardings=(state_sharding, keys_sharding(mesh), batch_shardings(mesh)),
        out_shardings=(state_sharding, NamedSharding(mesh, P())),
        donate_argnums=0,
    )
    return step, graphdef, state_sharding


class Stepper:
    """The compiled train step and the sharded state it updates."""

    def __init__(
        self,
        trainee: Trainee,
        config: TrainConfig,
        mesh,
        *,
        sinks: int = 4,
        window: int = 64,
        inv_freq: np.ndarray | None = None,
        max_shift: int = 0,
    ):
        """`inv_freq` [D/2] (the model's RoPE frequencies) is needed when `max_shift` > 0."""
        self.config, self.mesh = config, mesh
        if max_shift > 0 and inv_freq is None:
            raise DashKVError("position shifts need the model's RoPE frequencies (inv_freq)")
        rope = None if inv_freq is None else tuple(np.asarray(inv_freq, np.float32).tolist())
        c = trainee.hasher.config
        if c.num_layers % mesh.shape["layer"]:
            raise DashKVError(
                f"{c.num_layers} layers do not split over a layer axis of {mesh.shape['layer']}"
            )
        if config.batch_size % mesh.shape["data"]:
            raise DashKVError(
                f"batch_size {config.batch_size} does not split over a data axis of "
                f"{mesh.shape['data']}"
            )
        optimizer = make_optimizer(trainee, config)
        graphdef, state = nnx.split((trainee, optimizer))
        key = (config, c, sinks, window, rope, max_shift, mesh, jax.tree.structure(state))
        if key not in _COMPILED_STEPS:  # equal configs share one compiled step
            _COMPILED_STEPS[key] = _jit_train_step(
                graphdef, state, config, mesh, sinks, window, rope, max_shift
            )
        self._step, self.graphdef, self.state_sharding = _COMPILED_STEPS[key]
        self.state = jax.tree.map(lambda x, s: put(np.asarray(x), s), state, self.state_sharding)

    def __call__(self, keys: Array, batch: dict) -> dict:
        self.state, metrics = self._step(self.state, keys, batch)
        return metrics

    @property
    def step(self) -> int:
        _, optimizer = nnx.merge(self.graphdef, self.state)
        return int(optimizer.step[...])

    def trainee(self) -> Trainee:
        trainee, _ = nnx.merge(self.graphdef, self.state)
        return trainee

    def abstract_state(self):
        """Shapes, dtypes and shardings of the state: what a checkpoint restores into."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self.state,
            self.state_sharding,
        )


class Batches:
    """The step's batch, a function of the step alone: resuming replays the same batches."""

    def __init__(self, captured: Captured, targets: Targets, batch_size: int, seed: int):
        self.queries = captured.queries.reshape(-1, *captured.queries.shape[2:])  # [N, L, Hq, D]
        self.position = captured.positions.reshape(-1)  # [N]
        per_context = captured.positions.shape[1]
        self.context = np.repeat(np.arange(captured.positions.shape[0]), per_context)
        self.context = self.context.astype(np.int32)
        self.top, self.lse = targets.top, targets.lse
        self.batch_size, self.seed = batch_size, seed
        if batch_size > len(self.position):
            raise DashKVError(f"batch_size {batch_size} exceeds the {len(self.position)} samples")
        self.per_epoch = len(self.position) // batch_size

    def indices(self, step: int) -> np.ndarray:
        epoch, offset = divmod(step, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.position))
        return order[offset * self.batch_size : (offset + 1) * self.batch_size]

    def host_batch(self, step: int) -> dict:
        i = self.indices(step)
        return {
            "queries": self.queries[i],
            "context": self.context[i],
            "position": self.position[i],
            "top": self.top[i],
            "lse": self.lse[i],
        }

    def __call__(self, step: int, shardings: dict) -> dict:
        host = self.host_batch(step)
        return {name: put(host[name], shardings[name]) for name in host}


# -- checkpoints -------------------------------------------------------------------------------


class Checkpoints:
    """Orbax checkpoints of the train state, the last `keep` kept (the caller picks the steps).

    `restore()` restores the latest step, `restore(step)` a given one. A step that fails to
    restore (truncated or corrupt files) raises a DashKVError naming the step and the steps
    before it that can be restored instead (`--resume-step`).
    """

    def __init__(self, directory: str | os.PathLike, keep: int):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state) -> None:
        """Saves `state` as `step` (in the background; `wait` blocks until written)."""
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, abstract_state, step: int | None = None):
        steps = self.steps()
        if step is None:
            step = steps[-1] if steps else None
        if step not in steps:
            raise DashKVError(f"no checkpoint of step {step} in {str(self.directory)!r}: {steps}")
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as err:  # Orbax/TensorStore raise many types for a damaged checkpoint
            earlier = [s for s in steps if s < step]
            hint = (
                f"; earlier checkpoints: {earlier}: resume from one with --resume-step "
                f"{earlier[-1]}"
                if earlier
                else "; there is no earlier checkpoint: delete the directory to start over"
            )
            raise DashKVError(
                f"checkpoint step {step} in {str(self.directory)!r} is truncated or corrupt "
                f"({artifact.short_error(err)}){hint}"
            ) from err

    def delete_after(self, step: int) -> None:
        """Drops the checkpoints after `step` (when resuming from an earlier one)."""
        for later in self.steps():
            if later > step:
                warnings.warn(
                    f"deleting checkpoint step {later}: resuming from {step}", stacklevel=2
                )
                self.manager.delete(later)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# -- the run -----------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True, frozen=True)
class RunConfig:
    """Everything one training run needs; `experiments/configs/` holds the named ones."""

    name: str = "smollm2_cpu"
    model: str = DEFAULT_MODEL
    train_data: CaptureConfig = CaptureConfig(split="train", contexts=16)
    heldout_data: CaptureConfig = CaptureConfig(
        split="heldout", contexts=4, queries_per_context=128
    )
    train: TrainConfig = TrainConfig()
    budget: retrieval.Budget = retrieval.Budget()
    out: str = "runs/smollm2_cpu"
    capture_cache: str | None = None  # None: data.cache_dir() / "captures"

    def validate(self) -> None:
        """Checks across fields (run by `run`; field by field overrides may pass through
        inconsistent states first)."""
        a, b = self.train_data, self.heldout_data
        if (a.context, a.sinks, a.window) != (b.context, b.sinks, b.window):
            raise DashKVError(
                "train and held-out data need the same context, sinks and window, got "
                f"{(a.context, a.sinks, a.window)} and {(b.context, b.sinks, b.window)}"
            )


# Fields that do not change the trained parameters: a run may resume with other values.
_NON_MATH_FIELDS = {"log_every", "eval_every", "eval_queries", "keep_checkpoints", "out", "name"}


def config_to_json(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _math_fields(raw: dict, prefix: str = "") -> dict:
    """Flattened {"train.bits": 128, ...} of a config's JSON, without the non-math fields."""
    flat = {}
    for name, value in raw.items():
        if name in _NON_MATH_FIELDS or name == "capture_cache":
            continue
        if isinstance(value, dict):
            flat.update(_math_fields(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def check_run_dir(config: RunConfig, out: Path) -> None:
    """Refuses to resume a run directory that holds a run with a different config."""
    saved = out / "config.json"
    if not saved.is_file():
        if jax.process_index() == 0:
            saved.write_text(json.dumps(config_to_json(config), indent=2) + "\n")
        return
    before = _math_fields(json.loads(saved.read_text()))
    now = _math_fields(config_to_json(config))
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if differ:
        raise DashKVError(
            f"{str(out)!r} holds a run with another config ({', '.join(differ)} differ): "
            "give another --out or delete it"
        )


def maybe_initialize_distributed() -> bool:
    """`jax.distributed.initialize()` when the environment says this is one of several hosts."""
    env = os.environ
    multi_host = (
        env.get("DASHKV_DISTRIBUTED") == "1"
        or "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("JAX_NUM_PROCESSES", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if multi_host:
        jax.distributed.initialize()
    return multi_host


class _Log:
    """One JSON object per line to a file and a short line to stdout (process 0 only)."""

    def __init__(self, path: Path, quiet: bool):
        self.path, self.quiet = path, quiet
        self.main = jax.process_index() == 0

    def __call__(self, record: dict, line: str | None = None):
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if line and not self.quiet:
            print(line, flush=True)


def _load_targets(
    captured: Captured, data: CaptureConfig, positives: int, cache: Path | None
) -> Targets:
    """Oracle targets, cached beside nothing when `cache` is None."""
    if cache is not None and cache.is_file():
        with np.load(cache) as saved:
            return Targets(saved["top"], saved["lse"])
    targets = capture_lib.oracle_targets(
        captured, sinks=data.sinks, window=data.window, positives=positives
    )
    if cache is not None:
        partial = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(partial, top=targets.top, lse=targets.lse)
        os.replace(partial, cache)
    return targets


def _table(results: dict, k: int, context: int) -> str:
    rows = [
        f"held-out retrieval by raw distance, context {context}, tier 1 of k={k}",
        f"{'method':<14} {'Recall@100':>10} {'mass recall':>12}",
    ]
    for name, m in results.items():
        rows.append(f"{name:<14} {m['recall_at_100']:>10.4f} {m['mass_recall']:>12.4f}")
    return "\n".join(rows)


def _train_loop(stepper, keys, batches, checkpoints, log, last, heldout, evaluate) -> None:
    """Steps from the stepper's step to `last`: logs, periodic held-out recall, checkpoints."""
    tc = stepper.config
    shardings = batch_shardings(stepper.mesh)
    step = stepper.step
    window_start, window_steps = time.perf_counter(), 0
    while step < last:
        metrics = stepper(keys, batches(step, shardings))
        step += 1
        window_steps += 1
        if step % tc.log_every == 0 or step == last:
            metrics = {name: float(v) for name, v in metrics.items()}
            rate = window_steps / (time.perf_counter() - window_start)
            log(
                {"step": step, **metrics, "steps_per_s": round(rate, 3)},
                f"step {step:>5}  loss {metrics['loss']:.4f}  head KL {metrics['head_kl']:.4f}"
                f"  selection KL {metrics['selection_kl']:.4f}  {rate:.2f} steps/s",
            )
            window_start, window_steps = time.perf_counter(), 0
        if step % tc.eval_every == 0 and step < tc.steps:
            m = evaluate(stepper.trainee().hasher, heldout, max_queries=tc.eval_queries)
            log(
                {"step": step, "heldout": _scalars(m)},
                f"step {step:>5}  held-out Recall@100 {m['recall_at_100']:.4f}"
                f"  mass recall {m['mass_recall']:.4f}",
            )
            window_start = time.perf_counter()  # evaluation time is not step time
        if step % tc.checkpoint_every == 0 or step == last:
            checkpoints.save(step, stepper.state)


@dataclasses.dataclass
class RunResult:
    summary: dict  # held-out metrics per method, wall times, paths (also in OUT/results.json)
    trainee: Trainee  # the trained hasher (and loss scales) at the last step run


def run(
    config: RunConfig,
    *,
    resume_step: int | None = None,
    quiet: bool = False,
    stop_after: int | None = None,
    model_and_tokenizer=None,
) -> RunResult:
    """Capture (or load the cached capture), train with checkpoints, export, evaluate.

    Resumes from the latest checkpoint in `config.out` when there is one (or from
    `resume_step`). `stop_after` stops after that many steps in total, without evaluating or
    exporting (tests of resumption).
    """
    from dashkv_jax.models.loaders import load_model

    config.validate()
    start = time.perf_counter()
    maybe_initialize_distributed()
    tc = config.train
    out = Path(config.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out / "log.jsonl", quiet)

    check_run_dir(config, out)

    model, tokenizer = model_and_tokenizer or load_model(config.model)
    model_id = model.config.name
    cache = Path(config.capture_cache) if config.capture_cache else None
    train = capture_lib.capture(
        model, tokenizer, config.train_data, cache_dir=cache, progress=not quiet
    )
    heldout = capture_lib.capture(
        model, tokenizer, config.heldout_data, cache_dir=cache, progress=not quiet
    )
    capture_seconds = time.perf_counter() - start
    targets = _load_targets(
        train, config.train_data, tc.positives, out / f"targets-p{tc.positives}.npz"
    )
    k = config.budget.size(config.heldout_data.context)
    data = config.heldout_data
    retrieval.check_budget(heldout, k, data.sinks, data.window)

    hasher_config = tc.hasher_config(model.config, model_id, train_length=data.context)
    trainee = Trainee(hasher_config, rngs=nnx.Rngs(tc.seed))
    train_queries = train.queries.reshape(-1, *train.queries.shape[2:])
    fit_input_stats(trainee.hasher, train.keys, train_queries, sinks=data.sinks)
    mesh = make_mesh(tc)
    mc = model.config
    max_shift = tc.max_shift if tc.max_shift >= 0 else mc.max_position - data.context
    stepper = Stepper(
        trainee,
        tc,
        mesh,
        sinks=data.sinks,
        window=data.window,
        inv_freq=np.asarray(rope_frequencies(mc.head_dim, mc.rope_theta, mc.rope_scaling)),
        max_shift=max(0, max_shift),
    )
    keys = put(train.keys, keys_sharding(mesh))
    batches = Batches(train, targets, tc.batch_size, tc.seed)
    train.keys = None  # the devices hold them now: a long capture is gigabytes
    evaluate = functools.partial(retrieval.evaluate, k=k, sinks=data.sinks, window=data.window)
    last = min(tc.steps, stop_after) if stop_after is not None else tc.steps
    train_start = time.perf_counter()
    checkpoints = Checkpoints(out / "checkpoints", tc.keep_checkpoints)
    try:
        if checkpoints.steps():
            if resume_step is not None:
                checkpoints.delete_after(resume_step)
            stepper.state = checkpoints.restore(stepper.abstract_state(), resume_step)
            log({"event": "resume", "step": stepper.step}, f"resumed from step {stepper.step}")
        _train_loop(stepper, keys, batches, checkpoints, log, last, heldout, evaluate)
        checkpoints.wait()
    finally:
        checkpoints.close()
    step = stepper.step
    train_seconds = time.perf_counter() - train_start
    if step < tc.steps:  # stopped early on purpose
        return RunResult({"step": step}, stepper.trainee())

    hasher = stepper.trainee().hasher
    results = retrieval.compare_hashers(
        heldout, hasher, k=k, sinks=data.sinks, window=data.window, seed=tc.seed
    )
    hasher_path = out / "hasher"
    artifact.save_hasher(
        hasher,
        hasher_path,
        metadata={
            "model": config.model,
            "train_config": config_to_json(config),
            "heldout": {name: _scalars(m) for name, m in results.items()},
            "budget": {"tier1": k, "context": data.context},
        },
    )
    summary = {
        "results": results,
        "k": k,
        "context": data.context,
        "capture_seconds": round(capture_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "hasher": str(hasher_path),
        "devices": [str(d) for d in mesh.devices.flat],
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__}",
    }
    log(
        {
            "event": "done",
            **{n: v for n, v in summary.items() if n != "results"},
            "heldout": {name: _scalars(m) for name, m in results.items()},
        }
    )
    if jax.process_index() == 0:
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        if not quiet:
            print(_table(results, k, data.context))
            print(
                f"hasher: {hasher_path}  (capture {capture_seconds:.0f} s, training "
                f"{train_seconds:.0f} s, total {summary['total_seconds']:.0f} s)",
                file=sys.stdout,
            )
    return RunResult(summary, stepper.trainee())


def _scalars(metrics: dict) -> dict:
    return {name: round(metrics[name], 4) for name in retrieval.METRICS}


def reset_run_dir(out: str | os.PathLike) -> None:
    """Deletes a run directory (checkpoints, logs, exported hasher)."""
    shutil.rmtree(out, ignore_errors=True)
