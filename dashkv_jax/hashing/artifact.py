"""The trained-hasher artifact: Orbax weights plus JSON metadata, and its validated loading.

Layout of an artifact folder:

    hasher.json   format, the `HasherConfig` (model id, layers, heads, head_dim, bits, kind,
                  scoring mode, widths), the SHA-256 of every file under params/ ("checksums")
                  and free metadata (train config, held-out recall, ...)
    params/       the hasher's state (parameters and input statistics), Orbax StandardSave

`load_hasher(path, model)` refuses a hasher whose model id, layers, heads or head_dim differ
from the model's (or whose bits differ from `bits=`), naming every difference; and a damaged
one (a file missing, changed or added under params/, or weights that are not finite), before
Orbax reads a byte of it. `save_hasher` writes beside the target and renames, so an export that
dies half-way leaves the old artifact or none. An artifact of the two-stage method (format 1)
is refused with the command that retrains it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dashkv_jax.errors import DashKVError
from dashkv_jax.hashing.encoders import Hasher, HasherConfig
from dashkv_jax.models.loaders import DEFAULT_MODEL

FORMAT = 2  # 2: DASH-KV's three tiers (encoders, tier-2 logit, calibration)
METADATA_FILE = "hasher.json"
PARAMS_DIR = "params"
# Trained encoders and statistics are O(1); a float32 written over with bytes of 0x7f is 3.4e38.
MAX_ABS_WEIGHT = 1e10
# The trained hashers of the bundled models, shipped in the repository (b = 128): for SmolLM2
# DASH-KV's asymmetric one and the symmetric (Spotlight-style) baseline, for Gemma 3 DASH-KV's.
CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
DEFAULT_HASHER = CHECKPOINTS / DEFAULT_MODEL
DEFAULT_SYMMETRIC_HASHER = CHECKPOINTS / f"{DEFAULT_MODEL}-symmetric"


def shipped_hasher(model, kind: str = "asymmetric") -> Path | None:
    """The hasher of `kind` shipped in checkpoints/ for `model` (a loaded model: its id is the
    `model_id` the hasher was trained for), or None."""
    for folder in sorted(CHECKPOINTS.iterdir()) if CHECKPOINTS.is_dir() else ():
        try:
            config = read_metadata(folder)["config"]
        except DashKVError:  # a folder that is not a hasher, or one this code cannot read
            continue
        if config["model_id"] == model.config.name and config["kind"] == kind:
            return folder
    return None


def short_error(err: BaseException) -> str:
    """The root cause's type and first line, without TensorStore's spec dump."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).split("See full TensorStore details")[0].strip()
    first = (text.splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:160]}"


def file_checksums(params: Path) -> dict[str, str]:
    """{path relative to params/: SHA-256 hex} of every file under an artifact's params/."""
    sums = {}
    for file in sorted(p for p in params.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        sums[file.relative_to(params).as_posix()] = digest.hexdigest()
    return sums


def _write_record(path: Path, record: dict) -> None:
    """hasher.json, written beside and renamed: never half-written."""
    partial = path / f"{METADATA_FILE}.{os.getpid()}.tmp"
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path / METADATA_FILE)


def save_hasher(hasher: Hasher, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Writes the artifact folder (replacing one already there); returns its path.

    The folder is built beside `path` and renamed into place: a crash leaves the old artifact
    (or, between the two renames, none), never a mix of old and new files.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(staging / PARAMS_DIR, nnx.state(hasher))
    record = {
        "format": FORMAT,
        "config": dataclasses.asdict(hasher.config),
        "checksums": file_checksums(staging / PARAMS_DIR),
        **(metadata or {}),
    }
    _write_record(staging, record)
    retired = path.with_name(f".{path.name}.{os.getpid()}.old")
    if path.exists():
        os.replace(path, retired)
    os.replace(staging, path)
    shutil.rmtree(retired, ignore_errors=True)
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The artifact's hasher.json as a dict; DashKVError when missing or unreadable."""
    path = Path(path).expanduser()
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise DashKVError(f"no hasher at {str(path)!r} (no {METADATA_FILE})")
    try:
        record = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise DashKVError(f"unreadable {str(meta_path)!r}: {err}") from None
    if record.get("format") == 1:
        raise DashKVError(
            f"the hasher at {str(path)!r} is from before DASH-KV's three tiers (format 1: "
            "two-stage selection, other encoders): retrain it with experiments/train.py "
            "(--config smollm2_2k reproduces the shipped one)"
        )
    if record.get("format") != FORMAT or "config" not in record:
        raise DashKVError(
            f"{str(meta_path)!r} is not a format-{FORMAT} hasher (format {record.get('format')})"
        )
    return record


# HasherConfig fields that only say how decoding uses the weights: chosen after training.
DECODE_DEFAULTS = ("dense_first", "dense_last", "tier2", "t_vote")


def set_decode_defaults(path: str | os.PathLike, **fields) -> dict:
    """Rewrites decoding defaults (`DECODE_DEFAULTS`) in an artifact's hasher.json, e.g. the
    sandwich `experiments/layer_sensitivity.py` chose; the weights are untouched. Returns the
    new config."""
    path = Path(path).expanduser().absolute()
    record = read_metadata(path)
    if unknown := set(fields) - set(DECODE_DEFAULTS):
        raise DashKVError(f"not a decoding default: {', '.join(sorted(unknown))}")
    config = dataclasses.asdict(HasherConfig(**{**record["config"], **fields}))  # validated
    _write_record(path, {**record, "config": config})
    return config


def mismatches(config: HasherConfig, model_config, *, bits: int | None = None) -> list[str]:
    """What differs between a hasher's config and a model (`ModelConfig`), as phrases."""
    found = []
    if config.model_id != model_config.name:
        found.append(f"model id {config.model_id!r} != {model_config.name!r}")
    for field, model_field in (
        ("num_layers", "num_layers"),
        ("num_heads", "num_heads"),
        ("num_kv_heads", "num_kv_heads"),
        ("head_dim", "head_dim"),
    ):
        ours, theirs = getattr(config, field), getattr(model_config, model_field)
        if ours != theirs:
            found.append(f"{field} {ours} != {theirs}")
    if bits is not None and config.bits != bits:
        found.append(f"bits {config.bits} != {bits}")
    return found


def load_hasher(
    path: str | os.PathLike,
    model=None,
    *,
    bits: int | None = None,
    check_model_id: bool = True,
) -> Hasher:
    """Loads an artifact folder, refusing one that does not fit `model` (a `Llama`).

    Args:
      path: the artifact folder (`save_hasher`).
      model: the model it must fit; None skips the check.
      bits: if given, the bits the hasher must have.
      check_model_id: compare the model id too (off: any model of the same shape).

    Raises:
      DashKVError: no or unreadable artifact, a hasher that does not fit, naming every
        difference ("num_layers 30 != 32, head_dim 64 != 128"), or a damaged one ("the hasher
        at DIR is damaged (d/3f2a... changed)").
    """
    path = Path(path).expanduser().absolute()
    record = read_metadata(path)
    try:
        config = HasherConfig(**record["config"])
    except TypeError as err:
        raise DashKVError(f"{str(path)!r} has a bad hasher config: {err}") from err
    if model is not None:
        found = mismatches(config, model.config, bits=bits)
        if not check_model_id:
            found = [f for f in found if not f.startswith("model id")]
        if found:
            raise DashKVError(
                f"the hasher at {str(path)!r} does not fit the model: {', '.join(found)}"
            )
    elif bits is not None and config.bits != bits:
        raise DashKVError(f"the hasher at {str(path)!r} has {config.bits} bits, not {bits}")
    verify_files(path, record)
    return _restore(path, config)


def verify_files(path: Path, record: dict) -> None:
    """Raises DashKVError unless the files under params/ are exactly those whose SHA-256 the
    metadata records (an artifact saved before checksums gets the command that adds them)."""
    if "checksums" not in record:
        raise DashKVError(f"the hasher at {str(path)!r} is damaged (no checksums recorded)")
    expected, found = record["checksums"], file_checksums(path / PARAMS_DIR)
    problems = [f"{name} missing" for name in sorted(set(expected) - set(found))]
    problems += [f"{name} unexpected" for name in sorted(set(found) - set(expected))]
    problems += [
        f"{name} changed"
        for name in sorted(set(expected) & set(found))
        if expected[name] != found[name]
    ]
    if problems:
        shown = ", ".join(problems[:3]) + (
            f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise DashKVError(f"the hasher at {str(path)!r} is damaged ({shown})")


def _restore(path: Path, config: HasherConfig) -> Hasher:
    """The hasher in params/, refused unless every array restores and is finite."""
    abstract = nnx.eval_shape(lambda: Hasher(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    # On this process's first device: with several processes (jax.distributed), each restores
    # its own copy instead of Orbax assembling global arrays.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local), abstract_state
    )
    try:
        with _AbandonedReads(), ocp.StandardCheckpointer() as checkpointer:
            state = checkpointer.restore(path / PARAMS_DIR, abstract_state)
    except Exception as err:  # Orbax/TensorStore raise many types for damaged files
        raise DashKVError(
            f"the hasher at {str(path)!r} is damaged (cannot restore its weights: "
            f"{short_error(err)})"
        ) from None
    bad = [
        jax.tree_util.keystr(key)
        for key, leaf in jax.tree_util.tree_leaves_with_path(state)
        if not (np.abs(np.asarray(leaf)) <= MAX_ABS_WEIGHT).all()  # NaN compares False
    ]
    if bad:
        raise DashKVError(
            f"the hasher at {str(path)!r} is damaged (weights that are not finite or above "
            f"{MAX_ABS_WEIGHT:g} in size: {', '.join(bad[:3])})"
        )
    return nnx.merge(graphdef, state)


class _AbandonedReads(logging.Filter):
    """The noise of the reads a failed restore abandons, dropped; returns to normal once a
    restore succeeds.

    Orbax runs a restore's reads as tasks on an event loop it closes as soon as one read fails.
    The others still complete in TensorStore's threads: their callbacks into the closed loop
    reach `sys.unraisablehook` ("Event loop is closed") and their tasks, never awaited, log
    "Task exception was never retrieved" to the `asyncio` logger, from the moment the loop
    closes up to process exit. Those, and only those, are expected after the one error the
    caller reports; every other unraisable error and log record passes as before.
    """

    NOISE = ("Task exception was never retrieved", "Task was destroyed but it is pending")

    def __init__(self):
        super().__init__()
        self.previous_hook = None

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)

    def hook(self, unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            self.previous_hook(unraisable)

    def __enter__(self):
        self.previous_hook = sys.unraisablehook
        sys.unraisablehook = self.hook
        logging.getLogger("asyncio").addFilter(self)
        return self

    def __exit__(self, error_type, error, traceback):
        if error_type is None:  # every read completed: none can call back late
            sys.unraisablehook = self.previous_hook
            logging.getLogger("asyncio").removeFilter(self)
