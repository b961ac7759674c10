"""Reading a LeRobotDataset v3.x directory (layout: :mod:`drifting_policy.data.lerobot_format`),
ours or one recorded with LeRobot: :func:`load_replay` gives a :class:`ReplayBuffer` keyed by
LeRobot feature names, with videos decoded once into the on-disk image cache
(:mod:`drifting_policy.data.image_cache`) and memory-mapped afterwards; :func:`read_episodes`
gives episodes back under the keys they were written from (info.json's ``drifting_policy``
entry), for conversion to another format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from drifting_policy.data.image_cache import cached_arrays, source_stat
from drifting_policy.data.lerobot_format import INDEX_FEATURES, INFO
from drifting_policy.data.lerobot_video import VideoFrames
from drifting_policy.data.replay_buffer import ReplayBuffer


def is_lerobot_dataset(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory with ``meta/info.json``."""
    return (Path(path).expanduser() / INFO).is_file()


def read_info(path: str | os.PathLike) -> dict:
    """meta/info.json of a v3 dataset; ValueError for another codebase version."""
    path = Path(path).expanduser()
    if not is_lerobot_dataset(path):
        raise FileNotFoundError(f"LeRobot dataset not found: no {path / INFO}")
    info = json.loads((path / INFO).read_text())
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3."):
        raise ValueError(f"{path}: codebase_version {version!r}; this reader supports LeRobot "
                         "v3.x datasets (convert older ones with LeRobot's "
                         "convert_dataset_v21_to_v30)")
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise ValueError(f"{path / INFO}: missing '{key}'")
    return info


def _parquet_files(root: Path, folder: str) -> list[Path]:
    files = sorted((root / folder).glob("chunk-*/file-*.parquet"))
    if not files:
        raise ValueError(f"{root}: no parquet files under {folder}/chunk-*/")
    return files


def read_episode_index(path: str | os.PathLike) -> list[dict]:
    """meta/episodes rows (without per-episode stats), sorted by episode_index, checked to tile
    the frames 0..N back to back."""
    import pyarrow.parquet as pq

    root = Path(path).expanduser()
    rows = []
    for file in _parquet_files(root, "meta/episodes"):
        columns = [c for c in pq.read_schema(file).names if not c.startswith("stats/")]
        rows += pq.read_table(file, columns=columns).to_pylist()
    rows.sort(key=lambda r: r["episode_index"])
    end = 0
    for row in rows:
        if row["dataset_from_index"] != end or row["dataset_to_index"] <= end:
            raise ValueError(f"{root}: episode {row['episode_index']} spans frames "
                             f"[{row['dataset_from_index']}, {row['dataset_to_index']}), "
                             f"expected to start at {end} and be non-empty")
        end = row["dataset_to_index"]
    return rows


def _column(table, name: str, shape: Sequence[int]) -> np.ndarray:
    import pyarrow as pa

    column = table.column(name).combine_chunks()
    n = len(column)
    if pa.types.is_struct(column.type):  # "image" features: PNG/JPEG bytes
        return np.stack([_decode_image(v["bytes"]) for v in column.to_pylist()])
    while pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) \
            or pa.types.is_large_list(column.type):
        column = column.flatten()
    return np.asarray(column.to_numpy(zero_copy_only=False)).reshape(n, *shape)


def _decode_image(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _decoded_frames(root: Path, info: dict, name: str,
                    episodes: list[dict]) -> Iterator[np.ndarray]:
    """Frames [L_i, H, W, 3] uint8 of video feature ``name`` for each episode in order, decoding
    every file once from start to end (episodes lie back to back in their file)."""
    fps = info["fps"]
    current, frames = None, None
    for row in episodes:
        where = (row[f"videos/{name}/chunk_index"], row[f"videos/{name}/file_index"])
        if where != current:
            if frames is not None:
                frames.close()
            file = root / info["video_path"].format(video_key=name, chunk_index=where[0],
                                                    file_index=where[1])
            if not file.is_file():
                raise ValueError(f"{root}: video file missing: {file}")
            frames, current = VideoFrames(file, fps), where
        start = round(row[f"videos/{name}/from_timestamp"] * fps)
        yield frames.take(start, row["length"])
    if frames is not None:
        frames.close()


def load_replay(
    path: str | os.PathLike,
    keys: Sequence[str],
    expect: Mapping[str, Sequence[int] | None] | None = None,
    use_cache: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ReplayBuffer:
    """Features ``keys`` of a LeRobot v3 dataset as a ReplayBuffer (one episode per LeRobot
    episode, keyed by feature name).

    Low-dim features are [N, *shape] as stored; video and image features [N, H, W, 3] uint8.
    Videos are decoded once into the image cache (``use_cache``, the default) and memory-mapped
    afterwards; ``use_cache=False`` decodes into memory.
    expect: ``{feature: per-step shape}`` checked before anything is read.
    """
    import pyarrow.parquet as pq

    root = Path(path).expanduser()
    info = read_info(root)
    features = info["features"]
    for key in [*keys, *(expect or {})]:
        if key not in features:
            raise ValueError(f"{root}: missing feature '{key}'; features: {sorted(features)}")
    for key, shape in (expect or {}).items():
        if shape is not None and tuple(features[key]["shape"]) != tuple(shape):
            raise ValueError(f"{root}: feature '{key}': expected per-step shape {tuple(shape)}, "
                             f"got {tuple(features[key]['shape'])}")
    episodes = read_episode_index(root)
    lengths = np.array([row["length"] for row in episodes], dtype=np.int64)
    if np.any(lengths != [r["dataset_to_index"] - r["dataset_from_index"] for r in episodes]):
        raise ValueError(f"{root}: meta/episodes 'length' disagrees with the frame ranges")
    videos = [k for k in keys if features[k]["dtype"] == "video"]
    tabular = [k for k in keys if k not in videos]

    parts: dict[str, list[np.ndarray]] = {k: [] for k in [*tabular, "index"]}
    for file in _parquet_files(root, "data"):
        table = pq.read_table(file, columns=list(parts))
        for key in parts:
            shape = features[key]["shape"] if key != "index" else ()
            if features.get(key, {}).get("dtype") == "image":
                shape = ()
            parts[key].append(_column(table, key, shape if shape != [1] else (1,)))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(arrays.pop("index").reshape(-1), kind="stable")
    n_steps = int(lengths.sum())
    if len(order) != n_steps:
        raise ValueError(f"{root}: data/ holds {len(order)} frames, meta/episodes {n_steps}")
    arrays = {k: v[order] for k, v in arrays.items()}

    if videos:
        layout = {k: (tuple(features[k]["shape"]), "uint8") for k in videos}

        def decoded() -> Iterator[dict[str, np.ndarray]]:
            streams = {k: _decoded_frames(root, info, k, episodes) for k in videos}
            for _ in episodes:
                yield {k: next(s) for k, s in streams.items()}

        if use_cache is None or use_cache:
            files = sorted((root / "videos").rglob("*.mp4"))
            arrays.update(cached_arrays(root, layout, n_steps, decoded, cache_dir=cache_dir,
                                        extra={"videos": [source_stat(f) for f in files]}))
        else:
            chunks = list(decoded())
            arrays.update({k: np.concatenate([c[k] for c in chunks]) for k in videos})
    return ReplayBuffer(arrays, np.cumsum(lengths))


def read_episodes(path: str | os.PathLike) -> Iterator[dict[str, np.ndarray]]:
    """Every episode as ``{key: [L, ...]}`` for conversion to another format: features this
    project wrote get their source key, per-step shape and dtype back (info.json's
    ``drifting_policy`` entry); column slices of a key that is also stored whole are dropped;
    any other feature keeps its LeRobot name. LeRobot's bookkeeping columns are not included."""
    root = Path(path).expanduser()
    info = read_info(root)
    sources = info.get("drifting_policy", {}).get("sources", {})
    whole = {s["key"] for s in sources.values() if s["cols"] is None}
    rename = {}
    for name in info["features"]:
        if name in INDEX_FEATURES:
            continue
        source = sources.get(name)
        if source is None:
            rename[name] = (name, None, None)
        elif source["cols"] is None:
            rename[name] = (source["key"], source["shape"], source["dtype"])
        elif source["key"] not in whole:
            rename[name] = (name, None, None)
    buffer = load_replay(root, list(rename))
    for i in range(buffer.n_episodes):
        episode = buffer.get_episode(i)
        out = {}
        for name, (key, shape, dtype) in rename.items():
            value = episode[name]
            if shape is not None:
                value = value.reshape(len(value), *shape).astype(dtype)
            out[key] = value
        yield out
