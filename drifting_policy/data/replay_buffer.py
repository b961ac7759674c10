"""In-memory replay buffer in Diffusion Policy's zarr layout.

On disk (a zarr group, directory or ``.zarr.zip``)::

    data/<key>          [N, ...]  time-major, every key has the same N, chunked along time only
    meta/episode_ends   [E] int64 cumulative end index of each episode (last one == N)

Diffusion Policy's published files (e.g. ``pusht_cchi_v7_replay.zarr`` with
``data/{img,state,keypoint,action,n_contacts}``) are zarr format 2, written by zarr-python 2.
:meth:`ReplayBuffer.save` writes format 2 as well (``.zgroup`` / ``.zarray``), so those tools can
read our files; :meth:`ReplayBuffer.load` reads format 2 and 3.

Example::

    buf = ReplayBuffer.empty()
    buf.add_episode({"obs": np.zeros((50, 16)), "action": np.zeros((50, 2))})
    buf.save("demos.zarr")
    buf = ReplayBuffer.load("demos.zarr", expect={"obs": (16,), "action": (2,)})
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.storage import ZipStore

from drifting_policy.persist import atomic_path

# Diffusion Policy's default data compressor and target chunk size.
_COMPRESSOR = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.NOSHUFFLE)
_TARGET_CHUNK_BYTES = 2_000_000


class ReplayBuffer:
    """Episodes stored back to back: ``data[key]`` is ``[n_steps, ...]``, ``episode_ends`` is
    ``[n_episodes]`` int64 cumulative.

    Arrays grow geometrically in :meth:`add_episode`; ``data`` and ``buf[key]`` are views of the
    filled part.
    """

    def __init__(self, data: Mapping[str, np.ndarray], episode_ends: np.ndarray) -> None:
        episode_ends = np.asarray(episode_ends)
        _check_episode_ends(episode_ends, where="episode_ends")
        self._episode_ends = episode_ends.astype(np.int64)
        n_steps = int(self._episode_ends[-1]) if len(self._episode_ends) else 0
        self._store: dict[str, np.ndarray] = {}
        for key, value in data.items():
            value = np.asarray(value)
            if value.ndim == 0 or value.shape[0] != n_steps:
                raise ValueError(
                    f"key '{key}' has shape {value.shape} but episode_ends says {n_steps} steps"
                )
            self._store[key] = value

    @classmethod
    def empty(cls) -> ReplayBuffer:
        """A buffer with no keys and no episodes; the first episode added fixes the keys."""
        return cls({}, np.zeros((0,), dtype=np.int64))

    # ------------------------------------------------------------------ dict-like access
    @property
    def data(self) -> dict[str, np.ndarray]:
        """``{key: [n_steps, ...]}`` views of the stored arrays."""
        return {key: self[key] for key in self._store}

    @property
    def episode_ends(self) -> np.ndarray:
        """``[n_episodes]`` int64 cumulative end indices."""
        return self._episode_ends

    def keys(self) -> list[str]:
        return list(self._store)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._store:
            raise KeyError(f"key '{key}' not in replay buffer; keys: {self.keys()}")
        return self._store[key][: self.n_steps]

    def __contains__(self, key: object) -> bool:
        return key in self._store

    @property
    def n_steps(self) -> int:
        return int(self._episode_ends[-1]) if len(self._episode_ends) else 0

    @property
    def n_episodes(self) -> int:
        return len(self._episode_ends)

    @property
    def episode_lengths(self) -> np.ndarray:
        """``[n_episodes]`` int64."""
        return np.diff(self._episode_ends, prepend=0)

    def get_episode(self, i: int) -> dict[str, np.ndarray]:
        """Copy of episode ``i`` (negative indices count from the end): ``{key: [L_i, ...]}``."""
        if not -self.n_episodes <= i < self.n_episodes:
            raise IndexError(f"episode {i} out of range for {self.n_episodes} episodes")
        i %= self.n_episodes
        start = int(self._episode_ends[i - 1]) if i > 0 else 0
        end = int(self._episode_ends[i])
        return {key: self[key][start:end].copy() for key in self._store}

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.shape[1:]} {v.dtype}" for k, v in self._store.items())
        return f"ReplayBuffer({self.n_episodes} episodes, {self.n_steps} steps; {shapes})"

    # ------------------------------------------------------------------ writing
    def add_episode(self, episode: Mapping[str, np.ndarray]) -> None:
        """Append one episode ``{key: [L, ...]}``; all keys share L >= 1 and, after the first
        episode, the key set and per-step shapes must match the buffer's."""
        if not episode:
            raise ValueError("add_episode: empty episode dict")
        episode = {key: np.asarray(value) for key, value in episode.items()}
        lengths = {key: (v.shape[0] if v.ndim else None) for key, v in episode.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise ValueError(f"add_episode: keys have different lengths {lengths}")
        length = next(iter(lengths.values()))
        if length == 0:
            raise ValueError("add_episode: episode has length 0")
        if (self._store or self.n_steps) and set(episode) != set(self._store):
            raise ValueError(
                f"add_episode: keys {sorted(episode)} != buffer keys {sorted(self._store)}"
            )
        for key, value in episode.items():
            if key in self._store and value.shape[1:] != self._store[key].shape[1:]:
                raise ValueError(
                    f"add_episode: key '{key}': expected per-step shape "
                    f"{self._store[key].shape[1:]}, got {value.shape[1:]}"
                )

        start, end = self.n_steps, self.n_steps + length
        for key, value in episode.items():
            store = self._store.get(key)
            if store is None:
                store = np.empty((0,) + value.shape[1:], dtype=value.dtype)
            if end > store.shape[0]:  # grow geometrically so appending stays linear-time
                grown = np.empty((max(end, 2 * store.shape[0]),) + store.shape[1:], store.dtype)
                grown[:start] = store[:start]
                store = grown
            store[start:end] = value
            self._store[key] = store
        self._episode_ends = np.append(self._episode_ends, np.int64(end))

    def save(self, path: str | os.PathLike, chunk_length: int | None = None) -> None:
        """Write a zarr format-2 group at ``path`` (a directory, or a zip file when the name ends
        in ``.zip``), replacing what is there only once the new copy is complete.

        ``chunk_length`` steps per chunk; by default about 2 MB per chunk, like Diffusion Policy.
        """
        path = Path(path).expanduser()
        with atomic_path(path) as tmp:
            if path.suffix == ".zip":
                with ZipStore(tmp, mode="w") as store:
                    self._write_group(zarr.open_group(store=store, mode="w", zarr_format=2),
                                      chunk_length)
            else:
                self._write_group(zarr.open_group(tmp, mode="w", zarr_format=2), chunk_length)

    def _write_group(self, root: zarr.Group, chunk_length: int | None) -> None:
        writer = ZarrReplayWriter(root, chunk_length)
        writer.add_episodes(self.data, self.episode_lengths)
        writer.close()

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        keys: list[str] | None = None,
        expect: Mapping[str, tuple | None] | None = None,
    ) -> ReplayBuffer:
        """Read a zarr group (format 2 or 3; directory or ``.zarr.zip``) into memory.

        keys: the ``data/`` arrays to load (default: all).
        expect: ``{key: per-step shape}`` checked before anything is read, e.g.
            ``{"action": (2,), "keypoint": (9, 2)}``; ``None`` as the shape only requires the key.
        Raises FileNotFoundError when ``path`` does not exist, ValueError (naming the path and the
        problem) for anything else: not a zarr group, missing ``meta/episode_ends`` or key, wrong
        per-step shape, array lengths that disagree with ``episode_ends``.
        """
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"replay buffer not found: {path}")
        store = ZipStore(path, mode="r") if path.is_file() and path.suffix == ".zip" else path
        try:
            try:
                root = zarr.open_group(store=store, mode="r")
            except Exception as exc:  # zarr raises several types for missing/garbled metadata
                raise ValueError(f"{path}: not a readable zarr group ({exc})") from exc
            return cls._from_group(root, path, keys, expect or {})
        finally:
            if isinstance(store, ZipStore):
                store.close()

    @classmethod
    def _from_group(cls, root: zarr.Group, path: Path, keys: list[str] | None,
                    expect: Mapping[str, tuple | None]) -> ReplayBuffer:
        for name in ("data", "meta"):
            if not isinstance(root.get(name), zarr.Group):
                raise ValueError(f"{path}: no '{name}' group; present: {sorted(root.keys())}")
        data, meta = root["data"], root["meta"]
        present = sorted(data.array_keys())
        if not isinstance(meta.get("episode_ends"), zarr.Array):
            raise ValueError(
                f"{path}: missing 'meta/episode_ends'; meta holds {sorted(meta.keys())}"
            )
        for key in list(keys or []) + list(expect):
            if key not in present:
                raise ValueError(f"{path}: missing key '{key}'; keys present: {present}")
        for key, shape in expect.items():
            if shape is not None and tuple(data[key].shape[1:]) != tuple(shape):
                raise ValueError(
                    f"{path}: key '{key}': expected per-step shape {tuple(shape)}, "
                    f"got {tuple(data[key].shape[1:])}"
                )

        episode_ends = _read(meta["episode_ends"], path, "meta/episode_ends")
        _check_episode_ends(episode_ends, where=f"{path}: meta/episode_ends")
        n_steps = int(episode_ends[-1]) if len(episode_ends) else 0
        arrays = {}
        for key in keys if keys is not None else present:
            shape = data[key].shape
            if len(shape) == 0 or shape[0] != n_steps:
                raise ValueError(
                    f"{path}: key '{key}' has shape {shape} but meta/episode_ends says "
                    f"{n_steps} steps"
                )
            arrays[key] = _read(data[key], path, f"data/{key}")
        return cls(arrays, episode_ends)


class ZarrReplayWriter:
    """Stream episodes into an empty zarr group in Diffusion Policy's layout.

    Arrays are created from the first block and grow along time, so memory stays at one block
    (e.g. one episode of images). ``close()`` writes ``meta/episode_ends``.
    """

    def __init__(self, root: zarr.Group, chunk_length: int | None = None) -> None:
        self.root, self.chunk_length = root, chunk_length
        self.arrays: dict[str, zarr.Array] = {}
        self.ends: list[int] = []

    def add_episode(self, episode: Mapping[str, np.ndarray]) -> None:
        """episode: {key: [L, ...]} with one L > 0 for every key."""
        lengths = {len(v) for v in episode.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"episode {len(self.ends)}: arrays must share one non-zero length, "
                             f"got { {k: np.shape(v) for k, v in episode.items()} }")
        self.add_episodes(episode, [lengths.pop()])

    def add_episodes(self, columns: Mapping[str, np.ndarray], lengths) -> None:
        """columns: {key: [sum(lengths), ...]} holding consecutive episodes of these lengths."""
        if self.arrays and set(columns) != set(self.arrays):
            raise ValueError(f"episode {len(self.ends)} has keys {sorted(columns)}, "
                             f"expected {sorted(self.arrays)}")
        data = self.root.require_group("data")
        for key, value in columns.items():
            value = np.asarray(value)
            if key not in self.arrays:
                step_bytes = max(1, value.dtype.itemsize * math.prod(value.shape[1:]))
                length = self.chunk_length or math.ceil(_TARGET_CHUNK_BYTES / step_bytes)
                length = max(1, min(length, value.shape[0]))
                self.arrays[key] = data.create_array(
                    key, shape=value.shape, dtype=value.dtype,
                    chunks=(length,) + value.shape[1:], compressors=_COMPRESSOR)
                self.arrays[key][...] = value
            else:
                array = self.arrays[key]
                start = array.shape[0]
                array.resize((start + len(value), *array.shape[1:]))
                array[start:] = value
        for n in lengths:
            self.ends.append((self.ends[-1] if self.ends else 0) + int(n))

    def close(self) -> int:
        """Write meta/episode_ends; returns the number of episodes."""
        ends = np.asarray(self.ends, dtype=np.int64)
        meta = self.root.require_group("meta")
        array = meta.create_array("episode_ends", shape=ends.shape, dtype=np.int64,
                                  chunks=(max(1, len(ends)),), compressors=None)
        array[...] = ends
        return len(ends)


def write_replay_atomic(path: str | os.PathLike, episodes, chunk_length: int | None = None) -> int:
    """Stream `episodes` ({key: [L, ...]} each) to a zarr format-2 directory at `path`, built
    under a temporary sibling name and moved into place (replacing `path`) only when complete.
    Returns the number of episodes; raises ValueError when there are none."""
    path = Path(path).expanduser()
    with atomic_path(path) as tmp:
        writer = ZarrReplayWriter(zarr.open_group(tmp, mode="w", zarr_format=2), chunk_length)
        for episode in episodes:
            writer.add_episode(episode)
        if not writer.ends:
            raise ValueError(f"{path}: no episodes to write")
        n = writer.close()
    return n


def _read(array: zarr.Array, path: Path, name: str) -> np.ndarray:
    try:
        return np.asarray(array[...])
    except Exception as exc:
        raise ValueError(f"{path}: cannot read '{name}' ({exc})") from exc


def _check_episode_ends(episode_ends: np.ndarray, where: str) -> None:
    """Episode ends must be a 1-D integer array of strictly increasing positive values."""
    if episode_ends.ndim != 1 or not np.issubdtype(episode_ends.dtype, np.integer):
        raise ValueError(
            f"{where}: expected 1-D integers, got shape {episode_ends.shape} {episode_ends.dtype}"
        )
    if len(episode_ends) and np.any(np.diff(episode_ends, prepend=0) <= 0):
        raise ValueError(f"{where}: must be strictly increasing and positive, got {episode_ends}")
