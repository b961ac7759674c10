"""Crash-safe writes and RNG snapshots: the persistence helpers every writer in the project shares.

`atomic_path(dst)` yields a temporary sibling path; write a file or a directory there, and on a
clean exit it is made durable (fsync) and renamed onto `dst` — a kill at any moment leaves either
the old `dst` or the new one, never a mix. On an exception the temporary path is removed and `dst`
is untouched.

`rng_state()` / `set_rng_state()` snapshot Python's, NumPy's and torch's (CPU and CUDA) global RNGs
as plain containers that `torch.load(weights_only=True)` accepts.
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


@contextmanager
def atomic_path(dst: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `dst` (same directory, hidden name, nothing there yet).

    Whatever the caller creates at that path (a file or a directory tree) replaces `dst` when the
    block exits cleanly; an existing `dst` that a rename cannot replace (a directory, or a file
    where a directory arrives) is swapped out and deleted afterwards.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if not (tmp.exists() or tmp.is_symlink()):
            raise FileNotFoundError(f"atomic_path({dst}): nothing was written at {tmp}")
        _fsync_tree(tmp)
        if dst.exists() and (dst.is_dir() or tmp.is_dir()):  # rename cannot replace these
            old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            _remove(old)
        else:
            os.replace(tmp, dst)
    finally:
        _remove(tmp)


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as weights_only-loadable containers."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(internal), "python_version": version, "python_gauss": gauss,
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore what `rng_state()` captured."""
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
