"""HybridPlanner on a small trained policy and real Meta-World frames."""

import numpy as np
import pytest
import torch

from hybrid.data.lerobot_dataset import LeRobotDataset
from hybrid.types import Observation
from planners.hierarchical import HybridPlanner
from planners.schedule import RefreshSchedule
from planners.scoring import choose

CAMERA, SIDE = "observation.images.front", "observation.images.side"
INSTRUCTION = "pick up the puck and place it at the goal"


@pytest.fixture(scope="module")
def frames(mt10_dataset):
    ds = LeRobotDataset(mt10_dataset[0])
    index = next(i for i, e in enumerate(ds.episodes) if e["tasks"][0] == INSTRUCTION)
    images = {key: ds.camera_frames(index, key) for key in (CAMERA, SIDE)}
    return images, ds.episode(index)["observation.state"]


def _obs(frames, t=0):
    images, states = frames
    return Observation({key: images[key][t] for key in images}, states[t])


@pytest.fixture
def planner(tiny_policy_dir):
    return HybridPlanner.from_pretrained(tiny_policy_dir, num_candidates=4, execute_steps=4)


def test_plan_is_well_formed(planner, tiny_policy_dir, frames):
    plan = planner.plan(_obs(frames), INSTRUCTION)
    assert isinstance(plan.subgoal, str)
    assert plan.candidate_latents.shape[0] == 4 and plan.scores.shape == (4,)
    assert plan.chosen == int(np.argmax(plan.scores))
    assert plan.candidate_images.shape == (4, 64, 64, 3) and plan.candidate_images.dtype == np.uint8
    assert plan.actions.shape == (8, 4) and plan.actions.dtype == np.float32
    assert np.all(plan.actions >= -1.0) and np.all(plan.actions <= 1.0)
    # a new subgoal: one VLM pass, the generation, whose features the tiers below read
    assert set(plan.timings_ms) == {"encode", "subgoal", "imagine", "decode", "action"}
    assert plan.subgoal_refreshed
    again = planner.plan(_obs(frames, 1), INSTRUCTION)
    assert not again.subgoal_refreshed
    # the subgoal stands, and by default so do its features and its visual target: only the
    # action expert runs; checking whether the target is reached encodes the frame as well; every
    # tier runs every chunk on request
    assert set(again.timings_ms) == {"action"} and not again.target_reached
    checking = HybridPlanner.from_pretrained(
        tiny_policy_dir, num_candidates=4, schedule=RefreshSchedule(reached_fraction=0.5)
    )
    checking.plan(_obs(frames), INSTRUCTION)
    np.testing.assert_array_equal(
        checking.plan(_obs(frames, 1), INSTRUCTION).actions, again.actions
    )  # encoding for the check changes no plan that stands
    assert set(checking.last_plan.timings_ms) == {"encode", "action"}
    every_chunk = RefreshSchedule(visual="chunk", features="chunk")
    every = HybridPlanner.from_pretrained(tiny_policy_dir, num_candidates=4, schedule=every_chunk)
    every.plan(_obs(frames), INSTRUCTION)
    again = every.plan(_obs(frames, 1), INSTRUCTION)
    assert not again.subgoal_refreshed
    assert set(again.timings_ms) == {"encode", "features", "imagine", "decode", "action"}


def test_a_planner_decodes_all_candidates_the_chosen_one_or_none(planner, tiny_policy_dir, frames):
    every = planner.plan(_obs(frames), INSTRUCTION)
    np.testing.assert_array_equal(every.chosen_image, every.candidate_images[every.chosen])
    for decode in ("chosen", "none"):
        other = HybridPlanner.from_pretrained(
            tiny_policy_dir, num_candidates=4, execute_steps=4, decode=decode
        ).plan(_obs(frames), INSTRUCTION)
        np.testing.assert_array_equal(other.actions, every.actions)  # decoding changes no plan
        assert other.candidate_images.shape[0] == 0
        assert ("decode" in other.timings_ms) == (decode == "chosen")
        if decode == "chosen":  # the same future, decoded alone
            np.testing.assert_allclose(other.chosen_image.astype(int), every.chosen_image, atol=1)
        else:
            assert other.chosen_image is None
    with pytest.raises(ValueError, match=r"decode must be one of .*got 'some'"):
        HybridPlanner.from_pretrained(tiny_policy_dir, decode="some")


def test_plans_are_reproducible_after_reset(planner, frames):
    first = planner.plan(_obs(frames), INSTRUCTION)
    planner.reset()
    again = planner.plan(_obs(frames), INSTRUCTION)
    np.testing.assert_array_equal(first.actions, again.actions)
    np.testing.assert_array_equal(first.scores, again.scores)


def test_each_episode_seed_draws_its_own_noise_and_the_same_seed_the_same(planner, frames):
    """An evaluation resets the planner with each episode's seed: episodes must not share one
    noise sequence (their success would then move together, which no per-episode interval
    allows for), while a mode rerun on the same episode draws what it drew before."""
    planner.reset(11)
    first = planner.plan(_obs(frames), INSTRUCTION)
    planner.reset(12)
    other = planner.plan(_obs(frames), INSTRUCTION)
    planner.reset(11)
    again = planner.plan(_obs(frames), INSTRUCTION)
    np.testing.assert_array_equal(first.actions, again.actions)
    np.testing.assert_array_equal(first.scores, again.scores)
    assert not np.allclose(first.actions, other.actions)
    assert not np.allclose(first.scores, other.scores)


def test_act_pops_the_queue_and_replans_on_schedule(tiny_policy_dir, frames):
    never_reached = RefreshSchedule(
        max_chunks_per_subgoal=2, visual="subgoal", reached_fraction=1e-9
    )
    planner = HybridPlanner.from_pretrained(
        tiny_policy_dir, num_candidates=2, execute_steps=3, schedule=never_reached
    )
    plans = []
    for t in range(9):
        count = planner.plans
        action = planner.act(_obs(frames, t), INSTRUCTION)
        if planner.plans > count:
            plans.append(planner.executing)
            assert planner.executing is planner.last_plan
            np.testing.assert_array_equal(action, planner.executing.actions[0])
    assert len(plans) == 3 and planner.plans == 3, "3 actions per chunk, 9 steps: 3 plans"
    # The subgoal (and with it the visual subgoal) times out every 2 chunks here.
    assert [p.subgoal_refreshed for p in plans] == [True, False, True]
    assert ["subgoal" in p.timings_ms for p in plans] == [True, False, True]
    assert ["imagine" in p.timings_ms for p in plans] == [True, False, True]


def test_schedule_rules():
    timer = RefreshSchedule(max_chunks_per_subgoal=3)
    assert not timer.checks_reached and not timer.reached(0.0, 1.0), "the time-out alone"
    schedule = RefreshSchedule(max_chunks_per_subgoal=3, reached_fraction=0.5)
    assert schedule.checks_reached
    assert schedule.subgoal_due(None, False), "nothing planned yet"
    assert schedule.subgoal_due(3, False), "too many chunks"
    assert schedule.subgoal_due(1, True), "the visual target is reached"
    assert not schedule.subgoal_due(1, False)
    assert schedule.reached(0.4, 1.0) and not schedule.reached(0.6, 1.0)
    # by default the slow tiers run at the subgoal's rate: only with a new subgoal
    assert not schedule.visual_due(False) and schedule.visual_due(True)
    assert not schedule.features_due(False) and schedule.features_due(True)
    assert RefreshSchedule(visual="chunk").visual_due(False)
    assert RefreshSchedule(features="chunk").features_due(False)
    with pytest.raises(ValueError, match="visual must be"):
        RefreshSchedule(visual="sometimes")
    with pytest.raises(ValueError, match="features must be"):
        RefreshSchedule(features="never")
    with pytest.raises(ValueError, match="reached_fraction must be in"):
        RefreshSchedule(reached_fraction=1.5)


@pytest.mark.parametrize(
    "switches",
    [{}, {"num_candidates": 1}, {"language_subgoal": False}, {"visual_subgoal": False}],
    ids=["full", "K=1", "no-language", "flat"],
)
def test_reached_means_the_imagined_target_was_reached(tiny_policy_dir, frames, switches):
    """End to end, in every ablation mode: with a world model that imagines exactly the frame
    the robot will see 12 steps on, the subgoal stays while the robot stalls on its first frame,
    is refreshed as soon as the frame it imagined is the one observed, and otherwise times out;
    without the check (the default) the same frame changes nothing before the time-out."""
    schedules = {
        "checked": RefreshSchedule(max_chunks_per_subgoal=4, reached_fraction=0.5),
        "time-out alone": RefreshSchedule(max_chunks_per_subgoal=4),
    }
    future = _obs(frames, 12)
    for name, schedule in schedules.items():
        planner = HybridPlanner.from_pretrained(tiny_policy_dir, schedule=schedule, **switches)
        wm = planner.policy.world_model
        perfect = wm.encode(planner._check(future, INSTRUCTION))  # (1, C, h, w)

        def imagine(current, context, mask, num_candidates, steps, generator=None, perfect=perfect):
            return perfect[:, None].expand(-1, num_candidates, -1, -1, -1)

        wm.imagine = imagine
        stalled = [planner.plan(_obs(frames, 0), INSTRUCTION).subgoal_refreshed for _ in range(5)]
        assert stalled == [True, False, False, False, True], "a stalled robot times out only"
        plan = planner.plan(future, INSTRUCTION)
        if name == "checked":
            assert plan.subgoal_refreshed and plan.target_reached, "the target frame is reached"
            assert not planner.plan(_obs(frames, 0), INSTRUCTION).subgoal_refreshed
        else:
            assert not plan.subgoal_refreshed and not plan.target_reached, name


def test_visual_subgoal_imagined_per_language_subgoal(tiny_policy_dir, frames):
    """visual="subgoal": the world model runs only on the chunks that set a new language subgoal,
    and the action expert reads the same chosen future until the next one."""
    schedule = RefreshSchedule(max_chunks_per_subgoal=2, visual="subgoal", reached_fraction=0.01)
    planner = HybridPlanner.from_pretrained(tiny_policy_dir, num_candidates=2, schedule=schedule)
    plans, visuals = [], []
    for t in range(5):
        plans.append(planner.plan(_obs(frames, t), INSTRUCTION))
        visuals.append(planner.visual_latent)
    refreshed = [plan.subgoal_refreshed for plan in plans]
    assert refreshed == [True, False, True, False, True], "a time-out every 2 chunks"
    assert ["imagine" in plan.timings_ms for plan in plans] == refreshed
    assert visuals[1] is visuals[0] and visuals[3] is visuals[2]
    assert not torch.equal(visuals[2], visuals[0]), "a new subgoal imagines a new future"


@pytest.mark.parametrize("switches", [{}, {"language_subgoal": False}], ids=["full", "no-language"])
def test_vlm_features_computed_per_language_subgoal(tiny_policy_dir, frames, switches):
    """features="subgoal": the VLM runs only on the chunks that set a new subgoal (generating it,
    or the instruction's prefix pass), and the chunks between plan from the same features, which
    the world model and the action expert read: the same actions as a planner that is handed
    those features."""
    schedule = RefreshSchedule(max_chunks_per_subgoal=2, features="subgoal", reached_fraction=0.01)
    planner = HybridPlanner.from_pretrained(tiny_policy_dir, schedule=schedule, **switches)
    plans, features = [], []
    for t in range(5):
        plans.append(planner.plan(_obs(frames, 4 * t), INSTRUCTION))
        features.append(planner.features)
    refreshed = [plan.subgoal_refreshed for plan in plans]
    assert refreshed == [True, False, True, False, True], "a time-out every 2 chunks"
    vlm = [{"subgoal", "features"} & set(plan.timings_ms) != set() for plan in plans]
    assert vlm == refreshed, "the VLM runs with each new subgoal only"
    assert features[1] is features[0] and features[3] is features[2]
    assert not torch.equal(features[2][0], features[0][0]), "a new subgoal, new features"
    # the second chunk, planned again by a per-chunk planner from the first chunk's features
    per_chunk = RefreshSchedule(max_chunks_per_subgoal=2, reached_fraction=0.01)
    fresh = HybridPlanner.from_pretrained(tiny_policy_dir, schedule=per_chunk, **switches)
    fresh.plan(_obs(frames, 0), INSTRUCTION)
    fresh.policy.prefix_features = lambda *args: features[0]
    assert np.array_equal(fresh.plan(_obs(frames, 4), INSTRUCTION).actions, plans[1].actions)


def _lags_read(planner) -> list[int]:
    """The list that collects every `lag` the planner's policy samples actions with."""
    sample, seen = planner.policy.sample_actions, []

    def spy(*args, lag, **kwargs):
        seen.append(lag)
        return sample(*args, lag=lag, **kwargs)

    planner.policy.sample_actions = spy
    return seen


def test_the_action_expert_is_told_the_age_of_the_plan_it_reads(tiny_policy_dir, frames):
    """The planner passes the plan's age in steps (an expert trained with `plan_lag` reads it):
    0 where this chunk made the VLM's features and the visual subgoal anew, and otherwise the
    steps since the frame where the subgoal was set, `execute_steps` per chunk."""
    lags = {}
    for name, visual, features in (
        ("chunk", "chunk", "chunk"),
        ("slow", "subgoal", "subgoal"),
        ("vlm", "chunk", "subgoal"),
        ("visual", "subgoal", "chunk"),
    ):
        schedule = RefreshSchedule(3, visual, 0.01, features)
        planner = HybridPlanner.from_pretrained(tiny_policy_dir, schedule=schedule)
        lags[name] = _lags_read(planner)
        for t in range(5):
            planner.plan(_obs(frames, 4 * t), INSTRUCTION)
    slow = [0, 4, 8, 0, 4]
    assert lags == {"chunk": [0] * 5, "slow": slow, "vlm": slow, "visual": slow}
    flat = HybridPlanner.from_pretrained(
        tiny_policy_dir, schedule=RefreshSchedule(3, "subgoal", 0.01, "chunk"), visual_subgoal=False
    )
    seen = _lags_read(flat)
    for t in range(3):
        flat.plan(_obs(frames, 4 * t), INSTRUCTION)
    assert seen == [0, 0, 0], "a flat expert reads no visual subgoal: its features are fresh"


def test_ablation_modes(tiny_policy_dir, frames):
    flat = HybridPlanner.from_pretrained(tiny_policy_dir, visual_subgoal=False)
    plan = flat.plan(_obs(frames), INSTRUCTION)
    assert plan.actions.shape == (8, 4)
    assert {"encode", "imagine"}.isdisjoint(plan.timings_ms), "no target to check, none imagined"
    checking = RefreshSchedule(reached_fraction=0.5)
    flat = HybridPlanner.from_pretrained(tiny_policy_dir, visual_subgoal=False, schedule=checking)
    first, second = (flat.plan(_obs(frames, t), INSTRUCTION) for t in (0, 1))
    assert "imagine" in first.timings_ms, "a new subgoal still takes a visual target to check"
    assert second.candidate_latents.shape == (0,) and "imagine" not in second.timings_ms
    np.testing.assert_array_equal(first.actions, plan.actions)  # the target is not acted on
    single = HybridPlanner.from_pretrained(tiny_policy_dir, num_candidates=1)
    plan = single.plan(_obs(frames), INSTRUCTION)
    assert plan.scores.shape == (1,) and plan.chosen == 0
    plain = HybridPlanner.from_pretrained(tiny_policy_dir, language_subgoal=False)
    plan = plain.plan(_obs(frames), INSTRUCTION)
    assert plan.subgoal == INSTRUCTION and "subgoal" not in plan.timings_ms
    vla = HybridPlanner.from_pretrained(
        tiny_policy_dir, language_subgoal=False, visual_subgoal=False
    )
    for t in range(3):
        plan = vla.plan(_obs(frames, t), INSTRUCTION)
        assert set(plan.timings_ms) == {"features", "action"}, "the VLA path imagines nothing"
        assert plan.subgoal == INSTRUCTION and plan.candidate_latents.shape == (0,)


def test_candidate_choices():
    """Five futures on a line at 0, 1, 2, 2.2 and 10, the outlier scored best: the value head
    takes the outlier, the medoid the one at 2, the central rule the best-scored of the three
    nearest the others (at 1, 2 and 2.2)."""
    line = torch.tensor([0.0, 1.0, 2.0, 2.2, 10.0])
    candidates = line.reshape(1, 5, 1, 1, 1).expand(2, 5, 2, 2, 2)
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.25, 0.9], [0.1, 0.5, 0.3, 0.25, 0.9]])
    assert choose("value", candidates, scores).tolist() == [4, 4]
    assert choose("medoid", candidates, scores).tolist() == [2, 2]
    assert choose("central", candidates, scores).tolist() == [2, 1]
    with pytest.raises(ValueError, match="unknown candidate choice 'best'"):
        choose("best", candidates, scores)


def test_the_planner_chooses_by_its_rule_among_the_same_candidates(tiny_policy_dir, frames):
    plans = {
        rule: HybridPlanner.from_pretrained(tiny_policy_dir, num_candidates=4, choice=rule).plan(
            _obs(frames), INSTRUCTION
        )
        for rule in ("value", "medoid", "central")
    }
    latents = plans["value"].candidate_latents
    for rule, plan in plans.items():
        np.testing.assert_array_equal(plan.candidate_latents, latents)  # the same imagination
        chosen = choose(rule, torch.from_numpy(latents)[None], torch.from_numpy(plan.scores)[None])
        assert plan.chosen == int(chosen[0]), rule
    apart = np.sqrt(np.square(latents[:, None] - latents[None]).sum((2, 3, 4))).sum(1)
    assert plans["medoid"].chosen == int(apart.argmin())
    with pytest.raises(ValueError, match="choice must be one of"):
        HybridPlanner.from_pretrained(tiny_policy_dir, choice="best")


def _rollout(planner, frames, steps):
    actions, chunks = [], []
    for t in range(steps):
        count = planner.plans
        actions.append(planner.act(_obs(frames, t), INSTRUCTION))
        if planner.plans > count:
            chunks.append(planner.executing)
    return np.stack(actions), chunks


def test_async_planning_keeps_the_committed_actions(tiny_policy_dir, frames):
    """With async_delay d each plan starts when d actions are left and returns them unchanged as
    its first d; the robot runs the chunk's next execute_steps after them, and nothing else."""
    planner = HybridPlanner.from_pretrained(
        tiny_policy_dir, num_candidates=2, execute_steps=4, async_delay=2
    )
    actions, chunks = _rollout(planner, frames, 14)
    first, *rest = chunks
    assert len(chunks) == 4, "4 steps of the first chunk, then 4 of each next: 14 steps, 4 plans"
    np.testing.assert_array_equal(actions[:4], first.actions[:4])
    for i, chunk in enumerate(rest):
        committed = actions[4 * i + 2 : 4 * i + 4]  # what ran while this chunk was planned
        np.testing.assert_array_equal(chunk.actions[:2], committed)
        ran = actions[4 * i + 4 : 4 * i + 8]  # the chunk's own actions (the last one: 2 of 4)
        np.testing.assert_array_equal(ran, chunk.actions[2 : 2 + len(ran)])
    planner.reset()
    again, _ = _rollout(planner, frames, 14)
    np.testing.assert_array_equal(actions, again)


def test_sync_rollouts_are_deterministic_under_the_seed(tiny_policy_dir, frames):
    a, _ = _rollout(HybridPlanner.from_pretrained(tiny_policy_dir, num_candidates=2), frames, 9)
    b, _ = _rollout(HybridPlanner.from_pretrained(tiny_policy_dir, num_candidates=2), frames, 9)
    np.testing.assert_array_equal(a, b)


def test_the_number_of_candidates_leaves_the_action_noise_as_it_was(tiny_policy_dir, frames):
    """Without a visual subgoal the action expert reads no future, but where the refresh rule
    checks targets the world model still imagines each subgoal's: K = 1 and K = 4 must then give
    the same chunks, the action noise drawn apart from imagination's (else the ablation modes
    would be unpaired draws)."""
    checking = RefreshSchedule(reached_fraction=0.5)
    chunks = [
        HybridPlanner.from_pretrained(
            tiny_policy_dir,
            num_candidates=k,
            visual_subgoal=False,
            execute_steps=4,
            schedule=checking,
        ).plan(_obs(frames), INSTRUCTION)
        for k in (1, 4)
    ]
    assert [len(chunk.scores) for chunk in chunks] == [1, 4]  # both imagined the target
    np.testing.assert_array_equal(chunks[0].actions, chunks[1].actions)


def test_compiled_inference_plans_what_the_policy_plans(tiny_policy_dir, frames):
    """`compile` runs the policy's inference API through torch.compile: the same actions, through
    new subgoals, committed actions and the background thread ("eager" traces the graphs without
    generating code, so the numbers must be equal; inductor's are benchmarks/latency.py's)."""
    torch._dynamo.reset()
    options = {"num_candidates": 2, "execute_steps": 4, "async_delay": 2}
    options["schedule"] = RefreshSchedule(max_chunks_per_subgoal=2)
    plain, _ = _rollout(HybridPlanner.from_pretrained(tiny_policy_dir, **options), frames, 14)
    compiled = HybridPlanner.from_pretrained(tiny_policy_dir, compile="eager", **options)
    actions, chunks = _rollout(compiled, frames, 14)
    np.testing.assert_array_equal(actions, plain)
    assert [chunk.subgoal_refreshed for chunk in chunks] == [True, False, True, False]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"


@pytest.mark.parametrize("delay", [-1, 5, 13])
def test_async_delay_out_of_range_is_named(tiny_policy_dir, delay):
    with pytest.raises(ValueError, match=rf"async_delay must be in \[0, 4\].*got {delay}"):
        HybridPlanner.from_pretrained(tiny_policy_dir, execute_steps=4, async_delay=delay)


@pytest.mark.parametrize(
    "images,state,instruction,message",
    [
        (
            {CAMERA: np.zeros((64, 64), np.uint8)},
            None,
            INSTRUCTION,
            r"images\['observation.images.front'\]: expected \(H, W, 3\) uint8, got \(64, 64\)",
        ),
        ({CAMERA: np.zeros((64, 64, 3), np.float32)}, None, INSTRUCTION, r"uint8, got .* float32"),
        (
            {"observation.images.top": np.zeros((64, 64, 3), np.uint8)},
            None,
            INSTRUCTION,
            r"expected camera 'observation.images.front', got \['observation.images.top'\]",
        ),
        (None, np.array([0.0, np.nan, 0.0, 1.0]), INSTRUCTION, r"state: expected finite values"),
        (None, np.array([0.0, 1e39, 0.0, 1.0]), INSTRUCTION, r"state: values beyond float32"),
        (
            {CAMERA: np.zeros((0, 0, 3), np.uint8)},
            None,
            INSTRUCTION,
            r"images\['observation.images.front'\]: expected a non-empty frame, got \(0, 0, 3\)",
        ),
        (None, np.zeros(7), INSTRUCTION, r"state: expected shape \(4,\), got \(7,\)"),
        (None, None, "  ", r"instruction: expected a non-empty string, got '  '"),
    ],
)
def test_bad_input_is_named(planner, frames, images, state, instruction, message):
    good = _obs(frames)
    obs = Observation(images or good.images, good.state if state is None else state)
    with pytest.raises(ValueError, match=message):
        planner.plan(obs, instruction)


def test_unknown_embodiment(tiny_policy_dir):
    with pytest.raises(
        ValueError, match=r"no adapter for embodiment 'ur5'.*this policy offers \['sawyer'\]"
    ):
        HybridPlanner.from_pretrained(tiny_policy_dir, embodiment="ur5")


def test_frames_are_resized_as_in_training(planner, frames):
    """A camera at twice the size, area-averaged back, is the training frame exactly."""
    obs = _obs(frames)
    large = {key: image.repeat(2, axis=0).repeat(2, axis=1) for key, image in obs.images.items()}
    a = planner.plan(Observation(large, obs.state), INSTRUCTION)
    planner.reset()
    b = planner.plan(_obs(frames), INSTRUCTION)
    np.testing.assert_array_equal(a.actions, b.actions)
