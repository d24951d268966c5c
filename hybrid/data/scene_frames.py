"""Frames labelled with the scene alone, more examples for the action expert's scene estimator.

The estimator learns where the objects and the goal are from the frames of the demonstrations,
which go straight for the object: in closed loop the arm is elsewhere (the policy's own errors),
and there the estimate drifts (`benchmarks/perception.py`). Any second dataset of the same robot
and cameras that records the scene teaches it those views, e.g. one collected with large action
noise and failed episodes kept (`hybrid collect ... --action-noise 0.5 --keep-failures`). Its
frames train the scene loss only; the actions, the language and the world model learn from the
training data alone.

`SceneFrames` holds every frame of such a dataset; `WithSceneFrames`, a DataLoader's collate
function, adds `count` of them, drawn at random, to every training batch of windows:
    scene_images    (count, N, 3, S, S) float32 in [0, 1]   the N cameras at those frames
    scene_target    (count, E) float32, normalised with the training data's statistics
    scene_target_mask (count, E) float32: 1, or 0 where the target lies more than SCENE_BOUND of the
                    training data's standard deviations from its mean
The bound drops what the policy never has to know: with large action noise the arm knocks the
object off the table (in `hybrid collect ... --action-noise 0.5 --keep-failures`, one frame in
ten lies beyond 4 deviations, some beyond 11), and such a frame, squared, would outweigh the
rest of the batch.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import default_collate

from hybrid.data.lerobot_dataset import DatasetError, LeRobotDataset
from hybrid.data.normalize import Normalizer
from hybrid.data.windows import SCENE_KEY, episode_frames

SCENE_BOUND = 4.0  # standard deviations of the training data; its own frames lie within 2.1


class SceneFrames(torch.utils.data.Dataset):
    """Every frame of `dataset` as (images, scene), its cameras `cameras` resized to
    `image_size`, its scene normalised by `normalizer` (the training data's)."""

    def __init__(
        self,
        dataset: LeRobotDataset,
        cameras: list[str],
        normalizer: Normalizer,
        image_size: int,
        scene_width: int,
    ):
        missing = [key for key in (*cameras, SCENE_KEY) if key not in dataset.features]
        if missing:
            raise DatasetError(
                f"data.scene_root {dataset.root} lacks {missing}: it must record the training "
                f"data's cameras {cameras} and its scene ({SCENE_KEY}); collect it with `hybrid "
                "collect` and the same --camera"
            )
        width = dataset.features[SCENE_KEY]["shape"][0]
        if width != scene_width:
            raise DatasetError(
                f"data.scene_root {dataset.root} records a scene of {width} dims, the training "
                f"data {scene_width}: collect both of the same simulator"
            )
        images, scenes = [], []
        for index in range(dataset.num_episodes):
            columns = dataset.episode(index)
            scenes.append(normalizer.normalize(SCENE_KEY, np.asarray(columns[SCENE_KEY])))
            images.append(episode_frames(dataset, index, cameras, image_size))
        if not images:
            raise DatasetError(f"scene data {dataset.root} holds no episode")
        self.images = np.concatenate(images)
        self.scene = np.concatenate(scenes).astype(np.float32)
        self.mask = (np.abs(self.scene) <= SCENE_BOUND).astype(np.float32)

    def __len__(self) -> int:
        return len(self.scene)

    def __getitem__(self, i: int) -> dict:
        frames = torch.from_numpy(self.images[i])
        return {
            "scene_images": rearrange(frames, "n h w c -> n c h w").float() / 255.0,
            "scene_target": torch.from_numpy(self.scene[i]),
            "scene_target_mask": torch.from_numpy(self.mask[i]),
        }


class WithSceneFrames:
    """A DataLoader's collate function: the batch of windows, and `count` frames of `frames`
    drawn at random by torch's generator (seeded by `seed_everything`, and per worker by the
    DataLoader). The estimator's stem passes each frame, so `count` is a step's cost."""

    def __init__(self, frames: SceneFrames, count: int):
        self.frames, self.count = frames, count

    def __call__(self, windows: list[dict]) -> dict:
        drawn = torch.randint(len(self.frames), (self.count,)).tolist()
        return default_collate(windows) | default_collate([self.frames[j] for j in drawn])
