"""LeRobotDataset v3.0 on disk (LeRobot 0.4.x, codebase_version "v3.0"): the layout that
:mod:`drifting_policy.data.lerobot_writer` writes and :mod:`drifting_policy.data.lerobot_reader`
reads (paths, constants, how our arrays become features, LeRobot's statistics).

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

Both sides use pyarrow + PyAV rather than LeRobot's own library: ``lerobot`` /
``lerobot-dataset`` 0.4.4 pin ``huggingface-hub<0.36`` (and lerobot ``torch<2.11``), which cannot
be installed next to this project's diffusers (it needs huggingface-hub >= 1) and torch 2.14.
Videos: :mod:`drifting_policy.data.lerobot_video`.

How our arrays become LeRobot features is a *layout*: ``{feature name: (buffer key, cols)}``
(cols ``(start, stop)`` after flattening, or None). Low-dim features are stored flattened
([L, D] float32); a [L, H, W, 3] uint8 source becomes a video. Buffer keys that no feature
uses whole are stored too, under their own name ("extras": LeRobot's policies only read
``observation.*`` and ``action``), so nothing is lost; ``info.json``'s ``drifting_policy`` entry
records each feature's source key and per-step shape, so
:func:`drifting_policy.data.lerobot_reader.read_episodes` can invert it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow

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


def is_image(array: np.ndarray) -> bool:
    """[L, H, W, 3]: RGB frames, uint8 or (Diffusion Policy's PushT zarr) float in 0..255."""
    return array.ndim == 4 and array.shape[-1] == 3


def generic_layout(sample: Mapping[str, np.ndarray]) -> dict[str, tuple[str, None]]:
    """Every key whole: ``action`` -> action, [L, H, W, 3] images ->
    ``observation.images.<key>``, anything else -> ``observation.<key>``."""
    layout = {}
    for key, value in sample.items():
        if key == "action":
            layout["action"] = ("action", None)
        elif is_image(np.asarray(value)):
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


class StatsAccumulator:
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
        """:func:`feature_stats` of every feature over all episodes added."""
        return {name: feature_stats(np.concatenate(parts), name in self.images)
                for name, parts in self.parts.items()}


def json_stats(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """``{feature: {stat: array}}`` as nested lists (meta/stats.json)."""
    return {name: {k: np.asarray(v).tolist() for k, v in s.items()} for name, s in stats.items()}


def next_file(chunk: int, file: int) -> tuple[int, int]:
    """(chunk, file) index of the file after ``file`` (CHUNKS_SIZE files per chunk folder)."""
    return (chunk + 1, 0) if file == CHUNKS_SIZE - 1 else (chunk, file + 1)


def tasks_table(tasks: Sequence[str]) -> pyarrow.Table:
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
