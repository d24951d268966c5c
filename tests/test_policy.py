"""HybridPolicy on real Meta-World windows: knowledge insulation, mixed robots, save/load."""

import inspect
import json
import os
import stat

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybrid.data.datamodule import HybridDataModule
from hybrid.embodiment import EmbodimentSpec
from hybrid.policy import HybridPolicy
from hybrid.sim.metaworld import EMBODIMENT
from hybrid.types import Observation
from planners.hierarchical import HybridPlanner

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
    dims = {"observation.state": OTHER.state_dim, "action": OTHER.action_dim}
    other = {
        key: {s: v[: dims[key]] for s, v in d.items()} for key, d in stats.items() if key in dims
    }
    policy = HybridPolicy.create(
        dm.train_set.texts(),
        dm.train_set.action_chunks(),
        [EMBODIMENT, OTHER],
        {EMBODIMENT.name: stats, OTHER.name: other},
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


def test_a_privileged_scene_is_normalised_as_in_training_and_refused_where_none_is_read(
    setup, mt10_dataset, tmp_path
):
    """`sample_actions(scene=...)` takes the simulator's scene in its own units, normalises it
    with the statistics the policy saved from its data, and hands it to the scene token, as the
    training windows do; a policy whose expert reads no scene, or a scene of the wrong width,
    is refused by name."""
    from hybrid.data.windows import SCENE_KEY

    dm = HybridDataModule(str(mt10_dataset[0]), chunk_size=8, future_offset=8, batch_size=4)
    dm.setup("fit")
    torch.manual_seed(0)
    reads = dict(SMALL, action_expert=dict(SMALL["action_expert"], scene_input=True))
    policy = HybridPolicy.create(
        dm.train_set.texts(),
        dm.train_set.action_chunks(),
        [EMBODIMENT],
        {EMBODIMENT.name: dm.norm_stats()},
        **reads,
    )
    with torch.no_grad():  # adaLN-zero starts every block as the identity: wake them up
        policy.action_expert.modulation[1].weight.normal_(std=0.1)
    policy.save_pretrained(tmp_path / "policy")
    policy = HybridPolicy.from_pretrained(tmp_path / "policy").eval()
    batch = next(iter(dm.train_dataloader()))
    features, mask = policy.prefix_features(
        batch["images"], list(batch["instruction"]), list(batch["subgoal"])
    )
    state = batch["state"]  # normalised; the expert takes as many dims as the robot has
    normalizer = policy.normalizers[EMBODIMENT.name]
    raw = normalizer.unnormalize(SCENE_KEY, batch["scene"].numpy())

    def sample(scene):
        return policy.sample_actions(
            state,
            "sawyer",
            features,
            mask,
            batch["images"],
            None,
            steps=2,
            generator=torch.Generator().manual_seed(0),
            scene=scene,
        )

    expected = policy.action_expert.sample(
        state,
        policy.embodiment_ids(["sawyer"] * 4),
        features,
        mask,
        batch["images"],
        None,
        policy.dim_mask(["sawyer"] * 4),
        steps=2,
        generator=torch.Generator().manual_seed(0),
        scene=F.pad(batch["scene"], (0, 12 - batch["scene"].shape[1])),
    )[..., :4]
    expected = np.clip(normalizer.unnormalize("action", expected.numpy()), -1, 1)
    np.testing.assert_allclose(sample(raw), expected, atol=1e-5)
    assert not np.allclose(sample(raw), sample(raw + 0.2)), "the scene given is read"
    # the planner hands an observation's scene on (`hybrid eval --privileged-scene`)
    planner = HybridPlanner.from_pretrained(tmp_path / "policy", num_candidates=2)
    frames = (batch["images"][0] * 255).round().byte().permute(0, 2, 3, 1).numpy()
    images = dict(zip(dm.cameras, frames, strict=True))
    robot_state = normalizer.unnormalize("observation.state", batch["state"][0].numpy())
    plans = []
    for scene in (raw[0], raw[0] + 0.2, raw[0]):
        planner.reset()
        obs = Observation(images, robot_state, scene)
        plans.append(planner.plan(obs, batch["instruction"][0]).actions)
    np.testing.assert_allclose(plans[0], plans[2])
    assert not np.allclose(plans[0], plans[1]), "the planner passes the observation's scene"
    with pytest.raises(ValueError, match=r"scene: expected finite values of shape \(B, <= 12\)"):
        sample(np.zeros((4, 13), np.float32))
    with pytest.raises(ValueError, match="reads no scene.*scene_input: true"):
        setup[0].sample_actions(
            state, "sawyer", features, mask, batch["images"], None, steps=1, scene=raw
        )


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


def test_a_lagged_plan_reaches_the_action_expert_alone(setup):
    """With `plan_lag` the data gives the action expert a later step (`act_*`): those keys feed
    its loss and nothing else, and keys equal to the plan's own step change nothing."""
    policy, batch = setup
    policy.eval()
    keys = ("images", "state", "scene", "actions", "action_mask")
    later = {k: batch[k].roll(1, 0) for k in keys}  # another step's inputs, row by row
    results = {}
    for name, extra in (("fresh", {}), ("same", {k: batch[k] for k in keys}), ("later", later)):
        torch.manual_seed(1)
        results[name] = policy.losses(batch | {f"act_{k}": v for k, v in extra.items()})
    for name, value in results["fresh"].items():
        torch.testing.assert_close(results["same"][name], value)
    for name in ("lang", "fast", "world", "value"):
        torch.testing.assert_close(results["later"][name], results["fresh"][name])
    assert not torch.allclose(results["later"]["action"], results["fresh"]["action"])
    loss, seen = policy.action_expert.loss, []
    policy.action_expert.loss = lambda *a, lag, **k: seen.append(lag) or loss(*a, lag=lag, **k)
    try:
        policy.losses(batch | {"lag": torch.arange(len(batch["state"]))})
    finally:
        del policy.action_expert.loss
    assert seen[0].tolist() == list(range(len(batch["state"]))), "each row's lag reaches it"


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
    for name in ("vlm", "world_model", "action_expert", "fast"):  # one config convention
        expert = getattr(policy, name)
        signature = set(inspect.signature(type(expert).__init__).parameters)
        config, again = (
            {k: v for k, v in e.config.items() if not k.startswith("_")}
            for e in (expert, getattr(loaded, name))
        )
        assert set(config) == signature - {"self", *expert.ignore_for_config}, name
        assert json.loads(json.dumps(config)) == again, name  # JSON: tuples come back as lists
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
    a, features_a, _ = loaded.propose_subgoals(one["images"], one["instruction"])
    b, features_b, _ = policy.propose_subgoals(one["images"], one["instruction"])
    assert a == b
    torch.testing.assert_close(features_a, features_b, rtol=0, atol=0)


@pytest.mark.parametrize("robot", ["sawyer", "arm2"])
def test_inference_api_reads_what_losses_read(setup, robot):
    """State in the robot's units -> `normalize_state` is the batch's normalised state, padded as
    `losses` pads it; `sample_actions` is the expert's normalised chunk, cut to the robot's dims,
    unnormalised and clipped; committed actions come back unchanged and fix the chunk's start."""
    policy, batch = setup
    policy.eval()
    batch = _mixed(batch) if robot == "arm2" else batch
    rows = [i for i, name in enumerate(batch["embodiment"]) if name == robot]
    spec, normalizer = policy.embodiments[robot], policy.normalizers[robot]
    cfg = policy.action_expert.config
    normalised = batch["state"][rows, : spec.state_dim]
    raw = normalizer.unnormalize("observation.state", normalised.numpy())
    state = policy.normalize_state(raw, robot)
    torch.testing.assert_close(state, policy._pad(batch["state"][rows], cfg.max_state_dim))
    images = batch["images"][rows]
    instructions, subgoals = list(batch["instruction"]), list(batch["subgoal"])
    features, mask = policy.prefix_features(
        images, [instructions[i] for i in rows], [subgoals[i] for i in rows]
    )
    visual = policy.encode_frames(batch["future_images"][rows])
    actions = policy.sample_actions(
        state, robot, features, mask, images, visual, 3, torch.Generator().manual_seed(1)
    )
    expected = policy.action_expert.sample(
        state,
        policy.embodiment_ids([robot] * len(rows)),
        features,
        mask,
        images,
        visual,
        policy.dim_mask([robot] * len(rows)),
        steps=3,
        generator=torch.Generator().manual_seed(1),
    )
    assert (expected[..., spec.action_dim :] == 0).all(), "padded dims stay zero"
    expected = normalizer.unnormalize("action", expected[..., : spec.action_dim].numpy())
    expected = np.clip(expected, spec.action_low, spec.action_high)
    np.testing.assert_allclose(actions, expected, rtol=1e-6, atol=1e-6)
    assert actions.shape == (len(rows), cfg.chunk_size, spec.action_dim)


def test_committed_actions_come_back_unchanged_and_steer_the_rest(setup, tiny_policy_dir):
    """A trained expert (its blocks are the identity when fresh, so nothing mixes across tokens):
    the chunk's first d actions are the committed ones exactly, and the rest changes with them."""
    _, batch = setup
    policy = HybridPolicy.from_pretrained(tiny_policy_dir).eval()
    images, state = batch["images"][:2], policy._pad(batch["state"][:2], 8)
    features, mask = policy.prefix_features(
        images, list(batch["instruction"][:2]), list(batch["subgoal"][:2])
    )

    def chunk(committed=None):
        generator = torch.Generator().manual_seed(1)
        return policy.sample_actions(
            state, "sawyer", features, mask, images, None, 4, generator, committed
        )

    free = chunk()
    committed = np.clip(-free[:, :3], -1, 1)
    steered = chunk(committed)
    np.testing.assert_array_equal(steered[:, :3], committed)
    # same noise, same inputs otherwise: any difference in the rest is the committed start's doing
    assert not np.array_equal(steered[:, 3:], free[:, 3:]), "the rest continues the new start"


def test_missing_policy_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a policy directory"):
        HybridPolicy.from_pretrained(tmp_path)


def _first_observation(policy: HybridPolicy, dm: HybridDataModule, batch: dict) -> Observation:
    """The batch's first sample as the planner receives it: uint8 frames per camera, the state in
    the robot's units."""
    frames = (batch["images"][0] * 255).round().byte().permute(0, 2, 3, 1).numpy()
    state = policy.normalizers["sawyer"].unnormalize("observation.state", batch["state"][0].numpy())
    return Observation(dict(zip(dm.cameras, frames, strict=True)), state)


def test_flat_vla_has_no_world_model_and_trains_saves_loads_and_plans(mt10_dataset, tmp_path):
    """`world_model=False` (configs/formulation/flat_vla.yaml): no world model is built, no
    world loss computed or visual subgoal read; the policy saves without a world_model folder,
    loads equal, and plans flat by default, while asking it to imagine is refused by name."""
    dm = HybridDataModule(str(mt10_dataset[0]), chunk_size=8, future_offset=8, batch_size=4)
    dm.setup("fit")
    torch.manual_seed(0)
    flat = dict(SMALL, world_model=False)
    policy = HybridPolicy.create(
        dm.train_set.texts(),
        dm.train_set.action_chunks(),
        [EMBODIMENT],
        {EMBODIMENT.name: dm.norm_stats()},
        **flat,
    )
    assert policy.world_model is None and policy.action_expert.visual_in is None
    assert set(policy.parameter_counts()) == {"vlm", "action_expert"}
    batch = next(iter(dm.train_dataloader()))
    losses = policy.train().losses(batch, visual_dropout=0.5, imagined_share=0.5)
    assert set(losses) == {"lang", "fast", "action", "scene"}
    policy.eval().save_pretrained(tmp_path / "flat")
    saved = json.loads((tmp_path / "flat" / "policy_config.json").read_text())
    assert saved["experts"] == ["vlm", "action_expert", "fast"]
    assert not (tmp_path / "flat" / "world_model").exists()
    loaded = HybridPolicy.from_pretrained(tmp_path / "flat").eval()
    assert loaded.world_model is None
    assert loaded.state_dict().keys() == policy.state_dict().keys()
    for key, value in policy.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with pytest.raises(ValueError, match="cannot imagine: this policy has no world model"):
        loaded.imagine(torch.zeros(1, 4, 8, 8), torch.zeros(1, 2, 64), torch.ones(1, 2), 2, 1)
    planner = HybridPlanner.from_pretrained(tmp_path / "flat", num_candidates=2)
    assert planner.visual_subgoal is False
    plan = planner.plan(_first_observation(policy, dm, batch), batch["instruction"][0])
    assert plan.actions.shape == (8, 4) and np.abs(plan.actions).max() <= 1.0
    assert set(plan.timings_ms) == {"subgoal", "action"}, "nothing encoded or imagined"
    assert len(plan.candidate_latents) == 0
    with pytest.raises(ValueError, match="no world model.*visual_subgoal=False"):
        HybridPlanner.from_pretrained(tmp_path / "flat", visual_subgoal=True)


FORMULATIONS = {  # what each configs/formulation/*.yaml changes, on the small experts
    "hierarchical": {},
    "flat_vla": {"world_model": False},
    "inverse_dynamics": {"action_expert": dict(SMALL["action_expert"], read_vlm=False)},
    "representation": {"action_expert": dict(SMALL["action_expert"], world_features=True)},
    "joint": {
        "world_model": dict(SMALL["world_model"], flow=False),
        "action_expert": dict(SMALL["action_expert"], joint=True),
    },
    "latent_frame_actions": {
        "world_model": dict(SMALL["world_model"], action_frames=True, max_action_dim=8),
        "action_expert": False,
    },
    "latent_plan": {
        "world_model": dict(SMALL["world_model"], flow=False),
        "latent_plan": dict(plan_tokens=4, plan_dim=8, hidden=32, num_layers=1),
    },
}


def _formulation_policy(name: str, mt10_dataset) -> tuple[HybridPolicy, HybridDataModule]:
    """A fresh policy of the small experts in formulation `name`, and its DataModule."""
    dm = HybridDataModule(str(mt10_dataset[0]), chunk_size=8, future_offset=8, batch_size=4)
    dm.setup("fit")
    torch.manual_seed(0)
    policy = HybridPolicy.create(
        dm.train_set.texts(),
        dm.train_set.action_chunks(),
        [EMBODIMENT],
        {EMBODIMENT.name: dm.norm_stats()},
        **(SMALL | FORMULATIONS[name]),
    )
    return policy, dm


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_knowledge_insulation_per_formulation(formulation, mt10_dataset):
    """In every formulation only the VLM's own losses (lang, fast) train the VLM: whatever
    reads its features (the world model, the action expert) does so behind a stop-gradient."""
    policy, dm = _formulation_policy(formulation, mt10_dataset)
    policy.train()
    losses = policy.losses(next(iter(dm.train_dataloader())), imagined_share=0.5)
    below = [name for name in losses if name not in ("lang", "fast")]
    predicts_future = formulation not in ("flat_vla", "latent_plan")
    assert "action" in below and ("world" in below) == predicts_future
    assert ("plan" in below) == (formulation == "latent_plan")
    sum(losses[name] for name in below).backward(retain_graph=True)
    for name, p in policy.vlm.named_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, f"{below} reached vlm {name}"
    policy.zero_grad(set_to_none=True)
    (losses["lang"] + losses["fast"]).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.vlm.parameters())


def test_representation_reads_world_features_from_one_pass_and_imagines_nothing(
    mt10_dataset, tmp_path
):
    """`action_expert.world_features` (configs/formulation/representation.yaml): the action
    expert reads the world model's transformer features, one token per latent patch, in
    training and in planning alike; the planner runs one world-model pass a chunk and samples,
    scores and decodes no future."""
    policy, dm = _formulation_policy("representation", mt10_dataset)
    wm = policy.world_model
    assert policy.action_expert.config.world_features == wm.feature_dim == 32
    batch = next(iter(dm.train_dataloader()))
    current = wm.encode(batch["images"])
    features, mask = policy.prefix_features(
        batch["images"], list(batch["instruction"]), list(batch["subgoal"])
    )
    tokens = policy.world_features(current, features, mask)
    assert tokens.shape == (4, policy.action_expert.visual_pos.shape[1], 32)
    torch.testing.assert_close(tokens, policy.world_features(current, features, mask))
    assert {"world", "value", "action"} <= set(policy.losses(batch))
    policy.eval().save_pretrained(tmp_path / "representation")
    planner = HybridPlanner.from_pretrained(tmp_path / "representation", num_candidates=4)
    obs = _first_observation(policy, dm, batch)
    plan = planner.plan(obs, batch["instruction"][0])
    assert "world_features" in plan.timings_ms and "imagine" not in plan.timings_ms
    assert len(plan.candidate_latents) == 0 and plan.actions.shape == (8, 4)
    assert planner.visual_latent.shape == (1, *tokens.shape[1:])
    with pytest.raises(ValueError, match="world_features reads the world model's features"):
        HybridPolicy.create(
            dm.train_set.texts(),
            dm.train_set.action_chunks(),
            [EMBODIMENT],
            {EMBODIMENT.name: dm.norm_stats()},
            **(SMALL | FORMULATIONS["representation"] | {"world_model": False}),
        )


def test_joint_plans_k_chunk_and_future_pairs_and_keeps_the_best(mt10_dataset, tmp_path):
    """`action_expert.joint` with `world_model.flow: false` (configs/formulation/joint.yaml): the
    world model keeps its latent space and value head and predicts nothing; the action expert
    learns the future beside the actions; the planner draws K (chunk, future) pairs in one call,
    executes the chunk of the future the value head scores best, and imagines nothing else."""
    policy, dm = _formulation_policy("joint", mt10_dataset)
    assert policy.world_model.transformer is None
    batch = next(iter(dm.train_dataloader()))
    losses = policy.losses(batch)
    assert {"world", "value", "vae", "action"} <= set(losses)
    losses["world"].backward()
    assert policy.action_expert.future_out.weight.grad.abs().sum() > 0
    current = policy.world_model.encode(batch["images"])
    features, mask = policy.prefix_features(
        batch["images"], list(batch["instruction"]), list(batch["subgoal"])
    )
    with pytest.raises(ValueError, match="predicts no future"):
        policy.imagine(current, features, mask, 2, 1)
    assert policy.imagine_batch(batch, current, features, mask, 1).shape == current.shape

    policy.eval().save_pretrained(tmp_path / "joint")
    assert not (tmp_path / "joint" / "world_model" / "transformer").exists()
    planner = HybridPlanner.from_pretrained(tmp_path / "joint", num_candidates=4)
    obs = _first_observation(policy, dm, batch)
    plan = planner.plan(obs, batch["instruction"][0])
    assert "joint" in plan.timings_ms and not {"imagine", "action"} & set(plan.timings_ms)
    assert plan.candidate_latents.shape == (4, *current.shape[1:]) and plan.actions.shape == (8, 4)
    assert plan.chosen == int(np.argmax(plan.scores))
    spec = policy.embodiments["sawyer"]
    assert (plan.actions >= spec.action_low).all() and (plan.actions <= spec.action_high).all()
    # the chunk executed is the chosen pair's: the same draw from the planner's seed
    images = planner._check(obs, batch["instruction"][0])
    _, features, mask = planner.policy.propose_subgoals(images, [batch["instruction"][0]])
    planner.reset()  # its world generator as the plan found it (the pairs are the world's draws)
    chunks, _, scores = planner.policy.imagine_and_act(
        planner.policy.normalize_state(obs.state[None], "sawyer"), "sawyer", features, mask, images,
        4, planner.action_steps, planner.world_generator,
    )  # fmt: skip
    np.testing.assert_allclose(scores[0].numpy(), plan.scores, rtol=1e-5)
    np.testing.assert_allclose(chunks[0, plan.chosen], plan.actions, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot act without it"):
        HybridPlanner.from_pretrained(tmp_path / "joint", visual_subgoal=False)
    for changes in ({"world_model": SMALL["world_model"]}, {"world_model": False}):
        with pytest.raises(ValueError, match="go together"):
            HybridPolicy.create(
                dm.train_set.texts(),
                dm.train_set.action_chunks(),
                [EMBODIMENT],
                {EMBODIMENT.name: dm.norm_stats()},
                **(SMALL | FORMULATIONS["joint"] | changes),
            )


def test_latent_frame_actions_packs_the_chunk_into_latent_frames_and_plans_without_an_expert(
    mt10_dataset, tmp_path
):
    """`world_model.action_frames` with `action_expert: false`
    (configs/formulation/latent_frame_actions.yaml): no action expert exists; each action step
    fills one patch of a latent frame beside the future, and the world model's transformer learns
    and draws both; the planner executes the actions of the best-scored future, unpacked to the
    robot's units, and a saved policy plans exactly as the one in memory."""
    policy, dm = _formulation_policy("latent_frame_actions", mt10_dataset)
    wm = policy.world_model
    assert policy.action_expert is None and policy.joint and wm.num_action_frames == 1
    rows = torch.randn(3, 8, 4)  # chunk 8 of a 4-dim robot, padded to max_action_dim
    rows = F.pad(rows, (0, wm.config.max_action_dim - 4))
    strip = wm._strip(rows)
    assert strip.shape == (3, *wm.latent_shape) and torch.equal(wm._rows(strip), rows)
    batch = next(iter(dm.train_dataloader()))
    losses = policy.losses(batch)
    assert {"world", "value", "vae", "action"} <= set(losses)
    losses["action"].backward()
    assert wm.transformer.pos_embed.proj.weight.grad.abs().sum() > 0
    current = wm.encode(batch["images"])
    features, mask = policy.prefix_features(
        batch["images"], list(batch["instruction"]), list(batch["subgoal"])
    )
    with pytest.raises(ValueError, match="imagine_and_act"):
        policy.imagine(current, features, mask, 2, 1)
    assert policy.imagine_batch(batch, current, features, mask, 1).shape == current.shape
    # a committed prefix comes back unchanged, and padded dims are exactly zero before unpacking
    state = policy._pad(batch["state"][:1], wm.config.max_state_dim)
    dims = policy.dim_mask(["sawyer"])
    prefix = F.pad(torch.randn(1, 3, 4), (0, wm.config.max_action_dim - 4))
    chunks, futures = wm.imagine_and_act(
        current[:1], state, features[:1], mask[:1], dims, 2, 2, prefix=prefix
    )
    assert chunks.shape == (2, 8, wm.config.max_action_dim) and futures.shape == (
        2,
        *wm.latent_shape,
    )
    torch.testing.assert_close(chunks[:, :3], prefix.expand(2, -1, -1))
    assert not chunks[..., 4:].any()

    policy.eval().save_pretrained(tmp_path / "lfa")
    assert not (tmp_path / "lfa" / "action_expert").exists()
    loaded = HybridPolicy.from_pretrained(tmp_path / "lfa")
    assert loaded.action_expert is None and loaded.compute_fingerprint() == policy.fingerprint
    planner = HybridPlanner(loaded, num_candidates=4)
    obs = _first_observation(policy, dm, batch)
    plan = planner.plan(obs, batch["instruction"][0])
    assert "joint" in plan.timings_ms and not {"imagine", "action"} & set(plan.timings_ms)
    assert plan.actions.shape == (8, 4) and plan.chosen == int(np.argmax(plan.scores))
    spec = policy.embodiments["sawyer"]
    assert (plan.actions >= spec.action_low).all() and (plan.actions <= spec.action_high).all()
    in_memory = HybridPlanner(policy, num_candidates=4).plan(obs, batch["instruction"][0])
    np.testing.assert_array_equal(in_memory.actions, plan.actions)
    with pytest.raises(ValueError, match="cannot act without it"):
        HybridPlanner(loaded, visual_subgoal=False)
    for changes in (
        {"action_expert": SMALL["action_expert"]},
        {"world_model": SMALL["world_model"]},
    ):
        with pytest.raises(ValueError, match="go together"):
            HybridPolicy.create(
                dm.train_set.texts(),
                dm.train_set.action_chunks(),
                [EMBODIMENT],
                {EMBODIMENT.name: dm.norm_stats()},
                **(SMALL | FORMULATIONS["latent_frame_actions"] | changes),
            )


def test_latent_plan_learns_plans_from_the_window_and_plans_from_the_prior(mt10_dataset, tmp_path):
    """`latent_plan` (configs/formulation/latent_plan.yaml): the action expert reads P plan
    tokens; in training they come from the posterior of the window's future and actions, and
    the action loss reaches that posterior; the `plan` loss (KL) pulls the prior towards it; at
    planning the prior draws the plan each chunk, and nothing is imagined, scored or decoded."""
    policy, dm = _formulation_policy("latent_plan", mt10_dataset)
    plan = policy.latent_plan
    assert policy.world_model.transformer is None and not policy.joint
    assert (
        policy.action_expert.config.world_features == 8
        and policy.action_expert.config.latent_size == 2
    )
    batch = next(iter(dm.train_dataloader()))
    policy.train()
    # a step opens the action expert's gates (adaLN-zero: at initialisation its context,
    # where the plan tokens sit, receives no gradient)
    step = torch.optim.SGD(policy.action_expert.parameters(), lr=0.1)
    policy.losses(batch)["action"].backward()
    step.step()
    policy.zero_grad(set_to_none=True)
    losses = policy.losses(batch)
    assert {"plan", "action", "value"} <= set(losses) and "world" not in losses
    assert losses["plan"] >= 0
    losses["action"].backward(retain_graph=True)
    assert plan.posterior_out.weight.grad.abs().sum() > 0  # the actions shape the plan
    assert plan.prior_out.weight.grad is None  # the prior learns from the KL alone
    policy.zero_grad(set_to_none=True)
    losses["plan"].backward()
    assert plan.prior_out.weight.grad.abs().sum() > 0
    # the posterior reads the future: another future gives another plan
    current = policy.world_model.encode(batch["images"])
    future = policy.world_model.encode(batch["future_images"])
    actions = F.pad(batch["actions"], (0, policy.action_config.max_action_dim - 4))
    mean, _ = plan.posterior(future, actions, batch["action_mask"])
    assert not torch.allclose(mean, plan.posterior(current, actions, batch["action_mask"])[0])

    policy.eval().save_pretrained(tmp_path / "plan")
    assert (tmp_path / "plan" / "latent_plan").is_dir()
    assert not (tmp_path / "plan" / "world_model" / "transformer").exists()
    loaded = HybridPolicy.from_pretrained(tmp_path / "plan")
    assert loaded.compute_fingerprint() == policy.fingerprint
    planner = HybridPlanner(loaded, num_candidates=4)
    obs = _first_observation(policy, dm, batch)
    first = planner.plan(obs, batch["instruction"][0])
    assert {"plan", "action"} <= set(first.timings_ms)
    assert not {"imagine", "joint", "decode"} & set(first.timings_ms)
    assert first.actions.shape == (8, 4) and first.scores.size == 0
    assert planner.visual_latent.shape == (1, 4, 8)
    in_memory = HybridPlanner(policy, num_candidates=4).plan(obs, batch["instruction"][0])
    np.testing.assert_array_equal(in_memory.actions, first.actions)
    with pytest.raises(ValueError, match="flow: false"):
        HybridPolicy.create(
            dm.train_set.texts(),
            dm.train_set.action_chunks(),
            [EMBODIMENT],
            {EMBODIMENT.name: dm.norm_stats()},
            **(SMALL | FORMULATIONS["latent_plan"] | {"world_model": SMALL["world_model"]}),
        )


def test_a_scene_estimator_trains_on_the_current_the_future_and_other_rollouts_frames(
    mt10_dataset,
):
    """With `scene_estimator` the scene loss also reads each sample's future frame and scene
    (`future_scene`, padded to the head's width) and the frames of a second dataset
    (`data.scene_root`: `scene_images`, `scene_target`); a batch without them trains on the
    current frames alone."""
    root = str(mt10_dataset[0])
    dm = HybridDataModule(root, chunk_size=8, future_offset=8, batch_size=4, scene_root=root)
    dm.setup("fit")
    torch.manual_seed(0)
    # the action path reads the current frames' estimate (scene_teacher 0): were the other
    # rollouts' frames mixed into it, the action loss would change with them
    expert = dict(
        SMALL["action_expert"], keypoints=0, scene_estimator=4, scene_input=True, scene_teacher=0.0
    )
    policy = HybridPolicy.create(
        dm.train_set.texts(),
        dm.train_set.action_chunks(),
        [EMBODIMENT],
        {EMBODIMENT.name: dm.norm_stats()},
        **dict(SMALL, action_expert=expert),
    )
    batch = next(iter(dm.train_dataloader()))

    def losses(batch, **options):
        torch.manual_seed(1)  # the same random shifts and dropout every time
        return policy.losses(batch, **options)

    def scene_loss(batch):
        return losses(batch)["scene"]

    base = scene_loss(batch)
    moved = scene_loss(dict(batch, future_scene=batch["future_scene"] + 1.0))
    assert moved > base, "the future frames' scene is a target"
    # scene_future False: the future frames are no target, the second dataset's still are
    alone = losses(batch, scene_future=False)["scene"]
    shifted = dict(batch, future_scene=batch["future_scene"] + 1.0)
    assert losses(shifted, scene_future=False)["scene"] == alone != base
    rollouts = dict(batch, scene_target=batch["scene_target"] + 1.0)
    assert losses(rollouts, scene_future=False)["scene"] > alone
    other = losses(dict(batch, scene_target=batch["scene_target"] + 1.0))
    assert other["scene"] > base, "the second dataset's scene is a target"
    blank = losses(dict(batch, scene_images=torch.zeros_like(batch["scene_images"])))
    assert blank["scene"] != base, "its frames are read"
    assert blank["action"] == losses(batch)["action"], "by the estimator's loss alone"
    masked = dict(batch, scene_target_mask=batch["scene_target_mask"].clone())
    masked["scene_target_mask"][:2] = 0.0  # beyond the bound: no target
    far = dict(masked, scene_target=batch["scene_target"].clone())
    far["scene_target"][:2] += 100.0
    assert scene_loss(far) == scene_loss(masked), "a masked target weighs nothing"
    only = {"future_scene", "scene_images", "scene_target", "scene_target_mask"}
    current = {k: v for k, v in batch.items() if k not in only}
    assert torch.isfinite(scene_loss(current)) and scene_loss(current) != base
    # fewer of the second dataset's frames than windows (`data.scene_batch_size`): each is read
    fewer = {k: batch[k][:2] if k in only - {"future_scene"} else batch[k] for k in batch}
    assert torch.isfinite(scene_loss(fewer)) and scene_loss(fewer) != base
    fewer["scene_target"] = fewer["scene_target"] + 1.0
    assert scene_loss(fewer) > scene_loss(dict(fewer, scene_target=batch["scene_target"][:2]))
