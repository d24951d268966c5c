"""HybridPolicy on real Meta-World windows: knowledge insulation, mixed robots, save/load."""

import os
import stat

import numpy as np
import pytest
import torch

from hybrid.data.datamodule import HybridDataModule
from hybrid.embodiment import EmbodimentSpec
from hybrid.policy import HybridPolicy
from hybrid.sim.metaworld import EMBODIMENT

SMALL = dict(
    vlm=dict(text_hidden=64, text_layers=2, vision_hidden=32, vision_layers=1),
    world_model=dict(vae_channels=(16, 16, 32, 32), hidden=32, num_layers=1, value_hidden=32),
    action_expert=dict(hidden=32, num_layers=2, image_size=64, keypoints=4, scene_dim=12),
    fast=dict(vocab_size=128),
)
OTHER = EmbodimentSpec("arm2", state_dim=3, action_dim=2, action_low=[-1, -1], action_high=[1, 1])


@pytest.fixture(scope="module")
def setup(mt10_dataset):
    dm = HybridDataModule(str(mt10_dataset[0]), chunk_size=8, future_offset=8, batch_size=4)
    dm.setup("fit")
    torch.manual_seed(0)
    stats = dm.norm_stats()
    policy = HybridPolicy.create(
        dm.train_set.texts(),
        dm.train_set.action_chunks(),
        [EMBODIMENT, OTHER],
        {EMBODIMENT.name: stats, OTHER.name: stats},
        **SMALL,
    )
    batch = next(iter(dm.train_dataloader()))
    return policy, batch


def _mixed(batch):
    """Rows 2 and 3 become the 3-state / 2-action robot, padded with zeros as a mixed collate
    would pad them."""
    mixed = dict(batch)
    mixed["embodiment"] = ["sawyer", "sawyer", "arm2", "arm2"]
    mixed["state"], mixed["actions"] = batch["state"].clone(), batch["actions"].clone()
    mixed["state"][2:, 3:] = 0
    mixed["actions"][2:, :, 2:] = 0
    return mixed


def test_knowledge_insulation(setup):
    policy, batch = setup
    policy.train()
    losses = policy.losses(batch)
    assert set(losses) == {"lang", "fast", "world", "value", "vae", "action", "scene"}
    assert all(torch.isfinite(v) for v in losses.values())
    policy.zero_grad(set_to_none=True)
    (losses["action"] + losses["scene"]).backward(retain_graph=True)
    for name, p in policy.vlm.named_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, f"action loss reached vlm {name}"
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in policy.action_expert.parameters()
    )
    policy.zero_grad(set_to_none=True)
    for key in ("lang", "fast"):
        losses[key].backward(retain_graph=True)
        reached = [
            p for p in policy.vlm.parameters() if p.grad is not None and p.grad.abs().sum() > 0
        ]
        assert reached, f"{key} must train the VLM"
        policy.zero_grad(set_to_none=True)


def test_data_without_a_scene_trains_without_the_scene_loss(setup):
    """Older datasets record no `observation.environment_state`: their windows carry an empty
    scene and nothing learns it; a scene wider than the expert's head is refused by name."""
    policy, batch = setup
    empty = dict(batch, scene=batch["scene"][:, :0], scene_mask=batch["scene_mask"][:, :0])
    assert "scene" not in policy.losses(empty) and "action" in policy.losses(empty)
    wide = dict(batch, scene=torch.zeros(4, 13), scene_mask=torch.ones(4, 13))
    with pytest.raises(ValueError, match="13 dims.*scene head has 12.*scene_dim"):
        policy.losses(wide)


def test_vlm_losses_on_a_subset_of_rows_leave_the_lower_tiers_unchanged(setup):
    """With `vlm_rows`, the VLM's losses see only the first rows; every other row's features
    come from the pass without gradient, which must be the same features: the world model's and
    the action expert's losses do not move."""
    policy, batch = setup
    policy.eval()  # no dropout: both calls see the same networks
    results = {}
    for rows in (None, 2):
        torch.manual_seed(1)
        results[rows] = policy.losses(batch, language_dropout=0.5, vlm_rows=rows)
    for name in ("world", "value", "action"):
        torch.testing.assert_close(results[2][name], results[None][name])
    first = policy.vlm(
        batch["images"][:2], batch["instruction"][:2], batch["subgoal"][:2], fast_tokens=None
    )
    torch.testing.assert_close(results[2]["lang"], first.lang_loss)
    assert not torch.allclose(results[2]["lang"], results[None]["lang"])


def test_mixed_embodiments_in_one_batch(setup):
    policy, batch = setup
    mixed = _mixed(batch)
    losses = policy.losses(mixed)
    assert all(torch.isfinite(v) for v in losses.values())
    policy.eval()
    names = mixed["embodiment"]
    features, mask = policy.vlm.prefix_features(
        mixed["images"], mixed["instruction"], mixed["subgoal"]
    )
    cfg = policy.action_expert.config
    actions = policy.action_expert.sample(
        torch.nn.functional.pad(mixed["state"], (0, cfg.max_state_dim - 4)),
        policy.embodiment_ids(names),
        features,
        mask,
        mixed["images"],
        None,
        policy.dim_mask(names),
        steps=2,
    )
    assert actions.shape == (4, 8, 4)
    assert torch.all(actions[2:, :, 2:] == 0) and torch.all(actions[:2] != 0)
    with pytest.raises(ValueError, match=r"unknown embodiment\(s\) \['panda'\]; this policy knows"):
        policy.embodiment_ids(["sawyer", "panda"])


def test_save_load_identical_outputs(setup, tmp_path):
    policy, batch = setup
    policy.eval()
    policy.save_pretrained(tmp_path / "policy")
    policy.save_pretrained(tmp_path / "policy")  # overwriting is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"], "no temporary folders left"
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp_path / "policy", *(tmp_path / "policy").rglob("*")]:
        expected_mode = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected_mode, f"{path} is not as umask gives"
    loaded = HybridPolicy.from_pretrained(tmp_path / "policy").eval()
    assert loaded.embodiments == policy.embodiments and loaded.norm_stats == policy.norm_stats
    for key in policy.state_dict():
        assert torch.equal(policy.state_dict()[key], loaded.state_dict()[key]), key
    chunks = np.random.default_rng(0).normal(size=(3, 8, 4)).astype(np.float32)
    assert loaded.fast.encode(chunks) == policy.fast.encode(chunks)
    torch.manual_seed(7)
    expected = policy.losses(batch)
    torch.manual_seed(7)
    got = loaded.losses(batch)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    one = {k: v[:1] for k, v in batch.items()}
    assert loaded.vlm.propose_subgoal(
        one["images"], one["instruction"]
    ) == policy.vlm.propose_subgoal(one["images"], one["instruction"])


def test_missing_policy_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a policy directory"):
        HybridPolicy.from_pretrained(tmp_path)
