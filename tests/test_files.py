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


def test_overwrite_false_numbers_the_new_file_and_keeps_the_old(tmp_path):
    from fluxion.files import atomic_write

    first = atomic_write(tmp_path / "a.png", lambda tmp: open(tmp, "wb").write(b"1"), overwrite=False)
    second = atomic_write(tmp_path / "a.png", lambda tmp: open(tmp, "wb").write(b"2"), overwrite=False)
    third = atomic_write(tmp_path / "a.png", lambda tmp: open(tmp, "wb").write(b"3"), overwrite=False)
    assert [p.name for p in (first, second, third)] == ["a.png", "a-1.png", "a-2.png"]
    assert [p.read_bytes() for p in (first, second, third)] == [b"1", b"2", b"3"]
    assert sorted(os.listdir(tmp_path)) == ["a-1.png", "a-2.png", "a.png"]  # no temp file left


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    from fluxion.files import atomic_folder

    target = tmp_path / "model"
    atomic_folder(target, lambda d: [(d / n).write_text(n) for n in ("a", "b")])
    assert sorted(os.listdir(target)) == ["a", "b"]

    def crash(folder):
        (folder / "a").write_text("new a")
        raise KeyboardInterrupt  # Ctrl-C half-way through writing the new folder

    with pytest.raises(KeyboardInterrupt):
        atomic_folder(target, crash)
    assert (target / "a").read_text() == "a" and os.listdir(tmp_path) == ["model"]
    atomic_folder(target, lambda d: (d / "c").write_text("c"))
    assert os.listdir(target) == ["c"] and os.listdir(tmp_path) == ["model"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask
