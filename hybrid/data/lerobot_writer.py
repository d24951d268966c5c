"""Writes episodes as a LeRobotDataset v3.0 directory.

    meta/info.json             schema, fps, path templates (written last: marks completeness)
    meta/stats.json            mean/std/min/max/count per feature (images: per channel, in [0, 1])
    meta/tasks.parquet         task text (index) -> task_index
    meta/episodes/chunk-000/file-000.parquet    one row per episode: length, tasks, file offsets
    data/chunk-XXX/file-XXX.parquet             one row per frame, many episodes per file
    videos/<key>/chunk-XXX/file-XXX.mp4         one stream per camera, many episodes per file

Every file is written under a temporary name and renamed into place, so an interrupted write never
leaves a truncated file behind; `meta/info.json` is removed first and written last.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hybrid.data.video import VideoWriter, video_info

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"


@dataclass
class EpisodeData:
    """One episode in memory. `frames` holds per-frame columns with a leading T axis: float or int
    arrays (T,) or (T, D), or strings (T,) of dtype object. `videos` maps a feature key such as
    `observation.images.corner` to (T, H, W, 3) uint8 frames."""

    task: str
    frames: dict[str, np.ndarray]
    videos: dict[str, np.ndarray]


def _replace(tmp: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)


def _temp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{path.suffix}")


def _feature(array: np.ndarray) -> dict:
    if array.dtype == object:
        return {"dtype": "string", "shape": [1], "names": None}
    shape = list(array.shape[1:]) or [1]
    return {"dtype": str(array.dtype), "shape": shape, "names": None}


class _RunningStats:
    """Mean/std/min/max over the leading axis, accumulated episode by episode (float64)."""

    def __init__(self):
        self.count, self.sum, self.sumsq, self.min, self.max = 0, 0.0, 0.0, None, None

    def add(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)
        self.count += x.shape[0]
        self.sum = self.sum + x.sum(0)
        self.sumsq = self.sumsq + (x * x).sum(0)
        self.min = x.min(0) if self.min is None else np.minimum(self.min, x.min(0))
        self.max = x.max(0) if self.max is None else np.maximum(self.max, x.max(0))

    def to_json(self) -> dict:
        mean = self.sum / self.count
        std = np.sqrt(np.maximum(self.sumsq / self.count - mean * mean, 0.0))
        return {
            "mean": np.atleast_1d(mean).tolist(),
            "std": np.atleast_1d(std).tolist(),
            "min": np.atleast_1d(self.min).tolist(),
            "max": np.atleast_1d(self.max).tolist(),
            "count": [self.count],
        }


class LeRobotWriter:
    """Streams episodes into a v3 dataset: `add_episode` for each, then `finish`.

    Data and video files roll over to the next file index once they pass the size limits, as
    LeRobot does; at most `CHUNKS_SIZE` files go in one chunk folder.
    """

    def __init__(
        self,
        root: Path,
        fps: int,
        robot_type: str,
        data_file_mb: int = 100,
        video_file_mb: int = 200,
    ):
        self.root, self.fps, self.robot_type = Path(root), fps, robot_type
        self.data_file_mb, self.video_file_mb = data_file_mb, video_file_mb
        (self.root / "meta" / "info.json").unlink(missing_ok=True)
        for stale in list(self.root.glob("*/**/.*.tmp.*")):  # left by an interrupted write
            stale.unlink()
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict] = []
        self.features: dict[str, dict] = {}
        self.stats: dict[str, _RunningStats] = {}
        self.total_frames = 0
        self._rows: list[pa.Table] = []  # the data file being filled
        self._rows_bytes = 0
        self._data_file = 0
        self._videos: dict[str, VideoWriter] = {}  # per key, the video file being filled
        self._video_paths: dict[str, Path] = {}  # where that file goes once complete
        self._video_file: dict[str, int] = {}

    def add_episode(self, episode: EpisodeData) -> None:
        length = len(next(iter(episode.frames.values())))
        for key, value in (*episode.frames.items(), *episode.videos.items()):
            if len(value) != length:
                raise ValueError(
                    f"episode column {key!r} has {len(value)} frames, expected {length}"
                )
        index = len(self.episodes)
        task_index = self.tasks.setdefault(episode.task, len(self.tasks))
        columns = dict(episode.frames)
        columns |= {
            "timestamp": np.arange(length, dtype=np.float32) / self.fps,
            "frame_index": np.arange(length, dtype=np.int64),
            "episode_index": np.full(length, index, dtype=np.int64),
            "index": np.arange(self.total_frames, self.total_frames + length, dtype=np.int64),
            "task_index": np.full(length, task_index, dtype=np.int64),
        }
        row = {
            "episode_index": index,
            "tasks": [episode.task],
            "length": length,
            "data/chunk_index": self._data_file // CHUNKS_SIZE,
            "data/file_index": self._data_file % CHUNKS_SIZE,
            "dataset_from_index": self.total_frames,
            "dataset_to_index": self.total_frames + length,
        }
        for key, array in columns.items():
            self.features.setdefault(key, _feature(array))
            if array.dtype != object:
                self.stats.setdefault(key, _RunningStats()).add(array.reshape(length, -1))
        for key, frames in episode.videos.items():
            row |= self._add_video(key, frames)
        table = pa.table({k: list(v) if v.ndim > 1 else v for k, v in columns.items()})
        self._rows.append(table)
        self._rows_bytes += table.nbytes
        self.episodes.append(row)
        self.total_frames += length
        if self._rows_bytes > self.data_file_mb * 2**20:
            self._flush_data()

    def _add_video(self, key: str, frames: np.ndarray) -> dict:
        if key not in self.features:
            self.features[key] = {
                "dtype": "video",
                "shape": list(frames.shape[1:]),
                "names": ["height", "width", "channels"],
            }
            self.stats[key] = _RunningStats()
            self._video_file[key] = 0
        # Per-channel statistics in [0, 1], over every 4th pixel of every frame.
        self.stats[key].add(frames[:, ::4, ::4].reshape(-1, 3) / 255.0)
        if key not in self._videos:
            file = self._video_file[key]
            path = self.root / VIDEO_PATH.format(
                video_key=key, chunk_index=file // CHUNKS_SIZE, file_index=file % CHUNKS_SIZE
            )
            self._videos[key] = VideoWriter(_temp(path), self.fps, *frames.shape[1:3])
            self._video_paths[key] = path
        writer = self._videos[key]
        start = writer.frames
        writer.write(frames)
        row = {
            f"videos/{key}/chunk_index": self._video_file[key] // CHUNKS_SIZE,
            f"videos/{key}/file_index": self._video_file[key] % CHUNKS_SIZE,
            f"videos/{key}/from_timestamp": start / self.fps,
            f"videos/{key}/to_timestamp": writer.frames / self.fps,
        }
        if writer.path.stat().st_size > self.video_file_mb * 2**20:
            self._close_video(key)
        return row

    def _flush_data(self) -> None:
        if not self._rows:
            return
        path = self.root / DATA_PATH.format(
            chunk_index=self._data_file // CHUNKS_SIZE, file_index=self._data_file % CHUNKS_SIZE
        )
        tmp = _temp(path)
        pq.write_table(pa.concat_tables(self._rows), tmp)
        _replace(tmp, path)
        self._rows, self._rows_bytes = [], 0
        self._data_file += 1

    def _close_video(self, key: str) -> None:
        writer = self._videos.pop(key)
        writer.close()
        self.features[key]["info"] = video_info(writer.path)
        _replace(writer.path, self._video_paths.pop(key))
        self._video_file[key] += 1

    def finish(
        self, names: dict[str, list[str]] | None = None, cameras: dict[str, dict] | None = None
    ) -> None:
        """Write the remaining files and the metadata; `names` labels vector features' dims,
        `cameras` adds to a video feature's `info` how its camera is placed."""
        import pandas as pd

        if not self.episodes:
            raise ValueError(f"no episodes to write to {self.root}")
        self._flush_data()
        for key in list(self._videos):
            self._close_video(key)
        for key, dims in (names or {}).items():
            self.features[key]["names"] = dims
        for key, placement in (cameras or {}).items():
            self.features[key].setdefault("info", {}).update(placement)

        def write_parquet(frame: pd.DataFrame, relative: str) -> None:
            path = self.root / relative
            tmp = _temp(path)
            frame.to_parquet(tmp)
            _replace(tmp, path)

        tasks = pd.DataFrame({"task_index": list(self.tasks.values())}, index=list(self.tasks))
        tasks.index.name = "task"
        write_parquet(tasks, "meta/tasks.parquet")
        episodes = pd.DataFrame(self.episodes)
        episodes["meta/episodes/chunk_index"] = 0
        episodes["meta/episodes/file_index"] = 0
        write_parquet(episodes, EPISODES_PATH.format(chunk_index=0, file_index=0))
        self._write_json("meta/stats.json", {k: s.to_json() for k, s in self.stats.items()})
        self._write_json("meta/info.json", self._info())

    def _info(self) -> dict:
        return {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": len(self.episodes),
            "total_frames": self.total_frames,
            "total_tasks": len(self.tasks),
            "chunks_size": CHUNKS_SIZE,
            "data_files_size_in_mb": self.data_file_mb,
            "video_files_size_in_mb": self.video_file_mb,
            "fps": self.fps,
            "splits": {"train": f"0:{len(self.episodes)}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self._video_file else None,
            "features": self.features,
        }

    def _write_json(self, relative: str, data: dict) -> None:
        path = self.root / relative
        tmp = _temp(path)
        tmp.write_text(json.dumps(data, indent=2))
        _replace(tmp, path)


def dataset_size_bytes(root: Path, exclude: str | None = None) -> int:
    """Bytes on disk under `root`, skipping the top-level folder named `exclude`."""
    root = Path(root)
    return sum(
        p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and (exclude is None or p.relative_to(root).parts[0] != exclude)
    )
