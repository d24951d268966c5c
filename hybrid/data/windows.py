"""Training windows: what every tier of the hierarchy learns from, cut from a LeRobot dataset.

A sample at frame t of an episode of length T:
    images          (N, 3, S, S) float32 in [0, 1]   the N cameras at t
    future_images   (N, 3, S, S) float32 in [0, 1]   the cameras at min(t + k, T - 1)
    state           (state_dim,) float32, normalised
    scene           (E,) float32, normalised: the dataset's `observation.environment_state`
                    (object and goal positions; a training target only, never a policy input),
                    E = 0 where the dataset has none; scene_mask (E,) float32 ones;
                    future_scene (E,) the same at min(t + k, T - 1)
    actions         (H, action_dim) float32, normalised; steps past the episode end are zeros
    action_mask     (H,) bool, False on those padded steps
    progress        () float32: task progress at t; future_progress the same at min(t + k, T - 1)
    instruction, subgoal, embodiment: str
    episode_index, frame_index, future_frame_index: int (the future's frame: min(t + k, T - 1))
With a `plan_lag` of m > 0, t is the frame the slow tiers plan from, and the action expert acts
a lag L later, drawn uniformly from 0..m by torch's generator (and cut at the episode's end),
as it does at run time when it reuses a plan for several chunks (the planner's `RefreshSchedule`
with `visual="subgoal"` and `features="subgoal"`). What it reads at t + L:
    act_images, act_state, act_scene, act_actions, act_action_mask   as the above, at t + L
    lag             () int64: L
Episodes are decoded once, when the windows are built, and kept as uint8 in memory.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange

from hybrid.data.lerobot_dataset import PROGRESS_KEY, SUBGOAL_KEY, LeRobotDataset
from hybrid.data.normalize import Normalizer

STATE_KEY = "observation.state"
ACTION_KEY = "action"
SCENE_KEY = "observation.environment_state"  # LeRobot's name for the environment's own state
# what the action expert reads of its own step, which `plan_lag` moves after the plan's (act_*)
ACTING_KEYS = ("images", "state", "actions", "action_mask", "scene")


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, size, size, 3) uint8, area-averaged."""
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    x = rearrange(torch.from_numpy(frames), "t h w c -> t c h w").float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    return rearrange(x.round().clamp(0, 255).byte(), "t c h w -> t h w c").numpy()


def episode_frames(
    dataset: LeRobotDataset, index: int, cameras: list[str], size: int
) -> np.ndarray:
    """Episode `index`'s frames from each of `cameras`, resized: (T, N, size, size, 3) uint8."""
    return np.stack([resize_frames(dataset.camera_frames(index, k), size) for k in cameras], axis=1)


class TrainingWindows(torch.utils.data.Dataset):
    """Every frame of the chosen episodes as one training sample (see the module docstring)."""

    def __init__(
        self,
        dataset: LeRobotDataset,
        episodes: list[int],
        cameras: list[str],
        normalizer: Normalizer,
        chunk_size: int,
        future_offset: int,
        image_size: int,
        embodiment: str,
        plan_lag: int = 0,
    ):
        if chunk_size < 1 or future_offset < 1:
            raise ValueError(
                f"chunk_size and future_offset must be >= 1, got {chunk_size} and {future_offset}"
            )
        if plan_lag < 0:
            raise ValueError(f"plan_lag must be >= 0, got {plan_lag}")
        dataset.require([STATE_KEY, ACTION_KEY, *cameras])
        self.chunk_size, self.future_offset, self.plan_lag = chunk_size, future_offset, plan_lag
        self.embodiment = embodiment
        self.episodes = []
        for index in episodes:
            columns = dataset.episode(index)
            length = len(columns[ACTION_KEY])
            scene = columns.get(SCENE_KEY)
            scene = (
                np.zeros((length, 0), np.float32)
                if scene is None
                else normalizer.normalize(SCENE_KEY, np.asarray(scene, np.float32))
            )
            progress = columns.get(PROGRESS_KEY)
            if progress is None:  # no annotation: time through the episode stands in
                progress = np.arange(length, dtype=np.float32) / max(length - 1, 1)
            self.episodes.append(
                {
                    "state": normalizer.normalize(STATE_KEY, columns[STATE_KEY]).astype(np.float32),
                    "actions": normalizer.normalize(ACTION_KEY, columns[ACTION_KEY]).astype(
                        np.float32
                    ),
                    "scene": scene.astype(np.float32),
                    "progress": np.asarray(progress, np.float32).reshape(length),
                    "subgoal": columns[SUBGOAL_KEY],
                    "instruction": columns["task"],
                    "images": episode_frames(dataset, index, cameras, image_size),
                    "episode_index": index,
                }
            )
        self.index = [(e, t) for e, ep in enumerate(self.episodes) for t in range(len(ep["state"]))]

    def __len__(self) -> int:
        return len(self.index)

    def texts(self) -> list[str]:
        """Every distinct instruction and subgoal, sorted (to train a tokenizer on)."""
        return sorted({t for ep in self.episodes for t in (ep["instruction"], *ep["subgoal"])})

    def action_chunks(self) -> np.ndarray:
        """Every sample's normalised action chunk, (len(self), H, action_dim), padded as in
        `__getitem__` (to fit the FAST tokenizer on)."""
        return np.stack([self._chunk(e, t)[0] for e, t in self.index])

    def _chunk(self, e: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Actions t .. t+H-1 of episode e, zero-padded past its end, and the (H,) mask of real
        steps."""
        actions = self.episodes[e]["actions"]
        chunk = np.zeros((self.chunk_size, actions.shape[1]), np.float32)
        real = actions[t : t + self.chunk_size]
        chunk[: len(real)] = real
        return chunk, np.arange(self.chunk_size) < len(real)

    def _step(self, e: int, t: int) -> dict[str, torch.Tensor]:
        """What the action expert reads at frame t of episode e (`ACTING_KEYS`)."""
        ep = self.episodes[e]
        actions, mask = self._chunk(e, t)
        return {
            "images": self._images(e, t),
            "state": torch.from_numpy(ep["state"][t]),
            "actions": torch.from_numpy(actions),
            "action_mask": torch.from_numpy(mask),
            "scene": torch.from_numpy(ep["scene"][t]),
        }

    def _images(self, e: int, t: int) -> torch.Tensor:
        frames = torch.from_numpy(self.episodes[e]["images"][t])
        return rearrange(frames, "n h w c -> n c h w").float() / 255.0

    def __getitem__(self, i: int) -> dict:
        e, t = self.index[i]
        ep = self.episodes[e]
        length = len(ep["state"])
        future = min(t + self.future_offset, length - 1)
        sample = self._step(e, t) | {
            "future_images": self._images(e, future),
            "future_scene": torch.from_numpy(ep["scene"][future]),
            "scene_mask": torch.ones(ep["scene"].shape[1]),
            "progress": torch.tensor(ep["progress"][t]),
            "future_progress": torch.tensor(ep["progress"][future]),
            "instruction": ep["instruction"],
            "subgoal": str(ep["subgoal"][t]),
            "embodiment": self.embodiment,
            "episode_index": ep["episode_index"],
            "frame_index": t,
            "future_frame_index": future,
        }
        if self.plan_lag:
            lag = min(int(torch.randint(self.plan_lag + 1, ())), length - 1 - t)
            acting = self._step(e, t + lag)
            sample |= {f"act_{k}": v for k, v in acting.items()} | {"lag": torch.tensor(lag)}
        return sample
