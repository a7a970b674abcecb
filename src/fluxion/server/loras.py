"""Per-request LoRA adapters: `lora: [{"name" or "path", "scale"}]` resolved to files at submission (names among
the adapters folder, $FLUXION_HOME/loras and the built-in ones; paths only inside the adapters folder), and an LRU
of adapters loaded into each pipeline, switched per batch group with Pipeline.set_loras."""

import contextlib
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from ..files import sha256_file
from ..registry import BUILTIN_LORAS, fluxion_home
from ..settings import lora_scale
from .errors import bad_request, not_found
from .security import contained

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: hash each file once
_hash_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _hash_lock:
        if key in _hashes:
            return _hashes[key]
    digest = sha256_file(path)
    with _hash_lock:
        _hashes[key] = digest
    return digest


def _by_name(name: str, adapters_dir: Path, param: str) -> Path:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise bad_request(f"{param}: expected an adapter name (letters, digits, '_', '-', '.'), got {name!r:.80}",
                          param)
    file = name if name.endswith(".safetensors") else f"{name}.safetensors"
    looked = [adapters_dir / file, fluxion_home() / "loras" / file, BUILTIN_LORAS / file]
    for path in looked:
        if path.is_file():
            return path
    available = sorted({p.stem for folder in (adapters_dir, BUILTIN_LORAS) if folder.is_dir()
                        for p in folder.glob("*.safetensors")})
    raise not_found(f"{param}: no LoRA adapter named {name!r}; available: {', '.join(available) or 'none'}", param,
                    code="lora_not_found")


def resolve_loras(raw, adapters_dir: Path, param: str = "lora") -> list[dict]:
    """[{"name" or "path", "scale"}] -> [{"name", "file", "sha256", "scale"}], refusing (400/404, naming the
    entry) unknown adapters, paths outside the adapters folder and scales out of range."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or len(raw) > 4:
        raise bad_request(f"{param}: expected a list of up to 4 {{\"name\" or \"path\", \"scale\"}} objects", param)
    out = []
    for i, entry in enumerate(raw):
        where = f"{param}[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or ("name" in entry) == ("path" in entry) or set(entry) - {"name", "path",
                                                                                                 "scale"}:
            raise bad_request(f"{where}: expected an object with \"name\" or \"path\" (one of them) and an optional "
                              "\"scale\"", where)
        if "path" in entry:
            path = contained(adapters_dir, entry["path"], f"{where}.path")
            if path.suffix != ".safetensors" or not path.is_file():
                raise not_found(f"{where}.path: no .safetensors file {entry['path']!r:.80} in the adapters folder",
                                f"{where}.path", code="lora_not_found")
        else:
            path = _by_name(entry["name"], adapters_dir, f"{where}.name")
        try:
            scale = lora_scale(f"{where}.scale", entry.get("scale", 1.0))
        except Exception as e:  # InputError: the range is in its message
            raise bad_request(" ".join(str(e).split()), f"{where}.scale") from None
        out.append({"name": path.stem, "file": os.fspath(path), "sha256": file_sha256(path), "scale": scale})
    if len({a["sha256"] for a in out}) != len(out):
        raise bad_request(f"{param}: the same adapter is given twice", param)
    return out


class AdapterCache:
    """Adapters loaded into one pipeline, by sha256, at most `capacity`. Loaded but inactive adapters cost nothing
    per step (their hooks skip them), so switching between groups is a set_loras call, not a reload."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def use(self, pipe, loras: list[dict]):
        """Run a group on `pipe` with these adapters. Adapters are hooks on the shared modules, so several workers
        may use one pipeline at once only with the same adapter set; a worker wanting another set waits until the
        pipeline is free, then switches it."""
        key = tuple((a["sha256"], a["scale"]) for a in loras)
        with self._cond:
            while True:
                active, users = getattr(pipe, "_server_use", ((), 0))
                if users == 0:
                    self.activate(pipe, loras)
                    pipe._server_use = (key, 1)
                    break
                if active == key:
                    pipe._server_use = (key, users + 1)
                    break
                self._cond.wait()
        try:
            yield pipe
        finally:
            with self._cond:
                active, users = pipe._server_use
                pipe._server_use = (active, users - 1)
                self._cond.notify_all()

    def activate(self, pipe, loras: list[dict]) -> None:
        """Make exactly these adapters active in `pipe`, at their scales, in their order."""
        if not hasattr(pipe, "_server_adapters"):  # sha256 -> adapter name, kept on the pipeline it describes
            pipe._server_adapters = OrderedDict()
        loaded = pipe._server_adapters
        needed = [a["sha256"] for a in loras]
        if len(set(loaded) | set(needed)) > self.capacity:  # Pipeline unloads all at once: start afresh
            pipe.unload_loras()
            loaded.clear()
        for adapter in loras:
            sha = adapter["sha256"]
            if sha not in loaded:
                name = adapter["name"]
                if name in loaded.values() or name in getattr(pipe, "lora_files", {}):
                    name = f"{name}-{sha[:8]}"
                name = pipe.load_lora(adapter["file"], name=name, scale=adapter["scale"])
                if pipe.lora_files[name][1] != sha:
                    raise RuntimeError(f"LoRA file {adapter['file']} changed since the request was accepted")
                loaded[sha] = name
            loaded.move_to_end(sha)
        pipe.set_loras({loaded[a["sha256"]]: a["scale"] for a in loras})
