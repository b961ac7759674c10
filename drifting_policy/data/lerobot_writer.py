"""Writing a LeRobotDataset v3.0 directory (layout: :mod:`drifting_policy.data.lerobot_format`):
:class:`LeRobotWriter` streams episodes into parquet data files and mp4 videos, starting a new
file past LeRobot's size limits, and writes meta/ (episodes, tasks, stats, info) at the end;
:func:`write_lerobot` builds a directory atomically. Features this project writes are recorded in
info.json's ``drifting_policy`` entry (source key, per-step shape, dtype) so they can be read back
under their own keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from drifting_policy.data.frames import as_uint8
from drifting_policy.data.lerobot_format import (
    CHUNKS_SIZE,
    CODEBASE_VERSION,
    DATA_FILE_MB,
    DATA_PATH,
    EPISODES_PATH,
    INDEX_FEATURES,
    INFO,
    VIDEO_FILE_MB,
    VIDEO_PATH,
    Layout,
    StatsAccumulator,
    feature_stats,
    generic_layout,
    is_image,
    json_stats,
    next_file,
    tasks_table,
)
from drifting_policy.data.lerobot_video import VideoFile
from drifting_policy.persist import atomic_path


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
        self.stats = StatsAccumulator()
        self.n_frames = 0
        self._data_writer = None
        self._data_file = (0, 0)
        self._data_bytes = 0
        self._videos: dict[str, VideoFile] = {}
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
            if is_image(value) and cols is None:
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
                value = as_uint8(value)
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
            self._data_file = next_file(*self._data_file)
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
            self._video_index[name] = next_file(*self._video_index[name])
        if video is None:
            chunk, file = self._video_index.setdefault(name, (0, 0))
            path = self.root / VIDEO_PATH.format(video_key=name, chunk_index=chunk,
                                                 file_index=file)
            h, w = frames.shape[1:3]
            video = self._videos[name] = VideoFile(path, self.fps, h, w, self.codec,
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
        pq.write_table(tasks_table([self.task]), str(self.root / "meta/tasks.parquet"))
        stats = json_stats(self.stats.result())
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


def write_lerobot(path: str | os.PathLike, episodes: Iterable[Mapping[str, np.ndarray]],
                  fps: int, layout: Layout | None = None, task: str = "",
                  **writer_kwargs: Any) -> int:
    """Write ``episodes`` ({buffer key: [L, ...]} each) as a LeRobotDataset v3 directory at
    ``path``, built under a temporary name and moved into place when complete (an existing
    ``path`` is replaced). layout: see :mod:`drifting_policy.data.lerobot_format` (default:
    :func:`generic_layout` of the first episode). Returns the number of episodes; ValueError
    when there are none."""
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
