import numpy as np
import pytest

from hybrid.sim.episode import record_rollout
from hybrid.sim.metaworld import (
    PRESETS,
    TASKS_ENV,
    MetaWorldEnv,
    PhaseTracker,
    TaskLanguage,
    expert_for,
    policy_state,
    resolve_tasks,
    rollout_expert,
    scene_state,
    task_language,
)

DOOR_CLOSE = """
door-close-v3:
  instruction: close the door
  phases:
    - subgoal: move the gripper to the outer edge of the door handle
      until:
        - {dist: [hand, object], axes: z, offset: [0.05, 0.12, 0.1], below: 0.04}
    - subgoal: push the door closed
reach-v3:
  instruction: touch the red target
  phases:
    - subgoal: move the gripper to the red target
"""


@pytest.fixture
def task_file(tmp_path, monkeypatch):
    """Writes a user's task file and names it in $HYBRID_METAWORLD_TASKS (the table re-read)."""

    def write(text: str, name: str = "my_tasks.yaml"):
        path = tmp_path / name
        path.write_text(text)
        monkeypatch.setenv(TASKS_ENV, str(path))
        task_language.cache_clear()
        return path

    yield write
    task_language.cache_clear()  # read again with the variable monkeypatch restores


def test_every_task_has_language_and_a_scripted_expert():
    table = task_language()
    assert set(PRESETS["mt10"]) <= set(table)
    for task, language in table.items():
        expert_for(task)  # Meta-World's scripted policy for it; a KeyError where it has none
        assert language.instruction and all(language.subgoals)
        assert len(language.until) == len(language.subgoals)
        assert not language.until[-1], f"{task}: the last phase must have no end condition"
        assert all(language.until[:-1]), f"{task}: every other phase needs an end condition"


def test_resolve_tasks_expands_presets_and_rejects_unknown_names():
    assert resolve_tasks(["mt10"]) == list(PRESETS["mt10"])
    assert resolve_tasks(["reach-v3", "mt10"])[0] == "reach-v3"
    assert len(resolve_tasks(["reach-v3", "mt10"])) == 10
    with pytest.raises(ValueError, match="'pick-plate-v3'.*valid tasks: .*pick-place-v3"):
        resolve_tasks(["pick-plate-v3"])


def test_a_task_file_adds_tasks_and_rewords_the_packages(task_file):
    task_file(DOOR_CLOSE)
    assert resolve_tasks(["door-close-v3", "push-v3"]) == ["door-close-v3", "push-v3"]
    table = task_language()
    assert table["door-close-v3"].subgoals[-1] == "push the door closed"
    assert table["reach-v3"].instruction == "touch the red target"
    assert table["push-v3"].instruction == "push the puck to the goal"  # the package's


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("door-close-v3: [", "not YAML"),
        ("- door-close-v3", "expected task names mapped to entries"),
        ("door-close-v3: {phases: [{subgoal: push}]}", "expected `instruction: <sentence>`"),
        ("door-close-v3: {instruction: close, phases: []}", "expected `phases`"),
        (
            "door-close-v3: {instruction: close, phases: [{subgoal: a}, {subgoal: b}]}",
            "phase 0: only the last phase may lack `until`",
        ),
        (
            "door-close-v3: {instruction: close, phases: [{subgoal: a, until: "
            "[{dist: [hand, handle], axes: z, below: 0.04}]}, {subgoal: b}]}",
            "expected two of hand, object, goal",
        ),
        (
            "door-close-v3: {instruction: close, phases: [{subgoal: a, until: "
            "[{near: [hand, object]}]}, {subgoal: b}]}",
            "expected one of dist, diff or gripper_below",
        ),
        (
            "door-close-v3: {instruction: close, phases: [{subgoal: a, until: "
            "[{diff: [hand, object], axis: xy, below: 0.0}]}, {subgoal: b}]}",
            "axis from xyz",
        ),
    ],
)
def test_a_bad_task_file_is_named_with_its_mistake(task_file, text, message):
    path = task_file(text)
    with pytest.raises(ValueError, match=f"task file {path}.*{message}"):
        task_language()


def test_a_missing_task_file_or_a_task_meta_world_lacks_is_refused(
    task_file, tmp_path, monkeypatch
):
    task_file("open-window-v9: {instruction: open it, phases: [{subgoal: open it}]}")
    with pytest.raises(ValueError, match="'open-window-v9' has a language entry but is no Meta"):
        resolve_tasks(["open-window-v9"])
    monkeypatch.setenv(TASKS_ENV, str(tmp_path / "none.yaml"))
    task_language.cache_clear()
    with pytest.raises(OSError, match="task file .*none.yaml"):
        task_language()


def test_unknown_task_names_the_task_file_as_the_way_to_add_one():
    with pytest.raises(ValueError, match="a task of your own: an entry in a --task-file"):
        resolve_tasks(["door-close-v3"])


def _obs(hand, gripper=1.0, obj=(0.0, 0.7, 0.02), goal=(0.1, 0.8, 0.2)):
    obs = np.zeros(39)
    obs[0:3], obs[3], obs[4:7], obs[36:39] = hand, gripper, obj, goal
    return obs


def test_phase_tracker_moves_forward_only():
    language = TaskLanguage(
        instruction="pick",
        subgoals=("above", "down", "grasp", "carry"),
        until=(
            ({"dist": ["hand", "object"], "axes": "xy", "below": 0.02},),
            ({"dist": ["hand", "object"], "axes": "z", "below": 0.05},),
            ({"gripper_below": 0.7},),
            (),
        ),
    )
    tracker = PhaseTracker(language)
    assert tracker.update(_obs(hand=(0.2, 0.5, 0.2))) == 0
    assert tracker.update(_obs(hand=(0.0, 0.7, 0.2))) == 1
    # The hand drifts off the puck again: the label does not go back.
    assert tracker.update(_obs(hand=(0.2, 0.5, 0.2))) == 1
    # Several conditions holding at once skip straight through.
    assert tracker.update(_obs(hand=(0.0, 0.7, 0.03), gripper=0.5)) == 3


def test_unknown_camera_is_rejected():
    with pytest.raises(ValueError, match="'back'.*front, side, top, corner"):
        MetaWorldEnv("reach-v3", camera="back")
    with pytest.raises(ValueError, match=r"re-pose the stock \['corner2'\]"):
        MetaWorldEnv("reach-v3", camera=("front", "corner2"))


def test_each_seed_draws_its_own_placement():
    """Placements come from the whole random-reset space, not MT1's list of 50, where 20 seeds
    would share about 4 placements."""
    env = MetaWorldEnv("push-v3", camera="corner", image_size=32)
    try:
        placements = [env.reset(seed)[[4, 5, 36, 37]] for seed in range(30)]
        again = env.reset(7)[[4, 5, 36, 37]]
    finally:
        env.close()
    assert len({tuple(p.round(4)) for p in placements}) == 30
    np.testing.assert_array_equal(again, placements[7])


def test_start_spread_moves_only_the_hand_and_the_expert_still_succeeds():
    env = MetaWorldEnv("push-v3", camera="corner", image_size=32)
    try:
        still = [env.reset(seed) for seed in range(6)]
        spread = [env.reset(seed, start_spread=0.1) for seed in range(6)]
        again = env.reset(4, start_spread=0.1)
        episode = rollout_expert(env, seed=2, start_spread=0.1)
    finally:
        env.close()
    for a, b in zip(still, spread, strict=True):
        np.testing.assert_allclose(a[4:7], b[4:7], atol=1e-3)  # the same placement
        np.testing.assert_allclose(a[36:39], b[36:39], atol=1e-4)
    offsets = np.stack([b[:3] - a[:3] for a, b in zip(still, spread, strict=True)])
    assert np.abs(offsets[:, :2]).max() < 0.11 and np.abs(offsets[:, 2]).max() < 0.06
    assert np.linalg.norm(offsets, axis=1).min() > 0.005, "every start moved"
    assert len({tuple(o.round(3)) for o in offsets}) == 6, "each seed its own start"
    np.testing.assert_array_equal(again, spread[4])
    assert episode.success and np.abs(episode.state[0, :3] - still[2][:3]).max() > 0.005


# the expert is called here as `rollout_expert` calls it, which filters the same warning
@pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")
def test_action_noise_perturbs_what_runs_and_stores_the_experts_labels():
    env = MetaWorldEnv("push-v3", camera="corner", image_size=32)
    executed, labels = [], []
    step = env.step
    expert = expert_for("push-v3")

    def observed_step(action):  # the env as it is, and what it was asked to execute
        executed.append(np.array(action))
        return step(action)

    env.step = observed_step

    def act(obs):
        labels.append(np.clip(expert.get_action(obs), -1, 1).astype(np.float32))
        return labels[-1], 0

    try:
        runs = []
        for _ in range(2):
            executed.clear()
            labels.clear()
            episode = record_rollout(env, 3, act, policy_state, scene_state, 300, action_noise=0.1)
            runs.append((episode, np.stack(executed), np.stack(labels)))
        clean = rollout_expert(env, seed=3)
    finally:
        env.close()
    (episode, ran, stored), (again, ran_again, _) = runs
    assert episode.success, "the expert's labels bring the hand back to its path"
    np.testing.assert_array_equal(episode.actions, stored)  # labels stored, not what ran
    np.testing.assert_array_equal(ran, ran_again)  # the noise is drawn from the seed
    noise = ran - stored
    assert np.abs(ran).max() <= 1.0 and not noise[:, 3].any(), "the gripper is never perturbed"
    assert 0.05 < noise[:, :3].std() < 0.15
    assert not np.allclose(episode.state[: len(clean.state)][10:20], clean.state[10:20], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(set(task_language()) - set(PRESETS["mt10"])))
def test_task_entries_beyond_mt10_label_their_expert_phases(task):
    """Every entry beyond MT10, a user's added ones included: the scripted expert succeeds, and
    the phase conditions, written from its code, carry the label forward to the last phase,
    never back."""
    env = MetaWorldEnv(task, camera="front", image_size=32)
    try:
        episode = rollout_expert(env, seed=0)
    finally:
        env.close()
    assert episode.success
    phases = episode.phases
    assert phases[0] == 0 and (np.diff(phases) >= 0).all()
    assert phases[-1] == len(task_language()[task].subgoals) - 1, np.unique(phases)


@pytest.mark.slow
def test_the_recorded_scene_is_the_simulators_not_what_the_expert_wrote_into_it():
    """door-open-v3's scripted expert writes its own target into the observation it reads (the
    handle's x, 5 cm off); the scene and the phase must still come from the simulator's."""
    env = MetaWorldEnv("door-open-v3", camera="front", image_size=32)
    try:
        start = scene_state(env.reset(3))
        episode = rollout_expert(env, seed=3, max_steps=2)
    finally:
        env.close()
    np.testing.assert_array_equal(episode.scene[0], start)


@pytest.mark.slow
def test_expert_rollout_is_reproducible_and_rendered():
    env = MetaWorldEnv("pick-place-v3", camera="corner", image_size=48)
    try:
        a, b = rollout_expert(env, seed=4), rollout_expert(env, seed=4)
        c = rollout_expert(env, seed=5)
    finally:
        env.close()
    images = a.images["corner"]
    assert a.success and len(a.phases) == len(images) == len(a.actions) == len(a.state)
    np.testing.assert_array_equal(a.actions, b.actions)
    np.testing.assert_array_equal(images, b.images["corner"])
    assert not np.array_equal(images[0], c.images["corner"][0]), "another configuration"
    assert images.shape[1:] == (48, 48, 3) and images.dtype == np.uint8
    assert np.abs(a.actions).max() <= 1.0
    assert list(np.unique(a.phases)) == [0, 1, 2, 3]
    # the scene: the puck where the episode starts it, carried off by the end; the goal fixed
    assert a.scene.shape == (len(a.phases), 9)
    env = MetaWorldEnv("pick-place-v3", camera="corner", image_size=48)
    try:
        obs = env.reset(seed=4)
    finally:
        env.close()
    np.testing.assert_allclose(a.scene[0, :3], obs[4:7], atol=1e-6)
    np.testing.assert_allclose(a.scene[:, 6:], np.repeat(obs[None, 36:39], len(a.scene), 0))
    # rows are observations before each action, so the last one is one step short of success
    start, end = (np.linalg.norm(a.scene[i, :3] - a.scene[i, 6:]) for i in (0, -1))
    assert end < 0.1 < start, f"the puck is carried to the goal: {start:.3f} m -> {end:.3f} m"


def _pixels_of(env: MetaWorldEnv, camera: str, size: int) -> tuple[int, int]:
    """Pixels the task's object (body `obj` and the bodies under it, as coffee-push's `mug`)
    and its goal marker (site `goal`) cover in `camera` at `size` px, from MuJoCo's
    segmentation rendering."""
    import mujoco

    model, data = env.env.unwrapped.model, env.env.unwrapped.data
    renderer = mujoco.Renderer(model, size, size)
    renderer.enable_segmentation_rendering()
    renderer.update_scene(data, camera=env.mujoco_camera(camera))
    ids, types = np.moveaxis(renderer.render(), -1, 0)
    renderer.close()
    bodies = {mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, "obj")}
    for b in range(model.nbody):  # parents come before their children
        if model.body_parentid[b] in bodies:
            bodies.add(b)
    geoms = [g for g in range(model.ngeom) if model.geom_bodyid[g] in bodies]
    site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "goal")
    obj = np.isin(ids, geoms) & (types == mujoco.mjtObj.mjOBJ_GEOM)
    goal = (ids == site) & (types == mujoco.mjtObj.mjOBJ_SITE)
    return int(obj.sum()), int(goal.sum())


@pytest.mark.slow
@pytest.mark.parametrize("task", ["push-v3", "pick-place-v3"])
def test_the_default_camera_sees_the_object_and_its_goal(task):
    """At 64 px, the placed `front` camera shows the puck and the goal marker over many pixels,
    where Meta-World's stock `corner` view gives them a few; `side` sees them too."""
    counts = {}
    for cameras in (("front", "side"), ("corner",)):
        env = MetaWorldEnv(task, camera=cameras, image_size=64)
        try:
            env.reset(seed=5)
            frames = env.render()
            counts |= {camera: _pixels_of(env, camera, 64) for camera in cameras}
        finally:
            env.close()
        assert list(frames) == list(cameras)
        assert all(f.shape == (64, 64, 3) and f.any() for f in frames.values())
    assert min(counts["front"]) >= 9 and min(counts["side"]) >= 5, counts
    assert max(counts["corner"]) <= 5, counts


@pytest.mark.slow
def test_the_top_camera_sees_over_the_coffee_machine():
    """`top` looks down over the coffee machine at the mug that it hides from `front`."""
    env = MetaWorldEnv("coffee-push-v3", camera=("front", "top"), image_size=64)
    try:
        for seed in (5, 6):
            env.reset(seed=seed)
            front, top = (_pixels_of(env, camera, 64)[0] for camera in ("front", "top"))
            assert front == 0 and top >= 8, (front, top)
    finally:
        env.close()


@pytest.mark.parametrize("task", ["reach-v3", "push-v3"])
def test_the_first_frame_shows_the_goal_where_the_observation_has_it(task):
    """Meta-World sets the goal marker after its last forward pass: without one more, the frame
    rendered at reset drew the marker where an earlier draw had put it, centimetres off."""
    import mujoco

    env = MetaWorldEnv(task, camera="front", image_size=32)
    try:
        model, data = env.env.unwrapped.model, env.env.unwrapped.data
        goal = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "goal")
        for seed in (5, 6):
            obs = env.reset(seed)
            # the renderer draws the marker at data.site_xpos
            np.testing.assert_allclose(data.site_xpos[goal], obs[36:39], atol=1e-6)
    finally:
        env.close()
