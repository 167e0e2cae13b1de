"""Files written whole or not at all, and advisory file locks.

One implementation for everything prunekit writes in place for others to read while it runs:
the calibration cache, converted models' markers, sweeps' status and tables. A reader sees the
old content or the new, never half of it; a lock dies with its process, so a killed writer
never leaves a stale one. Written here rather than taken from a package (``filelock``,
``atomicwrites``) because each is a dozen lines of the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the umask (mkstemp's own is 0o600,
    which would make every result unreadable to the rest of a group on a shared cluster)."""
    mask = os.umask(0)  # the only way to read it; set back at once, at import (one thread)
    os.umask(mask)
    return 0o666 & ~mask


_NEW_FILE_MODE = _new_file_mode()


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary file beside ``path`` (named ``.<name>.<random><suffix>``) for the block to
    write; renamed onto ``path`` when the block succeeds, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _NEW_FILE_MODE)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already after a successful rename


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool | None]:
    """Hold an exclusive advisory lock (``flock``) on ``path`` while the block runs.

    Yields True when the lock is held, False when ``wait`` is false and another process holds
    it, and None when locking is unavailable (no ``fcntl``, as on Windows, or a filesystem that
    refuses locks): the caller decides whether to go on unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield None
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError:  # the filesystem refuses locks (some network filesystems)
            yield None
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def tensor_sha256(flat: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(flat):
        t = flat[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


#: sha256 memo of files by (path, size, mtime): a run hashes the same data files often
_FILE_HASH_MEMO: dict[tuple[str, int, int], str] = {}
_HASH_BLOCK = 1 << 22  # bytes per read


def sha256_file(path: Path) -> str:
    """Streamed sha256 of a file, memoised in-process by (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    cached = _FILE_HASH_MEMO.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    _FILE_HASH_MEMO[key] = digest.hexdigest()
    return _FILE_HASH_MEMO[key]


def cache_root() -> Path:
    """prunekit's cache directory: ``$PRUNEKIT_CACHE_DIR``, else ``~/.cache/prunekit``."""
    env = os.environ.get("PRUNEKIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "prunekit"
