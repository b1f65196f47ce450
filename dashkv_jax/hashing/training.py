"""Training the hashers: ranking loss, sharded train step, Orbax checkpoints, the whole run.

Data. Captured keys of every training window stay on the devices ([C, L, T, Hkv, D]); each
sampled query carries its queries [L, Hq, D], its window and position, the oracle's top-P keys
and its softmax normalisers (`capture.oracle_targets`). A step takes B queries (a permutation
of all samples per epoch, fixed by the seed and the step) and, inside the jitted step, draws
`negatives` eligible keys uniformly per (query, layer, KV head) and gathers the keys it needs.

Loss. For each (query, layer, KV head) the relaxed hashed score of key k is
  s_asym(k) = sum_j tanh(f(q_j)) . sgn(g(k)),   s_ham(k) = sum_j sgn(f(q_j)) . sgn(g(k))
over the G query heads j of the group, where sgn is the sign forward and tanh's gradient
backward (straight-through). Every (oracle top key i, sampled key j) pair with exact group
attention p_i > p_j adds the Bradley-Terry term softplus(-a_l (s_i - s_j)), a_l a learned
per-layer scale; the loss is the mean over pairs of the asymmetric term plus `hamming_weight`
times the hamming term, plus `balance_weight` times the bit balance (the squared mean of each
bit's tanh over sampled keys and over queries).

Positions. Hashers learn the positions they are trained at: trained on 1024-token windows they
fall below SimHash at a 4096-token context. Train at the context you decode at. An option,
`max_shift`, moves each sample's window a random Δ later (keys and queries rotated by Δ; RoPE
attention depends on relative positions only, so the targets stay exact). It covers absolute
positions but not longer relative distances; measured on the bundled model (1024-token
windows, Δ up to 7168) it trades recall at 1024 (0.949 -> 0.911) for recall at 2048 (0.812 ->
0.855) and 4096 (0.655 -> 0.717), so it is off by default.

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
from dashkv_jax.hashing.encoders import Hasher, HasherConfig, fit_input_stats
from dashkv_jax.models.llama import rope_frequencies
from dashkv_jax.models.loaders import DEFAULT_MODEL

Array = jax.Array


@dataclasses.dataclass(slots=True, frozen=True)
class TrainConfig:
    """The hasher's shape, the loss, the optimiser and the mesh."""

    # hasher
    bits: int = 128
    kind: str = "asymmetric"  # or "symmetric"
    key_hidden: int = 0
    query_width: int = 16
    query_depth: int = 2
    query_skip: bool = True
    # targets and loss
    positives: int = 32  # oracle top keys per (query, layer, KV head)
    negatives: int = 32  # uniformly sampled eligible keys per (query, layer, KV head)
    hamming_weight: float = 0.5
    balance_weight: float = 0.1
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
        if self.kind not in ("asymmetric", "symmetric"):
            raise DashKVError(f"can train 'asymmetric' or 'symmetric' hashers, got {self.kind!r}")
        if self.bits < 32 or self.bits % 32:
            raise DashKVError(f"bits must be a positive multiple of 32, got {self.bits}")
        for name in ("steps", "batch_size", "positives", "negatives", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise DashKVError(f"{name} must be >= 1, got {getattr(self, name)}")

    def hasher_config(self, model_config, model_id: str | None = None) -> HasherConfig:
        return HasherConfig.for_model(
            model_config,
            model_id,
            bits=self.bits,
            kind=self.kind,
            key_hidden=self.key_hidden,
            query_width=self.query_width,
            query_depth=self.query_depth,
            query_skip=self.query_skip,
        )


# -- model, loss, step -------------------------------------------------------------------------


class Trainee(nnx.Module):
    """What the optimiser updates: the hasher and the loss's per-layer score scales."""

    def __init__(self, config: HasherConfig, *, rngs: nnx.Rngs):
        self.hasher = Hasher(config, rngs=rngs)
        # Pair logits a_l (s_i - s_j) start near unit scale: scores spread like sqrt(G * bits).
        init = -0.5 * np.log(config.group_size * config.bits)
        self.log_scale = nnx.Param(jnp.full((config.num_layers,), init, jnp.float32))


def sign_ste(x: Array) -> Array:
    """sign(x) forward, the gradient of tanh(x) backward."""
    soft = jnp.tanh(x)
    return soft + jax.lax.stop_gradient(jnp.where(x > 0, 1.0, -1.0) - soft)


def _pair_loss(scores: Array, probs: Array, positives: int, scale: Array) -> Array:
    """Mean Bradley-Terry loss over (top, sampled) pairs ordered by exact attention.

    scores, probs [L, B, J, Hkv] with the J keys = `positives` oracle top, then sampled.
    """
    s_top, s_other = scores[:, :, :positives, None], scores[:, :, None, positives:]
    p_top, p_other = probs[:, :, :positives, None], probs[:, :, None, positives:]
    margin = scale[:, None, None, None, None] * (s_top - s_other)  # [L, B, P, N, Hkv]
    ordered = p_top > p_other  # a sampled key may itself be in the oracle's top
    return jnp.sum(jnp.where(ordered, jax.nn.softplus(-margin), 0.0)) / jnp.maximum(
        jnp.sum(ordered), 1
    )


def shift_positions(x: Array, offset: Array, inv_freq: Array) -> Array:
    """Post-RoPE vectors x [..., D] moved `offset` [...] positions later (rotate-half RoPE).

    RoPE rotates each pair (i, i + D/2) by position * inv_freq[i], so moving a token later is
    one more rotation; a query and a key moved by the same offset keep their dot product.
    """
    angles = offset[..., None].astype(jnp.float32) * inv_freq  # [..., D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def loss_fn(
    trainee: Trainee,
    keys: Array,  # [C, L, T, Hkv, D] training windows' keys
    batch: dict,  # queries [B,L,Hq,D], context [B], position [B], top [B,L,Hkv,P], lse [B,L,Hq]
    rng: Array,
    config: TrainConfig,
    sinks: int,
    window: int,
    inv_freq: Array | None = None,  # [D/2] the model's RoPE frequencies (for max_shift)
    max_shift: int = 0,
) -> tuple[Array, dict]:
    c = trainee.hasher.config
    num_layers, hkv, g, d = c.num_layers, c.num_kv_heads, c.group_size, c.head_dim
    b = batch["position"].shape[0]
    # Sampled keys: uniform over the eligible range [sinks, position - window].
    high = (batch["position"] - window + 1)[:, None, None, None]
    sampled = jax.random.randint(rng, (b, num_layers, hkv, config.negatives), sinks, high)
    index = jnp.concatenate([batch["top"], sampled], axis=-1).transpose(1, 0, 3, 2)  # [L,B,J,Hkv]
    gathered = keys[
        batch["context"][None, :, None, None],
        jnp.arange(num_layers)[:, None, None, None],
        index,
        jnp.arange(hkv)[None, None, None, :],
    ]  # [L, B, J, Hkv, D]
    queries = batch["queries"].transpose(1, 0, 2, 3)  # [L, B, Hq, D]

    # Exact group attention of the gathered keys (the ranking to learn).
    qg = queries.reshape(num_layers, b, hkv, g, d)
    logits = jnp.einsum("lbhgd,lbjhd->lbjhg", qg, gathered) * d**-0.5
    lse = batch["lse"].transpose(1, 0, 2).reshape(num_layers, b, 1, hkv, g)
    probs = jnp.sum(jnp.exp(logits - lse), axis=-1)  # [L, B, J, Hkv]

    if max_shift > 0:
        # Attention depends on relative positions only, so the window moved later in the
        # context has the same targets: the encoders learn keys and queries at every position
        # up to the model's context without running the model that long.
        offset = jax.random.randint(jax.random.fold_in(rng, 1), (b,), 0, max_shift + 1)
        gathered = shift_positions(gathered, offset[None, :, None, None], inv_freq)
        queries = shift_positions(queries, offset[None, :, None], inv_freq)

    # Relaxed hashed scores.
    k_logits = trainee.hasher.key_logits(gathered)  # [L, B, J, Hkv, bits]
    key_codes = sign_ste(k_logits)
    q_logits = trainee.hasher.query_logits(queries)  # [L, B, Hq, bits]
    q_soft = jnp.tanh(q_logits)
    group = (num_layers, b, hkv, g, c.bits)
    asym = jnp.einsum("lbhx,lbjhx->lbjh", q_soft.reshape(group).sum(3), key_codes)
    ham = jnp.einsum("lbhx,lbjhx->lbjh", sign_ste(q_logits).reshape(group).sum(3), key_codes)
    scale = jnp.exp(trainee.log_scale[...])
    rank_asym = _pair_loss(asym, probs, config.positives, scale)
    rank_ham = _pair_loss(ham, probs, config.positives, scale)

    key_balance = jnp.mean(jnp.tanh(k_logits[:, :, config.positives :]), axis=(1, 2))
    balance = jnp.mean(key_balance**2) + jnp.mean(jnp.mean(q_soft, axis=1) ** 2)
    loss = rank_asym + config.hamming_weight * rank_ham + config.balance_weight * balance
    return loss, {"rank_asym": rank_asym, "rank_ham": rank_ham, "balance": balance}


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


def _jit_train_step(graphdef, state, config, mesh, sinks, window, inv_freq, max_shift):
    """(the jitted step, its graphdef, the state's shardings) for one config and mesh."""
    state_sharding = state_shardings(state, mesh)
    base_rng = jax.random.key(config.seed)
    inv_freq = None if inv_freq is None else jnp.asarray(inv_freq, jnp.float32)

    def train_step(state, keys, batch):
        trainee, optimizer = nnx.merge(graphdef, state)
        rng = jax.random.fold_in(base_rng, optimizer.step[...])  # the step's own samples
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
        (loss, parts), grads = grad_fn(
            trainee, keys, batch, rng, config, sinks, window, inv_freq, max_shift
        )
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


def _table(results: dict, k: int, candidates: int, context: int) -> str:
    rows = [
        f"held-out recall, context {context}, budget k={k}, candidates C={candidates}",
        f"{'method':<26} {'top-k recall':>12} {'IoU':>7} {'mass recall':>12}",
    ]
    for name, m in results.items():
        rows.append(
            f"{name:<26} {m['topk_recall']:>12.4f} {m['iou']:>7.4f} {m['mass_recall']:>12.4f}"
        )
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
                f"step {step:>5}  loss {metrics['loss']:.4f}  rank {metrics['rank_asym']:.4f}"
                f"  balance {metrics['balance']:.4f}  {rate:.2f} steps/s",
            )
            window_start, window_steps = time.perf_counter(), 0
        if step % tc.eval_every == 0 and step < tc.steps:
            m = evaluate(stepper.trainee().hasher, heldout, max_queries=tc.eval_queries)
            log(
                {"step": step, "heldout": _scalars(m)},
                f"step {step:>5}  held-out top-k recall {m['topk_recall']:.4f}"
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
    k, candidates = config.budget.sizes(config.heldout_data.context)
    data = config.heldout_data
    retrieval.check_budget(heldout, k, candidates, data.sinks, data.window)

    hasher_config = tc.hasher_config(model.config, model_id)
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
    evaluate = functools.partial(
        retrieval.evaluate, k=k, candidates=candidates, sinks=data.sinks, window=data.window
    )
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
        heldout,
        hasher,
        k=k,
        candidates=candidates,
        sinks=data.sinks,
        window=data.window,
        seed=tc.seed,
    )
    hasher_path = out / "hasher"
    artifact.save_hasher(
        hasher,
        hasher_path,
        metadata={
            "model": config.model,
            "train_config": config_to_json(config),
            "heldout": {name: _scalars(m) for name, m in results.items()},
            "budget": {"k": k, "candidates": candidates, "context": data.context},
        },
    )
    summary = {
        "results": results,
        "k": k,
        "candidates": candidates,
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
            print(_table(results, k, candidates, data.context))
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
