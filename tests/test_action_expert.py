import copy
import re

import pytest
import torch

from experts.action import ActionExpert
from experts.image_encoder import random_shift, spatial_softmax

B, L, D, H = 3, 7, 32, 6


def _inputs(batch=B, generator=None):
    g = generator or torch.Generator().manual_seed(0)
    return dict(
        state=torch.randn(batch, 5, generator=g),
        embodiment_ids=torch.tensor([0, 1, 0][:batch]),
        vlm_features=torch.randn(batch, L, D, generator=g),
        vlm_mask=torch.ones(batch, L, dtype=torch.bool),
        images=torch.rand(batch, 1, 3, 32, 32, generator=g),
        visual_latent=torch.randn(batch, 4, 8, 8, generator=g),
    )


def _expert(**overrides) -> ActionExpert:
    """A small expert for the inputs of `_inputs`: 5 state and 3 action dims, two robots."""
    sizes = dict(hidden=32, num_layers=2, image_size=32, image_channels=(8, 16, 16))
    return ActionExpert(
        vlm_dim=D,
        chunk_size=H,
        max_state_dim=5,
        max_action_dim=3,
        num_embodiments=2,
        **(sizes | overrides),
    )


@pytest.fixture(scope="module")
def expert():
    torch.manual_seed(0)
    return _expert().eval()


@pytest.mark.parametrize("batch", [1, 3])
def test_sample_shapes_and_reproducibility(expert, batch):
    inputs = _inputs(batch)
    a = expert.sample(**inputs, steps=4, generator=torch.Generator().manual_seed(1))
    b = expert.sample(**inputs, steps=4, generator=torch.Generator().manual_seed(1))
    c = expert.sample(**inputs, steps=4, generator=torch.Generator().manual_seed(2))
    assert a.shape == (batch, H, 3) and torch.equal(a, b) and not torch.equal(a, c)


def test_flat_mode_without_visual_subgoal(expert):
    inputs = _inputs() | {"visual_latent": None}
    assert expert.sample(**inputs, steps=2).shape == (B, H, 3)


def test_the_expert_sees_the_current_frame(expert):
    """Its own CNN reads the frame: other pixels, other actions from the same noise; a blind
    expert (image_size None) takes no frame at all."""
    inputs = _inputs()
    expert = copy.deepcopy(expert)
    with torch.no_grad():  # adaLN-zero starts every block as the identity: wake them up
        expert.modulation[1].weight.normal_(std=0.1)
    a = expert.sample(**inputs, steps=2, generator=torch.Generator().manual_seed(0))
    other = inputs | {"images": inputs["images"].flip(-1)}
    b = expert.sample(**other, steps=2, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"images must be \(B, N, 3, S, S\) with 1 <= N <= 1"):
        expert.sample(**(inputs | {"images": inputs["images"][:, 0]}), steps=1)
    blind = _expert(num_layers=1, image_size=None)
    assert blind.image_in is None
    assert blind.sample(**(inputs | {"images": None}), steps=1).shape == (B, H, 3)


def test_random_shift_moves_each_image_by_at_most_pad():
    images = torch.zeros(4, 1, 3, 16, 16)
    images[..., 8, 8] = 1.0  # one bright pixel per image, far from the border
    shifted = random_shift(images, pad=2, generator=torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    where = [torch.nonzero(s[0, 0]).tolist() for s in shifted]
    assert all(len(w) == 1 and abs(w[0][0] - 8) <= 2 and abs(w[0][1] - 8) <= 2 for w in where)
    assert len({tuple(w[0]) for w in where}) > 1, "each image draws its own offset"
    assert torch.equal(random_shift(images, pad=0), images)


def test_embodiment_rows_are_separate(expert):
    """A sample's output depends on its robot's row only: changing robot 1's weights leaves
    robot 0's samples alone, in the same mixed batch."""
    inputs = _inputs()
    before = expert.sample(**inputs, steps=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expert.action_out.weight[1] += 1.0
    after = expert.sample(**inputs, steps=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expert.action_out.weight[1] -= 1.0
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]])
    assert not torch.allclose(after[1], before[1])


def test_loss_is_masked_and_stops_at_the_vlm_features(expert):
    inputs = _inputs()
    inputs["vlm_features"].requires_grad_(True)
    actions = torch.randn(B, H, 3)
    action_mask = torch.ones(B, H, dtype=torch.bool)
    action_mask[0, 4:] = False
    dim_mask = torch.tensor([[True, True, False]] * B)
    torch.manual_seed(3)
    loss = expert.loss(actions, action_mask, dim_mask, **inputs)["action"]
    loss.backward()
    assert inputs["vlm_features"].grad is None, "knowledge insulation: no gradient to the VLM"
    assert expert.action_in.weight.grad.abs().sum() > 0
    # Values on masked steps and dims do not change the loss.
    changed = actions.clone()
    changed[0, 4:] = 50.0
    changed[:, :, 2] = -50.0
    torch.manual_seed(3)
    torch.testing.assert_close(
        expert.loss(changed, action_mask, dim_mask, **inputs)["action"], loss
    )


def test_save_load_identical(expert, tmp_path):
    expert.save_pretrained(tmp_path / "a")
    loaded = ActionExpert.from_pretrained(tmp_path / "a").eval()
    inputs = _inputs()
    a = expert.sample(**inputs, steps=3, generator=torch.Generator().manual_seed(5))
    b = loaded.sample(**inputs, steps=3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_padded_action_dims_sample_as_zeros(expert):
    dim_mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    actions = expert.sample(**_inputs(), dim_mask=dim_mask, steps=3)
    assert torch.all(actions[~dim_mask[:, None, :].expand_as(actions)] == 0)
    assert torch.all(actions[1] != 0)


def test_spatial_softmax_finds_each_peak():
    """A sharp peak at row r, column c of a 5 x 9 map lands at its (x, y) in [-1, 1]."""
    maps = torch.zeros(2, 3, 5, 9)
    peaks = [(0, 0), (4, 8), (2, 6)]
    for k, (r, c) in enumerate(peaks):
        maps[:, k, r, c] = 50.0
    points = spatial_softmax(maps)
    expected = torch.tensor([[-1 + c / 4, -1 + r / 2] for r, c in peaks])
    torch.testing.assert_close(points, expected.expand(2, 3, 2), atol=1e-4, rtol=0)


def test_keypoint_temperature_sharpens_the_softmax_and_is_learned(tmp_path):
    """The heat maps are divided by a learned per-point temperature: at 0.1 each softmax is
    more concentrated than the same weights' at 1, the points are its expectations (forward and
    `heatmaps_softmax` agree), the action loss trains the temperature, and it saves and loads."""
    torch.manual_seed(0)
    sharp = _expert(keypoints=4, keypoint_temperature=0.1)
    plain = _expert(keypoints=4)
    state = {k: v for k, v in sharp.state_dict().items() if "log_temperature" not in k}
    plain.load_state_dict(state)
    images = _inputs()["images"]

    def entropy(expert):
        w = expert.image_in.heatmaps_softmax(images)  # (B, N, K, cells)
        return -(w * w.clamp_min(1e-12).log()).sum(-1)

    with torch.no_grad():
        assert (entropy(sharp) < entropy(plain) - 1.0).all()
        weights = sharp.image_in.heatmaps_softmax(images)
        _, points = sharp.image_in(images)
        side = int(weights.shape[-1] ** 0.5)
        axis = torch.linspace(-1, 1, side)
        ys, xs = torch.meshgrid(axis, axis, indexing="ij")
        expected = torch.stack(
            [(weights * xs.reshape(-1)).sum(-1), (weights * ys.reshape(-1)).sum(-1)], -1
        )
        torch.testing.assert_close(points, expected, atol=1e-5, rtol=0)
    actions = torch.randn(B, H, 3)
    torch.nn.init.normal_(sharp.modulation[1].weight, std=0.02)  # adaLN-zero passes nothing yet
    loss = sharp.loss(
        actions,
        torch.ones(B, H, dtype=torch.bool),
        torch.ones(B, 3, dtype=torch.bool),
        **_inputs(),
    )["action"]
    loss.backward()
    grad = sharp.image_in.log_temperature.grad
    assert grad is not None and grad.abs().sum() > 0
    assert plain.image_in.log_temperature is None
    with torch.no_grad():
        sharp.image_in.log_temperature.add_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    sharp.save_pretrained(tmp_path / "expert")
    loaded = ActionExpert.from_pretrained(tmp_path / "expert")
    assert loaded.config.keypoint_temperature == 0.1
    assert torch.equal(loaded.image_in.log_temperature, sharp.image_in.log_temperature)
    with pytest.raises(ValueError, match="keypoint_temperature"):
        _expert(keypoints=4, keypoint_temperature=0.0)


def test_scene_head_learns_only_from_the_frames_and_only_where_the_data_has_a_scene():
    """The scene loss is masked over padded dims, trains the keypoints through the frames and
    never reaches the VLM; without a scene in the batch only the action loss is returned."""
    torch.manual_seed(0)
    expert = _expert(keypoints=4, scene_dim=5)
    inputs = _inputs()
    inputs["vlm_features"].requires_grad_(True)
    actions, action_mask = torch.randn(B, H, 3), torch.ones(B, H, dtype=torch.bool)
    dim_mask = torch.ones(B, 3, dtype=torch.bool)
    scene = torch.randn(B, 5)
    scene_mask = torch.tensor([[True, True, True, False, False]] * B)
    torch.manual_seed(3)
    targets = dict(scene=scene, scene_mask=scene_mask)
    losses = expert.loss(actions, action_mask, dim_mask, **inputs, **targets)
    assert set(losses) == {"action", "scene"} and losses["scene"] > 0
    losses["scene"].backward()
    assert inputs["vlm_features"].grad is None, "knowledge insulation holds for the scene loss"
    assert expert.image_in.heatmaps.weight.grad.abs().sum() > 0, "the keypoints learn"
    assert expert.action_in.weight.grad is None, "the scene head is not the action path"
    changed = scene.clone()
    changed[:, 3:] = 100.0
    torch.manual_seed(3)
    again = expert.loss(actions, action_mask, dim_mask, **inputs, **(targets | {"scene": changed}))
    torch.testing.assert_close(again["scene"], losses["scene"])
    assert set(expert.loss(actions, action_mask, dim_mask, **inputs)) == {"action"}
    with pytest.raises(ValueError, match="scene_dim 5 needs an image_size and keypoints"):
        _expert(scene_dim=5)


def test_keypoint_tokens_reach_the_actions_and_survive_save_load(tmp_path):
    torch.manual_seed(0)
    expert = _expert(keypoints=4, scene_dim=5).eval()
    with torch.no_grad():  # adaLN-zero starts every block as the identity: wake them up
        expert.modulation[1].weight.normal_(std=0.1)
    inputs = _inputs()
    a = expert.sample(**inputs, steps=3, generator=torch.Generator().manual_seed(5))
    expert.save_pretrained(tmp_path / "kp")
    loaded = ActionExpert.from_pretrained(tmp_path / "kp").eval()
    b = loaded.sample(**inputs, steps=3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    with torch.no_grad():
        loaded.image_in.keypoint_proj.weight.mul_(3.0)
    c = loaded.sample(**inputs, steps=3, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(a, c), "the actions read the keypoint tokens"


def test_scene_token_reads_the_truth_or_the_estimate_and_stops_the_action_gradient():
    """With `scene_input` the expert reads a scene token: the true scene for a `scene_teacher`
    share of training samples (those that have one), else its own estimate, behind a
    stop-gradient either way; at sampling, its estimate, or a true scene where one is given
    (privileged, for diagnosis)."""
    actions, action_mask = torch.randn(B, H, 3), torch.ones(B, H, dtype=torch.bool)
    dim_mask = torch.ones(B, 3, dtype=torch.bool)
    scene, scene_mask = torch.randn(B, 5), torch.ones(B, 5, dtype=torch.bool)
    for teacher, reads_truth in ((1.0, True), (0.0, False)):
        torch.manual_seed(0)
        expert = _expert(keypoints=4, scene_dim=5, scene_input=True, scene_teacher=teacher)
        with torch.no_grad():  # adaLN-zero starts every block as the identity: wake them up
            expert.modulation[1].weight.normal_(std=0.1)
        inputs = _inputs()
        torch.manual_seed(3)
        losses = expert.loss(
            actions, action_mask, dim_mask, **inputs, scene=scene, scene_mask=scene_mask
        )
        torch.manual_seed(3)
        moved = expert.loss(
            actions, action_mask, dim_mask, **inputs, scene=scene + 5.0, scene_mask=scene_mask
        )
        assert torch.allclose(moved["action"], losses["action"]) != reads_truth
        losses["action"].backward()
        assert expert.scene_out.weight.grad is None, "the action loss never trains the head"
        assert expert.scene_token.weight.grad.abs().sum() > 0
    expert.eval()
    a = expert.sample(**inputs, steps=3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expert.scene_out.bias.add_(1.0)
    b = expert.sample(**inputs, steps=3, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(a, b), "planning reads the estimate"
    given = expert.sample(
        **inputs, steps=3, generator=torch.Generator().manual_seed(5), scene=scene
    )
    with torch.no_grad():
        expert.scene_out.bias.add_(1.0)
    again = expert.sample(
        **inputs, steps=3, generator=torch.Generator().manual_seed(5), scene=scene
    )
    torch.testing.assert_close(given, again, msg="a true scene given: the estimate is not read")
    moved = expert.sample(
        **inputs, steps=3, generator=torch.Generator().manual_seed(5), scene=scene + 5.0
    )
    assert not torch.allclose(given, moved), "the true scene given is read"
    with pytest.raises(ValueError, match="scene_input needs a scene head"):
        _expert(scene_input=True)
    with pytest.raises(ValueError, match="reads no scene"):
        _expert().sample(**inputs, steps=1, scene=scene)


def test_state_dropout_hides_the_state_in_training_and_at_one_never_reads_it():
    actions, action_mask = torch.randn(B, H, 3), torch.ones(B, H, dtype=torch.bool)
    dim_mask = torch.ones(B, 3, dtype=torch.bool)
    moved = lambda inputs: inputs | {"state": inputs["state"] + 3.0}  # noqa: E731
    for dropout, reads in ((1.0, False), (0.0, True)):
        torch.manual_seed(0)
        expert = _expert(state_dropout=dropout)
        with torch.no_grad():  # adaLN-zero starts every block as the identity: wake them up
            expert.modulation[1].weight.normal_(std=0.1)
        inputs = _inputs()
        torch.manual_seed(3)
        loss = expert.loss(actions, action_mask, dim_mask, **inputs)["action"]
        torch.manual_seed(3)
        again = expert.loss(actions, action_mask, dim_mask, **moved(inputs))["action"]
        assert torch.allclose(loss, again) != reads
        a, b = (
            expert.eval().sample(**x, steps=3, generator=torch.Generator().manual_seed(5))
            for x in (inputs, moved(inputs))
        )
        assert torch.allclose(a, b) != reads
    assert _expert().no_state is None, "no dropout, no extra parameter"
    torch.manual_seed(0)
    expert = _expert(state_dropout=0.5)
    with torch.no_grad():
        expert.modulation[1].weight.normal_(std=0.1)
    expert.loss(actions, action_mask, dim_mask, **_inputs())["action"].backward()
    assert expert.no_state.grad.abs().sum() > 0, "the 'no state' token learns"
    with pytest.raises(ValueError, match="state_dropout must be in"):
        _expert(state_dropout=1.5)


def test_an_expert_that_reads_no_vlm_acts_from_the_frames_and_the_imagined_future():
    """`read_vlm` False (the inverse-dynamics formulation): no VLM projection, and the chunk
    does not change with the VLM's features but does with the visual subgoal."""
    torch.manual_seed(0)
    expert = _expert(read_vlm=False).eval()
    assert expert.vlm_in is None
    with torch.no_grad():  # adaLN-zero starts every block as the identity: wake them up
        expert.modulation[1].weight.normal_(std=0.1)
    inputs = _inputs()

    def sample(**change):
        g = torch.Generator().manual_seed(5)
        return expert.sample(**(inputs | change), steps=3, generator=g)

    base = sample()
    torch.testing.assert_close(base, sample(vlm_features=inputs["vlm_features"] + 3.0))
    assert not torch.allclose(base, sample(visual_latent=inputs["visual_latent"] + 3.0))
    with pytest.raises(ValueError, match="read_vlm False needs something else to read"):
        _expert(read_vlm=False, image_size=None, latent_channels=0)


def test_scene_conditioning_feeds_the_scene_read_into_every_block():
    """`scene_conditioning`: the scene the token reads (here the true one) also conditions the
    blocks' adaptive norms, and the action loss trains that path."""
    torch.manual_seed(0)
    expert = _expert(keypoints=4, scene_dim=5, scene_input=True, scene_conditioning=True)
    with torch.no_grad():  # adaLN-zero starts every block as the identity: wake them up
        expert.modulation[1].weight.normal_(std=0.1)
    scene, scene_mask = torch.randn(B, 5), torch.ones(B, 5, dtype=torch.bool)
    actions, action_mask = torch.randn(B, H, 3), torch.ones(B, H, dtype=torch.bool)
    losses = expert.loss(
        actions, action_mask, torch.ones(B, 3, dtype=torch.bool), **_inputs(), scene=scene,
        scene_mask=scene_mask,
    )  # fmt: skip
    losses["action"].backward()
    assert expert.scene_cond[0].weight.grad.abs().sum() > 0
    expert.eval()
    a, b = (
        expert.sample(**_inputs(), steps=2, generator=torch.Generator().manual_seed(1), scene=x)
        for x in (scene, scene + 3.0)
    )
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="scene_conditioning needs scene_input"):
        _expert(keypoints=4, scene_dim=5, scene_conditioning=True)


def test_the_plan_age_conditions_every_block_and_stays_in_the_range_learned():
    """`plan_lag`: the plan's age in steps joins the flow time in the blocks' adaptive norms,
    the action loss trains that path, no age means a fresh plan, and an age outside what the
    expert learns is refused by name. An expert without it reads no age."""
    torch.manual_seed(0)
    expert = _expert(plan_lag=4)
    with torch.no_grad():  # adaLN-zero starts every block as the identity: wake them up
        expert.modulation[1].weight.normal_(std=0.1)
    actions, action_mask = torch.randn(B, H, 3), torch.ones(B, H, dtype=torch.bool)
    dims = torch.ones(B, 3, dtype=torch.bool)
    lag = torch.tensor([0, 2, 4])
    expert.loss(actions, action_mask, dims, **_inputs(), lag=lag)["action"].backward()
    assert (expert.lag_embed.weight.grad.abs().sum(1) > 0).tolist() == [1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"lag: expected steps in \[0, 4\].*got 0..5"):
        expert.loss(actions, action_mask, dims, **_inputs(), lag=torch.tensor([0, 5, 1]))
    expert.eval()

    def sample(model, age):
        g = torch.Generator().manual_seed(1)
        return model.sample(**_inputs(), steps=2, generator=g, lag=age)

    fresh, old = sample(expert, torch.zeros(B, dtype=torch.long)), sample(expert, lag)
    assert torch.equal(sample(expert, None), fresh)
    assert torch.equal(old[0], fresh[0]) and not torch.allclose(old[1:], fresh[1:])
    plain = _expert().eval()
    assert torch.equal(sample(plain, lag), sample(plain, None))
    with pytest.raises(ValueError, match="plan_lag must be >= 0, got -1"):
        _expert(plan_lag=-1)
    with pytest.raises(ValueError, match="plan_lag 4 needs joint: false"):
        _expert(plan_lag=4, joint=True, latent_channels=4, latent_size=8)


def test_scene_estimator_learns_the_scene_on_its_own_eyes_and_the_planner_reads_it(tmp_path):
    """`scene_estimator`: the scene loss trains the estimator's own CNN (on the current and the
    future frames), not the shared eyes, the action path or the VLM; sampling reads its estimate;
    save and load keep it."""
    actions, action_mask = torch.randn(B, H, 3), torch.ones(B, H, dtype=torch.bool)
    dim_mask = torch.ones(B, 3, dtype=torch.bool)
    scene, scene_mask = torch.randn(B, 5), torch.ones(B, 5, dtype=torch.bool)
    torch.manual_seed(0)
    expert = _expert(scene_dim=5, scene_estimator=4, scene_input=True, scene_conditioning=True)
    assert expert.scene_out is None and expert.image_in.keypoints == 0
    with torch.no_grad():  # adaLN-zero starts every block as the identity: wake them up
        expert.modulation[1].weight.normal_(std=0.1)
    inputs = _inputs()
    inputs["vlm_features"].requires_grad_(True)
    future = dict(
        extra_images=torch.rand(B, 1, 3, 32, 32),
        extra_scene=torch.randn(B, 5),
        extra_mask=torch.ones(B, 5),
        extra_ids=torch.zeros(B, dtype=torch.long),
    )
    targets = dict(scene=scene, scene_mask=scene_mask)
    torch.manual_seed(3)
    losses = expert.loss(actions, action_mask, dim_mask, **inputs, **targets, **future)
    losses["scene"].backward()
    assert expert.estimator.heatmaps.weight.grad.abs().sum() > 0, "the estimator learns"
    with pytest.raises(ValueError, match="extra_ids go together"):
        expert.loss(
            actions, action_mask, dim_mask, **inputs, **targets, **future | {"extra_ids": None}
        )
    for name, p in expert.named_parameters():
        if not name.startswith("estimator."):
            assert p.grad is None, f"the scene loss reached {name}"
    reading = _expert(scene_dim=5, scene_estimator=4, scene_input=True, scene_teacher=0.0)
    with torch.no_grad():
        reading.modulation[1].weight.normal_(std=0.1)
    torch.manual_seed(3)
    read = reading.loss(actions, action_mask, dim_mask, **inputs, **targets, **future)
    read["action"].backward()  # every sample reads the estimate, behind a stop-gradient
    assert reading.scene_token.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in reading.estimator.parameters()), "the actions train no eyes"
    names = [n for n, _ in expert.named_modules() if n.startswith("estimator.")]
    adapted = {n for n in names if re.fullmatch(ActionExpert.LORA_TARGETS, n)}
    assert adapted == {
        "estimator.stem.0",
        "estimator.stem.3",
        "estimator.heatmaps",
        "estimator.readout.0",
    }, adapted
    torch.manual_seed(3)
    current_only = expert.loss(actions, action_mask, dim_mask, **inputs, **targets)
    assert not torch.allclose(current_only["scene"], losses["scene"]), "future frames count"
    expert.eval()
    a = expert.sample(**inputs, steps=3, generator=torch.Generator().manual_seed(5))
    expert.save_pretrained(tmp_path / "estimator")
    loaded = ActionExpert.from_pretrained(tmp_path / "estimator").eval()
    torch.testing.assert_close(
        a, loaded.sample(**inputs, steps=3, generator=torch.Generator().manual_seed(5))
    )
    with torch.no_grad():
        loaded.estimator.out.bias.add_(1.0)
    b = loaded.sample(**inputs, steps=3, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(a, b), "planning reads the estimator's scene"
    with pytest.raises(ValueError, match="scene_estimator 4 needs a scene_dim"):
        _expert(scene_estimator=4)


def test_a_joint_expert_denoises_the_future_with_the_actions(tmp_path):
    """`joint`: the future latent is a target, not an input. Its loss adds `world`, which moves
    with the true future; sampling draws a chunk and a future of the latent's shape together,
    keeps a committed prefix, and survives save/load; it refuses to read a visual subgoal."""
    torch.manual_seed(0)
    expert = _expert(joint=True)
    with torch.no_grad():  # adaLN-zero passes nothing between tokens yet
        expert.modulation[1].weight.normal_(std=0.1)
    inputs = _inputs()
    mask = torch.ones(B, H, dtype=torch.bool)
    dims = torch.ones(B, 3, dtype=torch.bool)
    actions = torch.randn(B, H, 3)

    def loss(**changes):
        torch.manual_seed(1)  # the same shifts, noise and times
        args = {k: v for k, v in inputs.items() if k != "state"} | changes
        return expert.loss(actions, mask, dims, inputs["state"], **args)

    base = loss()
    assert set(base) == {"action", "world"}
    moved = loss(visual_latent=inputs["visual_latent"] + 1.0)
    # the future is the world loss's target, and the actions attend to its noisy tokens
    assert moved["world"] > base["world"] and not torch.equal(moved["action"], base["action"])
    base["world"].backward()
    assert expert.future_out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="learns the future"):
        loss(visual_latent=None)

    expert.eval()
    sample = {k: v for k, v in inputs.items() if k != "visual_latent"}
    prefix = torch.randn(B, 2, 3)
    chunk, future = expert.sample_joint(
        **sample, steps=3, generator=torch.Generator().manual_seed(5), prefix=prefix
    )
    assert chunk.shape == (B, H, 3) and future.shape == (B, 4, 8, 8)
    torch.testing.assert_close(chunk[:, :2], prefix)
    expert.save_pretrained(tmp_path / "joint")
    loaded = ActionExpert.from_pretrained(tmp_path / "joint").eval()
    again = loaded.sample_joint(**sample, steps=3, generator=torch.Generator().manual_seed(5))
    first = expert.sample_joint(**sample, steps=3, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # K draws per sample share its context: the same pairs as K copies of each sample's inputs
    shared = expert.sample_joint(
        **sample, steps=2, generator=torch.Generator().manual_seed(7), num_candidates=3
    )
    copies = {k: v.repeat_interleave(3, 0) for k, v in sample.items()}
    each = expert.sample_joint(**copies, steps=2, generator=torch.Generator().manual_seed(7))
    assert shared[0].shape == (3 * B, H, 3) and shared[1].shape == (3 * B, 4, 8, 8)
    for a, b in zip(shared, each, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(shared[0][0], shared[0][1]), "each draw from its own noise"
    with pytest.raises(ValueError, match="sample_joint"):
        expert.sample(**inputs, steps=1)
    with pytest.raises(ValueError, match="needs latent_channels > 0"):
        _expert(joint=True, latent_channels=0)


def test_an_expert_without_eyes_sees_the_frames_only_through_its_scene_estimate():
    """`eyes` False: no CNN of the expert's own; the frames change the actions through the
    scene estimator's estimate and in no other way; the scene loss still trains the estimator."""
    torch.manual_seed(0)
    kw = dict(scene_dim=5, scene_estimator=4, scene_input=True, scene_conditioning=True)
    expert = _expert(eyes=False, **kw)
    assert expert.image_in is None
    assert not any(name.startswith("image_in.") for name, _ in expert.named_parameters())
    with torch.no_grad():  # adaLN-zero starts every block as the identity: wake them up
        expert.modulation[1].weight.normal_(std=0.1)
    inputs = _inputs()
    actions, action_mask = torch.randn(B, H, 3), torch.ones(B, H, dtype=torch.bool)
    dim_mask = torch.ones(B, 3, dtype=torch.bool)
    scene = dict(scene=torch.randn(B, 5), scene_mask=torch.ones(B, 5, dtype=torch.bool))
    expert.loss(actions, action_mask, dim_mask, **inputs, **scene)["scene"].backward()
    assert expert.estimator.heatmaps.weight.grad.abs().sum() > 0, "the estimator learns"
    expert.eval()
    other = inputs | {"images": torch.rand_like(inputs["images"])}

    def sample(x):
        return expert.sample(**x, steps=3, generator=torch.Generator().manual_seed(5))

    assert not torch.allclose(sample(inputs), sample(other)), "the frames reach the actions"
    fixed = torch.randn(B, 5)
    expert.estimator.forward = lambda images, embodiment_ids, maps=None: fixed
    torch.testing.assert_close(sample(inputs), sample(other))  # only through the estimate
    with pytest.raises(ValueError, match="keypoints must be 0"):
        _expert(eyes=False, keypoints=4, **kw)
    with pytest.raises(ValueError, match="a scene_estimator > 0 must read the frames"):
        _expert(eyes=False)


def test_a_shared_stem_feeds_the_eyes_the_estimators_map_once_behind_a_stop_gradient(tmp_path):
    """`shared_stem`: the eyes read the scene estimator's two stages' map in place of two stages
    of their own. The frames pass that stem once per loss and once per sample; the action loss
    trains the eyes and never the estimator, the scene loss the estimator and never the eyes;
    the eyes' keypoints read that map; save and load keep it."""
    kw = dict(scene_dim=5, scene_estimator=4, scene_input=True, keypoints=4)
    kw |= dict(keypoint_conditioning=True, image_channels=(32, 64, 16), shared_stem=True)
    torch.manual_seed(0)
    expert = _expert(**kw)
    assert expert.image_in.stem[0].in_channels == 64, "the eyes start from the estimator's map"
    with torch.no_grad():  # adaLN-zero starts every block as the identity: wake them up
        expert.modulation[1].weight.normal_(std=0.1)
    passes = []
    expert.estimator.stem.register_forward_hook(lambda m, i, o: passes.append(len(i[0])))
    inputs = _inputs()
    actions, action_mask = torch.randn(B, H, 3), torch.ones(B, H, dtype=torch.bool)
    dim_mask = torch.ones(B, 3, dtype=torch.bool)
    scene = dict(scene=torch.randn(B, 5), scene_mask=torch.ones(B, 5, dtype=torch.bool))
    extra = dict(
        extra_images=torch.rand(2, 1, 3, 32, 32),
        extra_scene=torch.randn(2, 5),
        extra_mask=torch.ones(2, 5),
        extra_ids=torch.zeros(2, dtype=torch.long),
    )
    losses = expert.loss(actions, action_mask, dim_mask, **inputs, **scene, **extra)
    assert passes == [B + 2], "one pass of the stem, over the current and the extra frames"
    losses["action"].backward(retain_graph=True)
    assert all(p.grad is None for p in expert.estimator.parameters()), "no action gradient"
    assert expert.image_in.stem[0].weight.grad.abs().sum() > 0, "the action loss trains the eyes"
    assert expert.image_in.heatmaps.weight.grad.abs().sum() > 0, "and their keypoints"
    expert.zero_grad(set_to_none=True)
    losses["scene"].backward()
    assert expert.estimator.stem[0].weight.grad.abs().sum() > 0, "the scene loss trains the stem"
    assert all(p.grad is None for p in expert.image_in.parameters()), "and not the eyes"

    expert.eval()
    passes.clear()

    def sample(model):
        return model.sample(**inputs, steps=3, generator=torch.Generator().manual_seed(5))

    a = sample(expert)
    assert passes == [B], "one pass of the stem per sample serves the eyes and the estimate"
    expert.save_pretrained(tmp_path / "shared")
    loaded = ActionExpert.from_pretrained(tmp_path / "shared").eval()
    torch.testing.assert_close(a, sample(loaded))
    # with the true scene in the scene token, the estimator's stem reaches the actions only
    # through the eyes
    fixed = inputs | {"scene": torch.randn(B, 5)}
    before = loaded.sample(**fixed, steps=3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        loaded.estimator.stem[0].weight.mul_(1.5)
    after = loaded.sample(**fixed, steps=3, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(before, after), "the eyes see through the shared stem"
    maps = loaded.eye_input(inputs["images"])
    assert maps.shape == (B, 1, 64, 8, 8) and not maps.requires_grad
    with pytest.raises(ValueError, match=r"feature maps must be \(B, N, 64, S, S\)"):
        loaded.image_in(inputs["images"])  # frames where the map belongs
    assert loaded.image_in(maps)[1].shape == (B, 1, 4, 2)
    with pytest.raises(ValueError, match="needs a scene_estimator > 0, eyes: true"):
        _expert(shared_stem=True)
    with pytest.raises(ValueError, match=r"estimator's stages \[32, 64\], got \[8, 16, 16\]"):
        _expert(**kw | {"image_channels": (8, 16, 16)})
