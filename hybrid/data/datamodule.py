"""The LightningDataModule over one LeRobot v3 dataset: a seeded train/val split by episode,
normalisation from `meta/stats.json`, and `TrainingWindows` batches (see `windows.py` for shapes);
optionally a second dataset's frames for the scene estimator alone (`scene_frames.py`).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from hybrid.data.lerobot_dataset import DatasetError, LeRobotDataset, require_directory
from hybrid.data.normalize import Mode, Normalizer
from hybrid.data.scene_frames import SceneFrames, WithSceneFrames
from hybrid.data.windows import ACTION_KEY, SCENE_KEY, STATE_KEY, TrainingWindows
from hybrid.embodiment import EmbodimentSpec
from hybrid.sim import SIMULATORS, simulator_for


def split_episodes(tasks: list[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split episode indices into (train, val), per task, so every task is in both when it has
    at least two episodes. `tasks[i]` is the task of episode i."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for task in dict.fromkeys(tasks):
        episodes = [i for i, t in enumerate(tasks) if t == task]
        rng.shuffle(episodes)
        n_val = round(len(episodes) * val_fraction)
        n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(episodes) - 1)
        val += episodes[:n_val]
        train += episodes[n_val:]
    return sorted(train), sorted(val)


class HybridDataModule(L.LightningDataModule):
    """Training windows from the LeRobot v3 dataset at `root`.

    Args:
        root: dataset directory.
        cameras: camera feature keys; default every camera the dataset has.
        chunk_size: H, actions per chunk.
        future_offset: k, steps ahead of the future frame the world model predicts.
        image_size: side the images are resized to.
        embodiment: robot name; default the dataset's `robot_type`.
        val_fraction: share of each task's episodes held out for validation.
        state_norm, action_norm: normalisation modes for state and actions.
        scene_root: a second dataset of the same robot and cameras whose every frame, with its
            scene, is one more example for the action expert's scene estimator and for nothing
            else: each training batch carries `scene_batch_size` of them, drawn at random
            (`scene_frames.py`). None: the estimator learns from the training data alone.
        scene_batch_size: frames of `scene_root` per training batch; None: `batch_size`.
        plan_lag: m > 0 trains the action expert on plans made up to m steps before the step
            it acts at (`windows.py`), as the planner's slow-tier schedule uses them: with
            `execute_steps` e and `max_chunks_per_subgoal` c, a plan is read up to (c - 1) * e
            steps after it was made (12 at the defaults). 0: every plan is fresh, as the
            per-chunk schedule has it. The validation windows always have it 0.
    """

    def __init__(
        self,
        root: str,
        cameras: list[str] | None = None,
        chunk_size: int = 16,
        future_offset: int = 16,
        image_size: int = 64,
        embodiment: str | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        state_norm: Mode = "mean_std",
        action_norm: Mode = "mean_std",
        scene_root: str | None = None,
        scene_batch_size: int | None = None,
        plan_lag: int = 0,
    ):
        super().__init__()
        # frames of scene_root per training batch, the default resolved once
        self.scene_batch_size = batch_size if scene_batch_size is None else scene_batch_size
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        for name, value, least in (
            ("batch_size", batch_size, 1),
            ("chunk_size", chunk_size, 1),
            ("future_offset", future_offset, 1),
            ("image_size", image_size, 16),
            ("num_workers", num_workers, 0),
            ("plan_lag", plan_lag, 0),
            ("scene_batch_size", self.scene_batch_size, 1),
        ):
            if value < least:
                raise ValueError(f"data.{name} must be >= {least}, got {value}")
        require_directory(root)
        if scene_root is not None and not Path(scene_root).is_dir():
            raise DatasetError(
                f"data.scene_root {scene_root} is not a directory: collect it (`hybrid collect "
                f"<robot> --tasks <the training tasks> --action-noise 0.5 --keep-failures --seed 1 "
                f"--max-steps 150 --out {scene_root}`, as `make quickstart` does), or pass "
                "--data.scene_root null"
            )
        self.save_hyperparameters()
        self.train_set: TrainingWindows | None = None
        self.val_set: TrainingWindows | None = None
        self.scene_frames: SceneFrames | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        dataset = LeRobotDataset(hp.root)
        cameras = hp.cameras or dataset.camera_keys
        if not cameras:
            raise DatasetError(f"{hp.root} has no camera (video or image) features")
        modes = {STATE_KEY: hp.state_norm, ACTION_KEY: hp.action_norm}
        if SCENE_KEY in dataset.stats:  # a training target (see windows.py); older data has none
            modes[SCENE_KEY] = "mean_std"
        self.normalizer = Normalizer(dataset.stats, modes)
        tasks = [e["tasks"][0] for e in dataset.episodes]
        train, val = split_episodes(tasks, hp.val_fraction, hp.seed)
        embodiment = hp.embodiment or dataset.robot_type or "robot"

        def windows(episodes: list[int], plan_lag: int = 0) -> TrainingWindows:
            return TrainingWindows(
                dataset,
                episodes,
                cameras,
                self.normalizer,
                hp.chunk_size,
                hp.future_offset,
                hp.image_size,
                embodiment,
                plan_lag,
            )

        self.dataset, self.cameras = dataset, cameras
        self.train_set, self.val_set = windows(train, hp.plan_lag), windows(val)
        if hp.scene_root is not None and stage in (None, "fit"):
            self.scene_frames = self._scene_frames()

    def _scene_frames(self) -> SceneFrames:
        hp, extra = self.hparams, LeRobotDataset(self.hparams.scene_root)
        if SCENE_KEY not in self.dataset.features:
            raise DatasetError(
                f"data.scene_root {hp.scene_root} trains the scene estimator, but the training "
                f"data {hp.root} records no scene ({SCENE_KEY}) to learn it from: collect both "
                "with `hybrid collect`"
            )
        if extra.robot_type != self.dataset.robot_type:
            raise DatasetError(
                f"data.scene_root {hp.scene_root} is of robot {extra.robot_type!r}, the training "
                f"data {hp.root} of {self.dataset.robot_type!r}: the scene estimator learns one "
                "robot's cameras and scene; collect it with the training data's simulator"
            )
        for key in self.cameras:  # the same view: a moved camera sees another picture
            ours, theirs = self.dataset.features[key], extra.features.get(key, {})
            view = {k: v for k, v in ours.get("info", {}).items() if k.startswith("camera.")}
            other = {k: theirs.get("info", {}).get(k) for k in view}
            if other != view or theirs.get("shape") != ours["shape"]:
                raise DatasetError(
                    f"data.scene_root {hp.scene_root}: camera {key} is {other} at "
                    f"{theirs.get('shape')}, in the training data {view} at {ours['shape']}: "
                    "collect the scene data with the same --camera and --image-size"
                )
        width = self.dataset.features[SCENE_KEY]["shape"][0]
        return SceneFrames(extra, self.cameras, self.normalizer, hp.image_size, width)

    def embodiment_spec(self) -> EmbodimentSpec:
        """The robot this data is of: its name, state and action dims, the cameras read, and its
        action limits: a simulated robot's own (`hybrid.sim`), otherwise the range the data's
        actions span. The planner clips every action to them."""
        episode = self.train_set.episodes[0]
        name, action_dim = self.train_set.embodiment, episode["actions"].shape[1]
        known = simulator_for(name).EMBODIMENT if name in SIMULATORS.values() else None
        if known is not None and known.action_dim == action_dim:
            low, high = known.action_low, known.action_high
        else:
            stats = self.dataset.stats[ACTION_KEY]
            low, high = np.asarray(stats["min"]).tolist(), np.asarray(stats["max"]).tolist()
        return EmbodimentSpec(
            name=name,
            state_dim=episode["state"].shape[1],
            action_dim=action_dim,
            action_low=low,
            action_high=high,
            cameras=self.cameras,
        )

    def norm_stats(self) -> dict[str, dict[str, list[float]]]:
        """The statistics of state and actions (and of the scene where the data records one),
        JSON-ready, as a policy stores them."""
        return {
            key: {stat: np.asarray(v).tolist() for stat, v in self.dataset.stats[key].items()}
            for key in (STATE_KEY, ACTION_KEY, SCENE_KEY)
            if key in self.dataset.stats
        }

    def _loader(
        self, windows: torch.utils.data.Dataset, shuffle: bool, collate_fn=None
    ) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            windows,
            batch_size=hp.batch_size,
            shuffle=shuffle,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            drop_last=shuffle and len(windows) > hp.batch_size,
            collate_fn=collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        if self.scene_frames is None:
            return self._loader(self.train_set, shuffle=True)
        collate = WithSceneFrames(self.scene_frames, self.scene_batch_size)
        return self._loader(self.train_set, shuffle=True, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
