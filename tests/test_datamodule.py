"""Training windows and the DataModule over the real Meta-World collection."""

import json
import shutil

import numpy as np
import pytest
import torch

from hybrid.data.datamodule import HybridDataModule, split_episodes
from hybrid.data.lerobot_dataset import DatasetError
from hybrid.data.normalize import Normalizer
from hybrid.data.scene_frames import SCENE_BOUND, SceneFrames

H, K = 8, 5


def _datamodule(root, **overrides) -> HybridDataModule:
    """The module fixture's data module, set up for fitting, with `overrides`."""
    settings = dict(chunk_size=H, future_offset=K, image_size=32, batch_size=4, val_fraction=0.5)
    dm = HybridDataModule(str(root), **(settings | overrides))
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def datamodule(mt10_dataset):
    return _datamodule(mt10_dataset[0])


def test_split_is_by_episode_per_task_and_seeded():
    tasks = ["a"] * 4 + ["b"] * 3 + ["c"]
    train, val = split_episodes(tasks, 0.3, seed=1)
    assert sorted(train + val) == list(range(8)) and not set(train) & set(val)
    assert {tasks[i] for i in val} == {"a", "b"}, "c has one episode: it stays in train"
    assert split_episodes(tasks, 0.3, seed=1) == (train, val)
    assert split_episodes(tasks, 0.3, seed=2) != (train, val)


def test_window_contents(datamodule):
    windows = datamodule.train_set
    sample = windows[0]
    assert sample["images"].shape == (2, 3, 32, 32) and sample["images"].dtype == torch.float32
    assert 0.0 <= sample["images"].min() and sample["images"].max() <= 1.0
    assert sample["future_images"].shape == (2, 3, 32, 32)
    assert sample["state"].shape == (4,) and sample["actions"].shape == (H, 4)
    assert sample["scene"].shape == (9,) and sample["scene_mask"].tolist() == [1.0] * 9
    assert sample["embodiment"] == "sawyer" and sample["instruction"] and sample["subgoal"]
    # The last frame of an episode: one real action, the rest padding; the future is clamped.
    ep = windows.episodes[0]
    last = len(ep["state"]) - 1
    end = windows[windows.index.index((0, last))]
    assert end["action_mask"].tolist() == [True] + [False] * (H - 1)
    assert torch.all(end["actions"][1:] == 0)
    assert end["future_progress"] == pytest.approx(1.0) and end["progress"] == pytest.approx(1.0)
    t = 3
    mid = windows[windows.index.index((0, t))]
    assert mid["action_mask"].all()
    assert torch.equal(mid["future_images"], windows[windows.index.index((0, t + K))]["images"])
    assert torch.equal(mid["future_scene"], windows[windows.index.index((0, t + K))]["scene"])
    assert torch.equal(end["future_scene"], end["scene"]), "the future scene is clamped too"
    assert mid["future_progress"] > mid["progress"]
    np.testing.assert_allclose(mid["actions"].numpy(), ep["actions"][t : t + H])


def test_a_plan_lag_gives_the_action_expert_a_later_step_of_the_same_episode(
    datamodule, mt10_dataset
):
    """`plan_lag` m: the slow tiers' keys stay at the sample's frame t; the action expert's
    (`act_*`) are those of frame t + L, L drawn from 0..m and cut at the episode's end, as the
    slow-tier schedule reads a plan made up to m steps earlier. Validation stays fresh."""
    m = 3
    lagged = _datamodule(mt10_dataset[0], plan_lag=m)
    windows, fresh = lagged.train_set, datamodule.train_set
    assert windows.index == fresh.index
    torch.manual_seed(0)
    lags = []
    for i in range(0, len(windows), 7):
        sample, plain = windows[i], fresh[i]
        e, t = windows.index[i]
        lag = int(sample["lag"])
        at = fresh[fresh.index.index((e, t + lag))]
        for key in ("images", "future_images", "state", "actions", "progress", "subgoal"):
            assert key in sample and _same(sample[key], plain[key]), key
        for key in ("images", "state", "scene", "actions", "action_mask"):
            assert torch.equal(sample[f"act_{key}"], at[key]), key
        lags.append(lag)
    assert set(lags) == set(range(m + 1)), "every lag 0..m is drawn"
    last = windows.index.index((0, len(windows.episodes[0]["state"]) - 1))
    assert int(windows[last]["lag"]) == 0, "no step after the episode's last"
    assert "act_images" not in lagged.val_set[0]
    with pytest.raises(ValueError, match="plan_lag must be >= 0, got -1"):
        HybridDataModule(str(mt10_dataset[0]), plan_lag=-1)


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_normalisation_uses_dataset_stats(datamodule):
    states = np.concatenate(
        [ep["state"] for ep in datamodule.train_set.episodes + datamodule.val_set.episodes]
    )
    np.testing.assert_allclose(states.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(states.std(0), 1.0, atol=1e-3)
    scenes = np.concatenate([ep["scene"] for ep in datamodule.train_set.episodes])
    raw_scene = datamodule.dataset.episode(datamodule.train_set.episodes[0]["episode_index"])[
        "observation.environment_state"
    ]
    back = datamodule.normalizer.unnormalize(
        "observation.environment_state", scenes[: len(raw_scene)]
    )
    np.testing.assert_allclose(back, raw_scene, atol=1e-5)
    raw = datamodule.dataset.episode(0)["observation.state"]
    back = datamodule.normalizer.unnormalize(
        "observation.state", datamodule.normalizer.normalize("observation.state", raw)
    )
    np.testing.assert_allclose(back, raw, atol=1e-6)


def test_loaders_batch_with_worker_processes(mt10_dataset):
    dm = HybridDataModule(str(mt10_dataset[0]), image_size=32, batch_size=16, num_workers=2)
    dm.setup("fit")
    train_episodes = {ep["episode_index"] for ep in dm.train_set.episodes}
    val_episodes = {ep["episode_index"] for ep in dm.val_set.episodes}
    assert train_episodes and val_episodes and not train_episodes & val_episodes
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_set) // 16
    batch = batches[0]
    assert batch["images"].shape == (16, 2, 3, 32, 32) and batch["actions"].shape == (16, 16, 4)
    assert len(batch["subgoal"]) == 16 and isinstance(batch["subgoal"][0], str)
    seen = torch.cat([b["episode_index"] for b in batches]).unique().tolist()
    assert set(seen) <= train_episodes


def test_missing_camera_is_named(mt10_dataset):
    dm = HybridDataModule(str(mt10_dataset[0]), cameras=["observation.images.wrist"])
    with pytest.raises(DatasetError, match="observation.images.wrist"):
        dm.setup("fit")


def test_the_robot_spec_carries_action_limits(datamodule, mt10_dataset):
    """A simulated robot's limits are its own; a robot the project does not simulate gets the
    range its demonstrated actions span."""
    spec = datamodule.embodiment_spec()
    assert spec.name == "sawyer" and spec.action_low == [-1.0] * 4 and spec.action_high == [1.0] * 4
    other = HybridDataModule(str(mt10_dataset[0]), embodiment="arm", image_size=32)
    other.setup("fit")
    spec = other.embodiment_spec()
    episodes = range(other.dataset.num_episodes)
    actions = np.concatenate([other.dataset.episode(i)["action"] for i in episodes])
    assert spec.name == "arm"
    np.testing.assert_allclose(spec.action_low, actions.min(0), atol=1e-6)
    np.testing.assert_allclose(spec.action_high, actions.max(0), atol=1e-6)


def test_a_second_dataset_gives_every_training_batch_frames_for_the_scene_estimator(
    mt10_dataset, panda_dataset, tmp_path
):
    """`scene_root`: each training batch carries `scene_batch_size` frames of the scene data
    (default one per window), drawn at random, with their scenes normalised by the training
    data's statistics; validation reads the training data alone, and scene data of another
    robot is refused by name."""
    root = str(mt10_dataset[0])
    # the same frames under other statistics: the targets must follow the training data's
    scene_root = tmp_path / "scene"
    shutil.copytree(root, scene_root)
    stats = json.loads((scene_root / "meta" / "stats.json").read_text())
    key = "observation.environment_state"
    stats[key] = {k: (np.asarray(v) * 3 + 1).tolist() for k, v in stats[key].items()}
    (scene_root / "meta" / "stats.json").write_text(json.dumps(stats))
    dm = HybridDataModule(
        root, image_size=32, batch_size=16, val_fraction=0.5, scene_root=str(scene_root)
    )
    dm.setup("fit")
    episodes = range(dm.dataset.num_episodes)
    raw = np.concatenate([dm.dataset.episode(i)[key] for i in episodes])
    frames = {  # the training data's own frames, by episode, as its windows hold them
        ep["episode_index"]: ep["images"] for ep in dm.train_set.episodes + dm.val_set.episodes
    }
    pixels_by_frame = np.concatenate([frames[i] for i in episodes])
    assert len(dm.scene_frames) == len(raw) > len(dm.train_set), "every episode, not the split"
    batch = next(iter(dm.train_dataloader()))
    assert batch["scene_images"].shape == (16, 2, 3, 32, 32)
    targets = dm.normalizer.unnormalize(key, batch["scene_target"].numpy())
    for image, target in zip(batch["scene_images"], targets, strict=True):
        same = np.abs(raw - target).max(1) < 1e-4  # the frames of that scene
        assert same.any(), "a target is the scene of one of the scene data's frames"
        pixels = (image.permute(0, 2, 3, 1) * 255).round().byte().numpy()
        assert any(np.array_equal(pixels, pixels_by_frame[j]) for j in np.flatnonzero(same))
    assert len({tuple(t) for t in batch["scene_target"].tolist()}) > 8, "drawn at random"
    assert batch["scene_target_mask"].all(), "the training data's own scenes lie within bound"
    assert "scene_images" not in next(iter(dm.val_dataloader()))
    fewer = HybridDataModule(
        root,
        image_size=32,
        batch_size=16,
        val_fraction=0.5,
        scene_root=str(scene_root),
        scene_batch_size=6,
    )
    fewer.setup("fit")
    batch = next(iter(fewer.train_dataloader()))
    assert batch["state"].shape[0] == 16 and batch["scene_images"].shape == (6, 2, 3, 32, 32)
    assert batch["scene_target"].shape[0] == batch["scene_target_mask"].shape[0] == 6
    with pytest.raises(ValueError, match="data.scene_batch_size must be >= 1, got 0"):
        HybridDataModule(root, scene_root=str(scene_root), scene_batch_size=0)
    # measured by narrower statistics, targets beyond SCENE_BOUND deviations carry no weight
    narrow = {k: {s: np.asarray(v) for s, v in d.items()} for k, d in dm.dataset.stats.items()}
    narrow[key]["std"] = narrow[key]["std"] / 10
    normalizer = Normalizer(narrow, {key: "mean_std"})
    strict = SceneFrames(dm.dataset, dm.cameras, normalizer, 32, len(raw[0]))
    far = np.abs(normalizer.normalize(key, raw)) > SCENE_BOUND
    assert far.any() and not far.all()
    np.testing.assert_array_equal(strict.mask, ~far)
    other = HybridDataModule(root, image_size=32, scene_root=str(panda_dataset[0]))
    with pytest.raises(DatasetError, match="robot 'panda'.*'sawyer'"):
        other.setup("fit")
    with pytest.raises(DatasetError, match="data.scene_root .*missing.*not a directory"):
        HybridDataModule(root, scene_root=str(tmp_path / "missing"))
