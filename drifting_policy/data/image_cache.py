"""On-disk cache of a dataset's arrays as memory-mapped ``.npy`` files, built once.

Decoding images from (gzip) HDF5 at every training step is slow, and a ToolHang image dataset
(~100k steps of two 240x240 cameras, ~35 GB raw) does not fit in memory. The first run converts
the arrays a config needs into uncompressed ``.npy`` files next to the source; later runs
memory-map them, so a training window reads only its own frames and DataLoader workers share the
OS page cache::

    <cache_dir or the source's folder>/<source name>.cache/<16 hex digits>/
        fingerprint.json    source path, size and mtime; keys with per-step shape and dtype; steps
        <key>.npy           [n_steps, ...]

The entry name hashes the fingerprint, so different key selections of one file coexist. An entry
is built under a temporary name and renamed into place only when complete, under a lock file, so
concurrent processes (DDP ranks, parallel runs) build it once. When the source file changes (size
or mtime), its old entries no longer match and are deleted the next time an entry is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
from filelock import FileLock
from tqdm import tqdm

from drifting_policy.persist import atomic_path

Layout = Mapping[str, tuple[tuple[int, ...], str]]  # key -> (per-step shape, dtype name)
_FINGERPRINT = "fingerprint.json"


def source_stat(path: Path) -> dict:
    """What identifies a version of the source file: resolved path, size, mtime (ns)."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_root(source: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``source``'s cache entries."""
    return Path(cache_dir or source.parent).expanduser() / f"{source.name}.cache"


def cached_arrays(
    source: str | os.PathLike,
    layout: Layout,
    n_steps: int,
    episodes: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    extra: Mapping | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """``{key: [n_steps, *shape]}`` read-only memory maps of the cached arrays, building the
    cache entry first if needed.

    source: the file the arrays come from (its size and mtime key the cache).
    layout: ``{key: (per-step shape, dtype name)}`` of the arrays to cache.
    episodes: called only when building; yields ``{key: [L_i, *shape]}`` with sum L_i = n_steps.
    extra: anything else that changes the content (e.g. the demo filter), JSON-serialisable.
    """
    source = Path(source).expanduser()
    for key in layout:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"cache key {key!r} is not a valid file name")
    fingerprint = {
        "source": source_stat(source), "n_steps": int(n_steps), "extra": dict(extra or {}),
        "layout": {k: [list(map(int, shape)), str(np.dtype(dtype))]
                   for k, (shape, dtype) in sorted(layout.items())},
    }
    digest = hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_root(source, cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    entry = root / digest
    with FileLock(str(root / ".lock")):
        if not _matches(entry, fingerprint):
            _remove_stale(root, fingerprint["source"])
            _build(entry, fingerprint, episodes)
    return {key: np.load(entry / f"{key}.npy", mmap_mode="r") for key in layout}


def _matches(entry: Path, fingerprint: dict) -> bool:
    try:
        return json.loads((entry / _FINGERPRINT).read_text()) == fingerprint
    except (OSError, ValueError):
        return False


def _remove_stale(root: Path, source: dict) -> None:
    """Delete entries of an older version of the source, and leftovers of interrupted builds."""
    for entry in root.iterdir():
        if not entry.is_dir():
            continue
        try:
            stale = json.loads((entry / _FINGERPRINT).read_text())["source"] != source
        except (OSError, ValueError, KeyError):
            stale = True
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def _build(entry: Path, fingerprint: dict, episodes) -> None:
    with atomic_path(entry) as tmp:
        tmp.mkdir()
        n_steps = fingerprint["n_steps"]
        arrays = {
            key: np.lib.format.open_memmap(tmp / f"{key}.npy", mode="w+", dtype=np.dtype(dtype),
                                           shape=(n_steps, *shape))
            for key, (shape, dtype) in fingerprint["layout"].items()
        }
        start = 0
        name = Path(fingerprint["source"]["path"]).name
        with tqdm(total=n_steps, desc=f"caching {name}", unit="step") as bar:
            for episode in episodes():
                length = len(next(iter(episode.values())))
                if start + length > n_steps:
                    raise ValueError(f"{name}: more than the expected {n_steps} steps")
                for key, array in arrays.items():
                    value = np.asarray(episode[key])
                    if value.shape != (length, *array.shape[1:]):
                        raise ValueError(f"{name}: key '{key}': expected shape "
                                         f"{(length, *array.shape[1:])}, got {value.shape}")
                    array[start : start + length] = value
                start += length
                bar.update(length)
        if start != n_steps:
            raise ValueError(f"{name}: expected {n_steps} steps, got {start}")
        for array in arrays.values():
            array.flush()
        del arrays
        (tmp / _FINGERPRINT).write_text(json.dumps(fingerprint, indent=1))
