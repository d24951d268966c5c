"""Reads any LeRobotDataset v3.0 directory on disk (ours or a user's), with no hub access.

`LeRobotDataset(root)` validates the layout and loads the metadata and the per-frame table.
`episode(i)` gives an episode's per-frame columns as numpy arrays (T, ...) and its task text;
`camera_frames(i, key)` gives its frames (T, H, W, 3) uint8, decoded from MP4 (dtype "video") or
from images stored in the parquet files (dtype "image"). Every problem with the files on disk is a
`DatasetError` naming the path and what is wrong with it.
"""

from __future__ import annotations

import io
import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hybrid.data.video import decode_video

SUBGOAL_KEY = "subgoal"
PROGRESS_KEY = "progress"


class DatasetError(ValueError):
    """A dataset on disk is missing, malformed, or lacks what was asked of it."""


def _read_parquet(path: Path) -> pa.Table:
    if not path.is_file():
        raise DatasetError(f"missing file {path}")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DatasetError(
            f"cannot read {path}: corrupt or not a parquet file ({error})"
        ) from error


def require_directory(root: str | Path) -> Path:
    """`root` as a Path, or a DatasetError saying how to collect a dataset there."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"dataset directory {root} does not exist (collect one: `hybrid collect metaworld "
            f"--tasks ... --out {root}`)"
        )
    return root


class LeRobotDataset:
    """A LeRobot v3.0 dataset on disk; see the module docstring."""

    def __init__(self, root: str | Path):
        self.root = require_directory(root)
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise DatasetError(
                f"{self.root} is not a LeRobot v3 dataset: {info_path} is missing "
                "(an interrupted collection leaves no info.json; rerun it to finish)"
            )
        try:
            self.info = json.loads(info_path.read_text())
        except json.JSONDecodeError as error:
            raise DatasetError(f"cannot parse {info_path}: {error}") from error
        version = self.info.get("codebase_version")
        if version != "v3.0":
            raise DatasetError(
                f"{self.root} is a LeRobot {version} dataset; this reader needs v3.0 "
                "(LeRobot's converter `convert_dataset_v21_to_v30` upgrades v2.1 datasets)"
            )
        self.fps: float = self.info["fps"]
        self.features: dict[str, dict] = self.info["features"]
        self.robot_type: str | None = self.info.get("robot_type")
        self.episodes = self._read_episodes()
        self.tasks = self._read_tasks()

    def _read_episodes(self) -> list[dict]:
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise DatasetError(f"{self.root / 'meta' / 'episodes'} holds no episode parquet files")
        rows = [row for f in files for row in _read_parquet(f).to_pylist()]
        rows.sort(key=lambda r: r["episode_index"])
        if len(rows) != self.info["total_episodes"]:
            raise DatasetError(
                f"{self.root}: meta/episodes lists {len(rows)} episodes but info.json says "
                f"{self.info['total_episodes']}"
            )
        return rows

    def _read_tasks(self) -> dict[int, str]:
        table = _read_parquet(self.root / "meta" / "tasks.parquet")
        text = [name for name in table.column_names if name != "task_index"]
        if "task_index" not in table.column_names or not text:
            raise DatasetError(f"{self.root / 'meta' / 'tasks.parquet'} lacks task / task_index")
        tasks = table.column(text[0]).to_pylist()
        return dict(zip(table.column("task_index").to_pylist(), tasks, strict=True))

    @property
    def camera_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f["dtype"] in ("video", "image")]

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @cached_property
    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        path = self.root / "meta" / "stats.json"
        if not path.is_file():
            raise DatasetError(f"missing {path}: normalisation statistics are needed for training")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DatasetError(f"cannot parse {path}: {error}") from error
        return {k: {s: np.asarray(v, np.float32) for s, v in d.items()} for k, d in raw.items()}

    @cached_property
    def _frames(self) -> pa.Table:
        """All per-frame rows of the dataset, ordered by the global `index` column."""
        paths = sorted(
            {
                self.root
                / self.info["data_path"].format(
                    chunk_index=e["data/chunk_index"], file_index=e["data/file_index"]
                )
                for e in self.episodes
            }
        )
        table = pa.concat_tables([_read_parquet(p) for p in paths], promote_options="default")
        table = table.sort_by("index")
        if table.num_rows != self.info["total_frames"]:
            raise DatasetError(
                f"{self.root}/data holds {table.num_rows} frames but info.json says "
                f"{self.info['total_frames']}"
            )
        return table

    def require(self, keys: list[str]) -> None:
        """Raise naming every key in `keys` that the dataset does not have."""
        missing = [k for k in keys if k not in self.features]
        if missing:
            raise DatasetError(
                f"{self.root} lacks the feature(s) {missing}; it has {sorted(self.features)}"
            )

    def episode(self, index: int) -> dict:
        """Per-frame columns of episode `index` as numpy arrays with a leading T axis, plus
        `task` (str) and `subgoal` (T,) strings: the annotated subgoals, or the task text where
        the dataset has none."""
        meta = self.episodes[index]
        start, stop = meta["dataset_from_index"], meta["dataset_to_index"]
        rows = self._frames.slice(start, stop - start)
        columns = {}
        for key in rows.column_names:
            feature = self.features.get(key, {})
            if feature.get("dtype") in ("video", "image"):
                continue
            column = rows.column(key)
            if feature.get("dtype") == "string" or pa.types.is_string(column.type):
                columns[key] = np.asarray(column.to_pylist(), dtype=object)
            elif pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
                columns[key] = np.asarray(column.to_pylist(), dtype=np.float32)
            else:
                columns[key] = column.to_numpy()
        task = self.tasks[int(columns["task_index"][0])] if "task_index" in columns else ""
        columns["task"] = task
        if SUBGOAL_KEY not in columns:
            columns[SUBGOAL_KEY] = np.full(stop - start, task, dtype=object)
        return columns

    def camera_frames(self, index: int, key: str) -> np.ndarray:
        """Frames of camera `key` in episode `index`: (T, H, W, 3) uint8."""
        self.require([key])
        meta = self.episodes[index]
        if self.features[key]["dtype"] == "image":
            return self._parquet_images(index, key)
        path = self.root / self.info["video_path"].format(
            video_key=key,
            chunk_index=meta[f"videos/{key}/chunk_index"],
            file_index=meta[f"videos/{key}/file_index"],
        )
        if not path.is_file():
            raise DatasetError(f"missing video file {path} (episode {index}, camera {key})")
        try:
            frames = decode_video(
                path,
                meta[f"videos/{key}/from_timestamp"],
                meta[f"videos/{key}/to_timestamp"],
                self.fps,
            )
        except ValueError as error:
            raise DatasetError(
                f"episode {index}, camera {key}: {error}; recollect the dataset (`hybrid collect` "
                "into a new directory)"
            ) from error
        if len(frames) != meta["length"]:
            raise DatasetError(
                f"video {path} gives {len(frames)} frames for episode {index}, which has "
                f"{meta['length']}"
            )
        return frames

    def _parquet_images(self, index: int, key: str) -> np.ndarray:
        from PIL import Image

        meta = self.episodes[index]
        start, stop = meta["dataset_from_index"], meta["dataset_to_index"]
        cells = self._frames.column(key).slice(start, stop - start).to_pylist()
        images = []
        for cell in cells:
            if cell.get("bytes"):
                source = io.BytesIO(cell["bytes"])
            else:
                source = self.root / cell["path"]
            images.append(np.asarray(Image.open(source).convert("RGB")))
        return np.stack(images)
