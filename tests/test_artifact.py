"""The hasher artifact: checksums that catch a damaged copy before Orbax reads it, a clean exit
on every refusal, and an atomic export."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dashkv_jax.errors import DashKVError
from dashkv_jax.hashing import artifact
from dashkv_jax.hashing.artifact import (
    DEFAULT_HASHER,
    METADATA_FILE,
    load_hasher,
    read_metadata,
    save_hasher,
)
from dashkv_jax.hashing.encoders import HasherConfig, simhash

DATA_FILES = "params/ocdbt.process_0/d"  # the per-process data files of an OCDBT checkpoint


def _copy_shipped(tmp_path, name="copy") -> Path:
    copy = tmp_path / name
    shutil.copytree(DEFAULT_HASHER, copy)
    return copy


def _overwrite(path: Path, offset: int, size: int = 64) -> None:
    """What a bad copy or a disk fault does: bytes replaced in place, the size unchanged."""
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\x7f" * min(size, path.stat().st_size - offset))


def _damage_at_offset_100(folder: Path) -> None:
    for file in (folder / DATA_FILES).iterdir():
        _overwrite(file, 100)


def _damage_the_middle_of_every_data_file(folder: Path) -> None:
    for file in (folder / "params").rglob("*"):
        if file.is_file() and file.parent.name == "d":
            _overwrite(file, file.stat().st_size // 2)


def _forget_checksums(folder: Path) -> None:
    record = json.loads((folder / METADATA_FILE).read_text())
    del record["checksums"]
    (folder / METADATA_FILE).write_text(json.dumps(record))


def _cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dashkv_jax.cli", *argv], capture_output=True, text=True
    )


def _assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dashkv: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_the_shipped_hashers_carry_checksums_that_match():
    for folder in (DEFAULT_HASHER, artifact.DEFAULT_SYMMETRIC_HASHER):
        record = read_metadata(folder)
        assert record["checksums"] == artifact.file_checksums(folder / "params")
        load_hasher(folder)


@pytest.mark.parametrize(
    "damage", [_damage_at_offset_100, _damage_the_middle_of_every_data_file], ids=["100", "middle"]
)
def test_a_damaged_copy_is_refused_by_name(tmp_path, damage):
    copy = _copy_shipped(tmp_path)
    damage(copy)
    with pytest.raises(DashKVError, match=rf"the hasher at '{copy}' is damaged \(.* changed"):
        load_hasher(copy)


def test_generate_with_a_damaged_hasher_exits_2_with_one_line(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("A long prompt about nothing in particular. " * 40)
    for damage in (_damage_at_offset_100, _damage_the_middle_of_every_data_file):
        copy = _copy_shipped(tmp_path, damage.__name__)
        damage(copy)
        result = _cli(
            "generate", "--prompt-file", str(prompt), "--attention", "dashkv", "--budget", "100",
            "--hasher", str(copy), "--max-new-tokens", "2",
        )  # fmt: skip
        _assert_one_line_error(result, f"the hasher at '{copy}' is damaged")


def test_weights_that_are_not_plausible_are_refused_even_when_the_files_match(tmp_path):
    copy = _copy_shipped(tmp_path)
    _damage_at_offset_100(copy)  # restores to values of 3.4e38: finite, but not weights
    record = json.loads((copy / METADATA_FILE).read_text())
    record["checksums"] = artifact.file_checksums(copy / "params")  # as if saved damaged
    (copy / METADATA_FILE).write_text(json.dumps(record))
    with pytest.raises(DashKVError, match="is damaged .*not finite or above 1e"):
        load_hasher(copy)


def test_an_artifact_without_checksums_is_refused(tmp_path):
    copy = _copy_shipped(tmp_path)
    _forget_checksums(copy)
    with pytest.raises(DashKVError, match=r"is damaged \(no checksums recorded\)"):
        load_hasher(copy)


def test_a_restore_that_fails_exits_2_with_one_line(tmp_path):
    copy = _copy_shipped(tmp_path)
    _damage_the_middle_of_every_data_file(copy)  # Orbax fails part-way through its reads
    record = json.loads((copy / METADATA_FILE).read_text())
    record["checksums"] = artifact.file_checksums(copy / "params")
    (copy / METADATA_FILE).write_text(json.dumps(record))
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("A long prompt about nothing in particular. " * 40)
    argv = ["generate", "--prompt-file", str(prompt), "--attention", "dashkv", "--budget", "100"]
    for _ in range(3):  # the abandoned reads' callbacks came in about one run of six unguarded
        _assert_one_line_error(_cli(*argv, "--hasher", str(copy)), "is damaged (cannot restore")


def test_an_export_that_dies_half_way_leaves_the_old_artifact(tmp_path, monkeypatch):
    config = HasherConfig("m", num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, bits=32)
    old, new = simhash(config, seed=0), simhash(config, seed=1)
    path = save_hasher(old, tmp_path / "hasher")

    def crash(params):
        raise KeyboardInterrupt  # the process killed after Orbax wrote the new weights

    monkeypatch.setattr(artifact, "file_checksums", crash)
    with pytest.raises(KeyboardInterrupt):
        save_hasher(new, path)
    monkeypatch.undo()
    kept = load_hasher(path)
    np.testing.assert_array_equal(kept.key_encoder.w[...], old.key_encoder.w[...])
    save_hasher(new, path)
    replaced = load_hasher(path)
    np.testing.assert_array_equal(replaced.key_encoder.w[...], new.key_encoder.w[...])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["hasher"]
