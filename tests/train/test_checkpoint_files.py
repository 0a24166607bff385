"""Checkpoint integrity and disk faults (opendelta_dist.train.checkpoint): manifest, fallback, full disk."""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import pytest

from opendelta_dist.errors import DeltaCheckpointError
from opendelta_dist.train import checkpoint as ckpt

MiB = 1 << 20


def make_checkpoint(root: Path, step: int) -> Path:
    """A finished checkpoint with the usual layout, files of a few KiB, written like the recipe does."""
    directory = ckpt.step_dir(root, step)
    (directory / "delta").mkdir(parents=True)
    (directory / "delta" / "config.json").write_text('{"delta_type": "lora"}\n')
    (directory / "delta" / "delta_model.safetensors").write_bytes(os.urandom(4096))
    (directory / "training_state.pt").write_bytes(os.urandom(2048))
    for rank in range(2):
        (directory / f"rng_rank{rank}.pt").write_bytes(os.urandom(512))
    ckpt.write_trainer_state(directory, {"step": step, "world_size": 2})
    return directory


def test_the_manifest_lists_every_other_file_and_verifies(tmp_path):
    directory = make_checkpoint(tmp_path, 50)
    state = ckpt.read_trainer_state(directory)
    assert state["step"] == 50
    assert sorted(state["files"]) == [
        "delta/config.json",
        "delta/delta_model.safetensors",
        "rng_rank0.pt",
        "rng_rank1.pt",
        "training_state.pt",
    ]
    entry = state["files"]["delta/delta_model.safetensors"]
    assert entry["size"] == 4096 and len(entry["sha256"]) == 64
    assert ckpt.verify_checkpoint(directory) is None


def test_the_caller_state_is_not_modified(tmp_path):
    state = {"step": 1}
    (tmp_path / "training_state.pt").write_bytes(b"x")
    ckpt.write_trainer_state(tmp_path, state)
    assert state == {"step": 1}


def test_a_truncated_file_is_found_by_its_size(tmp_path):
    directory = make_checkpoint(tmp_path, 50)
    weights = directory / "delta" / "delta_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1024])
    assert ckpt.verify_checkpoint(directory) == "delta/delta_model.safetensors is 1024 bytes, 4096 expected (truncated)"


def test_sizes_are_checked_before_hashes(tmp_path):
    directory = make_checkpoint(tmp_path, 50)
    _flip_a_byte(directory / "delta" / "config.json")
    (directory / "training_state.pt").write_bytes(b"short")
    assert ckpt.verify_checkpoint(directory) == "training_state.pt is 5 bytes, 2048 expected (truncated)"


def test_a_flipped_byte_is_found_by_its_hash(tmp_path):
    directory = make_checkpoint(tmp_path, 50)
    _flip_a_byte(directory / "training_state.pt")
    assert ckpt.verify_checkpoint(directory) == "training_state.pt does not match its SHA-256 (corrupted)"


def test_a_missing_file_is_named(tmp_path):
    directory = make_checkpoint(tmp_path, 50)
    (directory / "rng_rank1.pt").unlink()
    assert ckpt.verify_checkpoint(directory) == "rng_rank1.pt is missing"


def test_invalid_json_is_reported_not_raised(tmp_path):
    directory = make_checkpoint(tmp_path, 50)
    (directory / ckpt.TRAINER_STATE).write_text('{"step": 50, "files": {')
    assert ckpt.verify_checkpoint(directory) == "trainer_state.json is not valid JSON"
    with pytest.raises(DeltaCheckpointError, match="is not valid JSON"):
        ckpt.read_trainer_state(directory)


def test_a_manifest_pointing_outside_the_checkpoint_is_malformed(tmp_path):
    directory = make_checkpoint(tmp_path, 50)
    state = json.loads((directory / ckpt.TRAINER_STATE).read_text())
    state["files"]["../elsewhere"] = {"size": 1, "sha256": "0" * 64}
    (directory / ckpt.TRAINER_STATE).write_text(json.dumps(state))
    assert ckpt.verify_checkpoint(directory) == "the file list in trainer_state.json is malformed"


def test_a_checkpoint_without_a_manifest_is_accepted(tmp_path):
    directory = make_checkpoint(tmp_path, 50)
    # as earlier versions wrote it: no "files", and the files may differ without anyone knowing
    (directory / ckpt.TRAINER_STATE).write_text(json.dumps({"step": 50, "world_size": 2}))
    _flip_a_byte(directory / "training_state.pt")
    assert ckpt.verify_checkpoint(directory) is None


def test_choose_checkpoint_falls_back_past_damaged_ones(tmp_path):
    oldest, middle, newest = (make_checkpoint(tmp_path, step) for step in (10, 20, 30))
    _flip_a_byte(newest / "training_state.pt")
    (middle / ckpt.TRAINER_STATE).write_text("not json")
    chosen, damaged = ckpt.choose_checkpoint(tmp_path)
    assert chosen == oldest
    assert damaged == [
        (newest, "training_state.pt does not match its SHA-256 (corrupted)"),
        (middle, "trainer_state.json is not valid JSON"),
    ]


def test_choose_checkpoint_takes_the_newest_when_all_are_intact(tmp_path):
    make_checkpoint(tmp_path, 10)
    newest = make_checkpoint(tmp_path, 20)
    assert ckpt.choose_checkpoint(tmp_path) == (newest, [])
    assert ckpt.choose_checkpoint(tmp_path / "absent") == (None, [])


def test_choose_checkpoint_returns_none_when_all_are_damaged(tmp_path):
    first, second = make_checkpoint(tmp_path, 10), make_checkpoint(tmp_path, 20)
    (first / "rng_rank0.pt").unlink()
    (second / "delta" / "delta_model.safetensors").write_bytes(b"")
    chosen, damaged = ckpt.choose_checkpoint(tmp_path)
    assert chosen is None
    assert damaged == [
        (second, "delta/delta_model.safetensors is 0 bytes, 4096 expected (truncated)"),
        (first, "rng_rank0.pt is missing"),
    ]


def test_set_aside_renames_and_hides_the_checkpoint_from_resume_and_prune(tmp_path):
    damaged = make_checkpoint(tmp_path, 10)
    moved = ckpt.set_aside(damaged)
    assert moved == tmp_path / "step_00000010.damaged" and moved.is_dir() and not damaged.exists()
    assert (moved / "training_state.pt").is_file()
    # the same step damaged again (after a rerun) gets the next free name
    assert ckpt.set_aside(make_checkpoint(tmp_path, 10)).name == "step_00000010.damaged.1"
    assert ckpt.set_aside(make_checkpoint(tmp_path, 10)).name == "step_00000010.damaged.2"

    kept = [make_checkpoint(tmp_path, step) for step in (20, 30, 40)]
    assert ckpt.complete_checkpoints(tmp_path) == kept
    assert ckpt.latest_checkpoint(tmp_path) == kept[-1]
    ckpt.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000010.damaged",
        "step_00000010.damaged.1",
        "step_00000010.damaged.2",
        "step_00000040",
    ]


def test_checkpoint_size_counts_every_file(tmp_path):
    directory = make_checkpoint(tmp_path, 10)
    expected = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    assert ckpt.checkpoint_size(directory) == expected
    assert expected > 4096 + 2048 + 2 * 512


def test_the_space_error_is_a_checkpoint_error_and_an_os_error():
    error = ckpt.CheckpointSpaceError("the disk is full")
    assert isinstance(error, DeltaCheckpointError) and isinstance(error, OSError)
    assert error.errno == errno.ENOSPC and str(error) == "the disk is full"
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ckpt.CheckpointSpaceError and copy.errno == errno.ENOSPC and str(copy) == str(error)


def test_writing_lets_other_errors_through(tmp_path):
    with pytest.raises(FileNotFoundError), ckpt.writing(tmp_path / "absent" / "file"):
        (tmp_path / "absent" / "file").write_bytes(b"x")
    with pytest.raises(OSError) as info, ckpt.writing(tmp_path / "file"):
        raise OSError(errno.EIO, "input/output error")
    assert type(info.value) is OSError


def test_writing_translates_a_quota_error(tmp_path):
    with pytest.raises(ckpt.CheckpointSpaceError) as info, ckpt.writing(tmp_path / "file"):
        raise OSError(errno.EDQUOT, "disk quota exceeded")
    assert info.value.errno == errno.EDQUOT
    assert f"the disk quota ran out while writing {tmp_path / 'file'}: " in str(info.value)


def test_check_free_space_refuses_what_does_not_fit(small_disk):
    root = small_disk / "run" / "checkpoints"  # not created yet: its filesystem is asked
    ckpt.check_free_space(root, MiB)
    with pytest.raises(ckpt.CheckpointSpaceError) as info:
        ckpt.check_free_space(root, 10 * MiB)
    message = str(info.value)
    assert str(root) in message
    assert "10.0 MB needed, 2.0 MB free" in message
    assert "point run_dir to another filesystem" in message and "the previous checkpoints are intact" in message


def test_a_full_disk_while_writing_is_a_checkpoint_space_error(small_disk):
    target = small_disk / ".step_00000010.tmp" / "training_state.pt"
    target.parent.mkdir()
    with pytest.raises(ckpt.CheckpointSpaceError) as info, ckpt.writing(target, needed=3 * MiB):
        target.write_bytes(os.urandom(3 * MiB))
    error = info.value
    assert error.errno == errno.ENOSPC
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.ENOSPC
    message = str(error)
    assert f"the disk filled up while writing {target}: 3.0 MB needed, " in message
    assert "MB free now" in message and "the previous checkpoints are intact" in message


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
