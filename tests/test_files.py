"""Atomic writes: all or nothing, readable like any other file."""

import os

import pytest

from fluxion.files import atomic_write


def test_writes_whole_file_with_the_usual_permissions(tmp_path):
    import torch

    from fluxion.checkpoints import save_state_dict

    path = atomic_write(tmp_path / "sub" / "a.bin", lambda tmp: open(tmp, "wb").write(b"hello"))
    weights = save_state_dict({"w": torch.zeros(2)}, tmp_path / "w.safetensors")  # safetensors replaces the file
    assert path.read_bytes() == b"hello"
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert weights.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def crash(tmp):
        open(tmp, "wb").write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]
