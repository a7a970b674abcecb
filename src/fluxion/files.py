"""Atomic file writes (readers see the old file or the whole new one, never a half-written one) and file hashes."""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def numbered(path: Path, n: int) -> Path:
    """path itself for n = 0, else <stem>-<n><suffix>: the names tried when a file must not be overwritten."""
    return path if n == 0 else path.with_name(f"{path.stem}-{n}{path.suffix}")


def _claim(tmp: str, path: Path) -> Path:
    """Give the finished temp file the first free name among path, path-1, path-2, ... without ever replacing a
    file: a hard link fails if the name exists, even when another process takes it at the same moment."""
    for n in range(1_000_000):
        candidate = numbered(path, n)
        try:
            os.link(tmp, candidate)
        except FileExistsError:
            continue
        except OSError:  # file systems without hard links: check, then rename (a race window remains)
            if candidate.exists():
                continue
            os.replace(tmp, candidate)
            return candidate
        os.unlink(tmp)
        return candidate
    raise FileExistsError(f"no free name for {path}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], *, overwrite: bool = True) -> Path:
    """Call write(tmp_path) on a temp file beside `path`, fsync it, then rename it over `path` (and fsync the
    folder, so the rename survives a crash). On any error, Ctrl-C included, the temp file is removed and `path`
    is untouched. With overwrite=False an existing file is kept and the new one is numbered (numbered()); the
    path written is returned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # after the write: mkstemp makes 0600 files, and some writers (safetensors) replace the file they are given
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            path = _claim(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(data, path: str | os.PathLike) -> Path:
    """JSON (indented, newline-terminated), written atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def atomic_folder(path: str | os.PathLike, build: Callable[[Path], object]) -> Path:
    """Call build(tmp_dir) on a temp folder beside `path`, then move it into place: readers see the old folder or
    the whole new one. An existing folder at `path` is replaced only after the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        build(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():  # put the previous folder back
            os.replace(old / path.name, path)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks (weights files can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
