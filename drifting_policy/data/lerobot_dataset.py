"""LeRobotDataset v3 on disk (LeRobot 0.4.x, codebase_version "v3.0"): writer and reader.

Layout of a dataset directory (what LeRobot's ``LeRobotDataset(repo_id, root=DIR)`` opens)::

    meta/info.json                      fps, features {name: dtype, shape, names}, totals, path
                                        templates (data_path, video_path)
    meta/stats.json                     {feature: {min, max, mean, std, count, q01..q99}}; images
                                        per channel [3, 1, 1] in [0, 1]
    meta/tasks.parquet                  task strings (the index) -> task_index
    meta/episodes/chunk-000/file-000.parquet
                                        one row per episode: length, dataset_from_index /
                                        dataset_to_index (rows of data/), data/ and per video
                                        key videos/<key>/{chunk_index, file_index, from_timestamp,
                                        to_timestamp}, stats/<feature>/<stat>
    data/chunk-000/file-000.parquet     one row per frame: each non-video feature, timestamp,
                                        frame_index, episode_index, index, task_index
    videos/<key>/chunk-000/file-000.mp4 many episodes back to back, frame i at time i / fps

Written with pyarrow + PyAV rather than LeRobot's own library: ``lerobot`` / ``lerobot-dataset``
0.4.4 pin ``huggingface-hub<0.36`` (and lerobot ``torch<2.11``), which cannot be installed
next to this project's diffusers (it needs huggingface-hub >= 1) and torch 2.14. Videos use
LeRobot's defaults (AV1 via libsvtav1, yuv420p, GOP 2, CRF 30; PyAV wheels ship the encoder
and the dav1d decoder).

How our arrays become LeRobot features is a *layout*: ``{feature name: (buffer key, cols)}``
(cols ``(start, stop)`` after flattening, or None). Low-dim features are stored flattened
([L, D] float32); a [L, H, W, 3] uint8 source becomes a video. Buffer keys that no feature
uses whole are stored too, under their own name ("extras": LeRobot's policies only read
``observation.*`` and ``action``), so nothing is lost; ``info.json``'s ``drifting_policy`` entry
records each feature's source key and per-step shape, so :func:`read_episodes` can invert it.

Reading (:func:`load_replay`) gives a :class:`ReplayBuffer` keyed by LeRobot feature names;
videos are decoded once into the on-disk image cache (:mod:`drifting_policy.data.image_cache`)
and memory-mapped afterwards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from drifting_policy.data.image_cache import cached_arrays, source_stat
from drifting_policy.data.replay_buffer import ReplayBuffer
from drifting_policy.persist import atomic_path

CODEBASE_VERSION = "v3.0"
INFO = "meta/info.json"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
CHUNKS_SIZE = 1000  # files per chunk folder (LeRobot's default)
DATA_FILE_MB, VIDEO_FILE_MB = 100, 200  # LeRobot's defaults: start a new file past these
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
# LeRobot's bookkeeping columns (info.json "features" lists them too)
INDEX_FEATURES = {"timestamp": "float32", "frame_index": "int64", "episode_index": "int64",
                  "index": "int64", "task_index": "int64"}

Layout = Mapping[str, tuple[str, tuple[int, int] | None]]

# Diffusion Policy's PushT zarr keys (img, state, keypoint, action, n_contacts) under the names of
# LeRobot's own PushT datasets: observation.state is the agent position (state[:, :2]),
# observation.environment_state the 9 block keypoints (18), observation.image the 96x96 frame.
PUSHT_LAYOUT: Layout = {
    "observation.image": ("img", None),
    "observation.state": ("state", (0, 2)),
    "observation.environment_state": ("keypoint", None),
    "action": ("action", None),
}


def is_lerobot_dataset(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory with ``meta/info.json``."""
    return (Path(path).expanduser() / INFO).is_file()


def _is_image(array: np.ndarray) -> bool:
    """[L, H, W, 3]: RGB frames, uint8 or (Diffusion Policy's PushT zarr) float in 0..255."""
    return array.ndim == 4 and array.shape[-1] == 3


def _as_uint8(frames: np.ndarray) -> np.ndarray:
    if frames.dtype == np.uint8:
        return frames
    if frames.size and (np.nanmin(frames) < 0 or np.nanmax(frames) > 255):
        raise ValueError(f"image frames must lie in 0..255, got [{np.nanmin(frames)}, "
                         f"{np.nanmax(frames)}] ({frames.dtype})")
    return np.rint(frames).astype(np.uint8)


def generic_layout(sample: Mapping[str, np.ndarray]) -> dict[str, tuple[str, None]]:
    """Every key whole: ``action`` -> action, [L, H, W, 3] images ->
    ``observation.images.<key>``, anything else -> ``observation.<key>``."""
    layout = {}
    for key, value in sample.items():
        if key == "action":
            layout["action"] = ("action", None)
        elif _is_image(np.asarray(value)):
            layout[f"observation.images.{key}"] = (key, None)
        else:
            layout[f"observation.{key}"] = (key, None)
    return layout


def feature_name(key: str, features: Iterable[str]) -> str | None:
    """The LeRobot feature holding buffer key ``key`` under :func:`generic_layout`'s naming (or
    the key itself), None when there is none."""
    features = set(features)
    for name in (key, f"observation.{key}", f"observation.images.{key}"):
        if name in features:
            return name
    return None


# ---------------------------------------------------------------------------- statistics
def feature_stats(x: np.ndarray, image: bool = False) -> dict[str, np.ndarray]:
    """LeRobot's statistics of one feature over N frames: x [N, ...] flattened to [N, D], or
    with ``image`` [N, H, W, 3] uint8 reduced per channel to shape [3, 1, 1] in [0, 1].
    min / max / mean / std (population), the quantiles q01, q10, q50, q90, q99 (exact) and
    count [1] = N."""
    n = len(x)
    x = x.reshape(-1, 3) / 255.0 if image else x.reshape(n, -1).astype(np.float64)
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}
    out.update({f"q{round(q * 100):02d}": np.quantile(x, q, axis=0) for q in QUANTILES})
    if image:
        out = {k: v.reshape(3, 1, 1) for k, v in out.items()}
    out["count"] = np.array([n])
    return out


class _StatsAccumulator:
    """Dataset statistics from per-episode arrays, kept until the end for exact quantiles
    (images: every 5th frame, every 4th pixel row and column — plenty for per-channel stats,
    ~1/80 of the pixels in memory)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}
        self.images: set[str] = set()

    def add(self, name: str, x: np.ndarray, image: bool = False) -> np.ndarray:
        """Store x [L, ...]; returns what was stored (the subsampled frames for images)."""
        if image:
            self.images.add(name)
            x = x[::5, ::4, ::4]
        self.parts.setdefault(name, []).append(x)
        return x

    def result(self) -> dict[str, dict[str, np.ndarray]]:
        return {name: feature_stats(np.concatenate(parts), name in self.images)
                for name, parts in self.parts.items()}


def _json_stats(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    return {name: {k: np.asarray(v).tolist() for k, v in s.items()} for name, s in stats.items()}


# ---------------------------------------------------------------------------- writer
class _VideoFile:
    """One mp4 being written: frames get consecutive pts in units of 1 / fps; ``bytes`` counts
    the encoded size so far."""

    def __init__(self, path: Path, fps: int, height: int, width: int, codec: str,
                 options: Mapping[str, str]) -> None:
        import av

        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only, not its banner
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.frames, self.bytes = path, 0, 0
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream(codec, rate=fps, options=dict(options))
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.time_base = Fraction(1, fps)

    def write(self, frames: np.ndarray) -> None:
        import av

        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.frames
            self.frames += 1
            packets = self.stream.encode(frame)
            self.bytes += sum(packet.size for packet in packets)
            self.container.mux(packets)

    def close(self) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()


class LeRobotWriter:
    """Stream episodes into an empty directory as a LeRobotDataset v3.

    layout: ``{feature: (buffer key, cols or None)}``; the first episode fixes keys and shapes.
    fps: frames per second (LeRobot stores an int). task: the one task string of every episode.
    video_codec / video_options: PyAV encoder name and options (LeRobot's defaults).
    metadata: JSON-ready extras kept in info.json's ``drifting_policy`` entry.
    """

    def __init__(self, root: Path, layout: Layout, fps: int, task: str = "",
                 robot_type: str | None = None, video_codec: str = "libsvtav1",
                 video_options: Mapping[str, str] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> None:
        if not isinstance(fps, int) or fps < 1:
            raise ValueError(f"fps: expected a positive int (LeRobot stores fps as an int), "
                             f"got {fps!r}")
        if "action" not in layout:
            raise ValueError(f"layout: needs an 'action' feature, got {sorted(layout)}")
        self.root, self.layout, self.fps, self.task = root, dict(layout), fps, task
        self.robot_type, self.codec = robot_type, video_codec
        self.metadata = dict(metadata or {})
        self.options = dict(video_options or {"g": "2", "crf": "30", "preset": "12"})
        self.features: dict[str, dict] | None = None
        self.sources: dict[str, tuple[str, tuple[int, int] | None]] = {}
        self.episodes: list[dict] = []
        self.stats = _StatsAccumulator()
        self.n_frames = 0
        self._data_writer = None
        self._data_file = (0, 0)
        self._data_bytes = 0
        self._videos: dict[str, _VideoFile] = {}
        self._video_index: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------------ schema
    def _init_features(self, episode: Mapping[str, np.ndarray]) -> None:
        missing = sorted({key for key, _ in self.layout.values()} - set(episode))
        if missing:
            raise ValueError(f"episode 0 lacks {missing} (layout sources); has {sorted(episode)}")
        whole = {key for key, cols in self.layout.values() if cols is None}
        self.sources = dict(self.layout)
        for key in sorted(set(episode) - whole):  # extras: keys no feature holds whole
            if key in self.sources:
                raise ValueError(f"extra key '{key}' collides with a layout feature name")
            self.sources[key] = (key, None)
        self.features = {}
        provenance = {}
        for name, (key, cols) in self.sources.items():
            if "/" in name:
                raise ValueError(f"feature name '{name}': LeRobot forbids '/' in names")
            value = np.asarray(episode[key])
            if _is_image(value) and cols is None:
                h, w = value.shape[1:3]
                if h % 2 or w % 2:
                    raise ValueError(f"'{key}': video frames need even height and width "
                                     f"(yuv420p), got {h}x{w}")
                self.features[name] = {
                    "dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
                    "info": {"video.height": h, "video.width": w, "video.codec": "av1"
                             if self.codec == "libsvtav1" else self.codec,
                             "video.pix_fmt": "yuv420p", "video.is_depth_map": False,
                             "video.fps": self.fps, "video.channels": 3, "has_audio": False}}
            else:
                dim = self._flat(value, cols, name).shape[1]
                self.features[name] = {"dtype": "float32", "shape": [dim], "names": None}
            provenance[name] = {"key": key, "cols": list(cols) if cols else None,
                                "shape": list(value.shape[1:]), "dtype": str(value.dtype)}
        self.provenance = provenance
        for name, dtype in INDEX_FEATURES.items():
            self.features[name] = {"dtype": dtype, "shape": [1], "names": None}

    @staticmethod
    def _flat(value: np.ndarray, cols, name: str) -> np.ndarray:
        flat = value.reshape(len(value), -1)
        if cols is not None:
            if not 0 <= cols[0] < cols[1] <= flat.shape[1]:
                raise ValueError(f"feature '{name}': cols {list(cols)} outside the "
                                 f"{flat.shape[1]} columns of its source")
            flat = flat[:, cols[0] : cols[1]]
        return flat.astype(np.float32)

    @property
    def video_keys(self) -> list[str]:
        return [n for n, f in (self.features or {}).items() if f["dtype"] == "video"]

    # ------------------------------------------------------------------ episodes
    def add_episode(self, episode: Mapping[str, np.ndarray]) -> None:
        """episode: ``{buffer key: [L, ...]}`` with one L >= 1 (other entries are ignored when
        they are not arrays)."""
        episode = {k: np.asarray(v) for k, v in episode.items() if isinstance(v, np.ndarray)}
        index = len(self.episodes)
        if self.features is None:
            self._init_features(episode)
        lengths = {k: len(v) for k, v in episode.items() if v.ndim}
        length = next(iter(lengths.values()), 0)
        if length == 0 or len(set(lengths.values())) != 1:
            raise ValueError(f"episode {index}: arrays must share one length >= 1, got {lengths}")
        row: dict[str, Any] = {"episode_index": index, "tasks": [self.task], "length": length}
        columns, ep_stats = {}, {}
        for name, (key, cols) in self.sources.items():
            if key not in episode:
                raise ValueError(f"episode {index}: missing '{key}'; has {sorted(episode)}")
            feature = self.features[name]
            value = episode[key]
            if feature["dtype"] == "video":
                if tuple(value.shape[1:]) != tuple(feature["shape"]):
                    raise ValueError(f"episode {index}: '{key}': expected frames "
                                     f"[L, {', '.join(map(str, feature['shape']))}], got "
                                     f"{value.dtype} {value.shape}")
                value = _as_uint8(value)
                row.update(self._write_video(name, value))
                ep_stats[name] = feature_stats(self.stats.add(name, value, image=True), True)
            else:
                flat = self._flat(value, cols, name)
                if flat.shape[1] != feature["shape"][0]:
                    raise ValueError(f"episode {index}: '{key}': expected {feature['shape'][0]} "
                                     f"values per step (episode 0), got {flat.shape[1]}")
                columns[name] = flat
        start = self.n_frames
        columns["timestamp"] = (np.arange(length) / self.fps).astype(np.float32)
        columns["frame_index"] = np.arange(length, dtype=np.int64)
        columns["episode_index"] = np.full(length, index, dtype=np.int64)
        columns["index"] = np.arange(start, start + length, dtype=np.int64)
        columns["task_index"] = np.zeros(length, dtype=np.int64)
        for name, value in columns.items():
            ep_stats[name] = feature_stats(self.stats.add(name, value))
        row.update(self._write_data(columns))
        row.update({"dataset_from_index": start, "dataset_to_index": start + length,
                    "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        for name, s in ep_stats.items():
            row.update({f"stats/{name}/{k}": np.asarray(v).tolist() for k, v in s.items()})
        self.episodes.append(row)
        self.n_frames += length

    def _write_data(self, columns: Mapping[str, np.ndarray]) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays, fields = [], []
        for name, feature in self.features.items():
            if feature["dtype"] == "video":
                continue
            value = columns[name]
            if feature["shape"] == [1]:
                array = pa.array(value.reshape(-1))
            else:
                dim = feature["shape"][0]
                array = pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)), dim)
            arrays.append(array)
            fields.append(pa.field(name, array.type))
        table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
        if self._data_writer is not None and self._data_bytes + table.nbytes > DATA_FILE_MB << 20:
            self._data_writer.close()
            self._data_writer, self._data_bytes = None, 0
            self._data_file = _next_file(*self._data_file)
        if self._data_writer is None:
            path = self.root / DATA_PATH.format(chunk_index=self._data_file[0],
                                                file_index=self._data_file[1])
            path.parent.mkdir(parents=True, exist_ok=True)
            self._data_writer = pq.ParquetWriter(str(path), table.schema, compression="snappy")
        self._data_writer.write_table(table)
        self._data_bytes += table.nbytes
        return {"data/chunk_index": self._data_file[0], "data/file_index": self._data_file[1]}

    def _write_video(self, name: str, frames: np.ndarray) -> dict:
        video = self._videos.get(name)
        if video is not None and video.bytes > VIDEO_FILE_MB << 20:
            video.close()
            video = None
            self._video_index[name] = _next_file(*self._video_index[name])
        if video is None:
            chunk, file = self._video_index.setdefault(name, (0, 0))
            path = self.root / VIDEO_PATH.format(video_key=name, chunk_index=chunk,
                                                 file_index=file)
            h, w = frames.shape[1:3]
            video = self._videos[name] = _VideoFile(path, self.fps, h, w, self.codec,
                                                    self.options)
        start = video.frames
        video.write(frames)
        chunk, file = self._video_index[name]
        return {f"videos/{name}/chunk_index": chunk, f"videos/{name}/file_index": file,
                f"videos/{name}/from_timestamp": start / self.fps,
                f"videos/{name}/to_timestamp": video.frames / self.fps}

    def close(self) -> int:
        """Finish the files and write meta/; returns the number of episodes."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.episodes:
            raise ValueError(f"{self.root}: no episodes to write")
        self._data_writer.close()
        for video in self._videos.values():
            video.close()
        (self.root / EPISODES_PATH).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.episodes), str(self.root / EPISODES_PATH))
        pq.write_table(_tasks_table([self.task]), str(self.root / "meta/tasks.parquet"))
        stats = _json_stats(self.stats.result())
        (self.root / "meta/stats.json").write_text(json.dumps(stats, indent=4))
        info = {
            "codebase_version": CODEBASE_VERSION, "robot_type": self.robot_type,
            "total_episodes": len(self.episodes), "total_frames": self.n_frames,
            "total_tasks": 1, "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": DATA_FILE_MB,
            "video_files_size_in_mb": VIDEO_FILE_MB, "fps": self.fps,
            "splits": {"train": f"0:{len(self.episodes)}"}, "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.video_keys else None, "features": self.features,
            "drifting_policy": {"sources": self.provenance, **self.metadata},
        }
        (self.root / INFO).write_text(json.dumps(info, indent=4))
        return len(self.episodes)


def _next_file(chunk: int, file: int) -> tuple[int, int]:
    return (chunk + 1, 0) if file == CHUNKS_SIZE - 1 else (chunk, file + 1)


def _tasks_table(tasks: Sequence[str]):
    """meta/tasks.parquet as pandas writes ``DataFrame({"task_index": ...}, index=tasks)``
    (LeRobot reads it with pandas and looks tasks up in the index)."""
    import pyarrow as pa

    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()),
                      "__index_level_0__": pa.array(list(tasks), pa.string())})
    pandas_meta = {
        "index_columns": ["__index_level_0__"], "column_indexes": [],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
             "numpy_type": "int64", "metadata": None},
            {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode",
             "numpy_type": "object", "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.3",
    }
    return table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)})


def write_lerobot(path: str | os.PathLike, episodes: Iterable[Mapping[str, np.ndarray]],
                  fps: int, layout: Layout | None = None, task: str = "",
                  **writer_kwargs: Any) -> int:
    """Write ``episodes`` ({buffer key: [L, ...]} each) as a LeRobotDataset v3 directory at
    ``path``, built under a temporary name and moved into place when complete (an existing
    ``path`` is replaced). layout: see the module docstring (default: :func:`generic_layout`
    of the first episode). Returns the number of episodes; ValueError when there are none."""
    path = Path(path).expanduser()
    episodes = iter(episodes)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        writer = None
        for episode in episodes:
            if writer is None:
                arrays = {k: v for k, v in episode.items() if isinstance(v, np.ndarray)}
                writer = LeRobotWriter(tmp, layout or generic_layout(arrays), fps, task,
                                       **writer_kwargs)
            writer.add_episode(episode)
        if writer is None:
            raise ValueError(f"{path}: no episodes to write")
        return writer.close()


# ---------------------------------------------------------------------------- reader
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
            frames, current = _VideoFrames(file, fps), where
        start = round(row[f"videos/{name}/from_timestamp"] * fps)
        yield frames.take(start, row["length"])
    if frames is not None:
        frames.close()


class _VideoFrames:
    """Sequential reader of one mp4: ``take(start, n)`` returns frames with index start ..
    start + n - 1 (index = round(time * fps)); requests must not go backwards."""

    def __init__(self, path: Path, fps: int) -> None:
        import av

        self.path, self.fps = path, fps
        self.container = av.open(str(path))
        self.frames = self.container.decode(video=0)
        self.pending: tuple[int, np.ndarray] | None = None

    def _next(self) -> tuple[int, np.ndarray] | None:
        if self.pending is not None:
            item, self.pending = self.pending, None
            return item
        frame = next(self.frames, None)
        if frame is None:
            return None
        return round(float(frame.time) * self.fps), frame.to_ndarray(format="rgb24")

    def take(self, start: int, n: int) -> np.ndarray:
        out = []
        while len(out) < n:
            item = self._next()
            if item is None:
                raise ValueError(f"{self.path}: ends before frame {start + len(out)} "
                                 f"(episode needs frames {start}..{start + n - 1})")
            index, image = item
            if index < start:
                continue
            if index != start + len(out):
                raise ValueError(f"{self.path}: expected frame {start + len(out)}, found "
                                 f"{index} (missing or out-of-order frames)")
            out.append(image)
        return np.stack(out)

    def close(self) -> None:
        self.container.close()


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
