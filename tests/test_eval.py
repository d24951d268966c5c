"""`hybrid eval` end to end: a real policy in the real simulator, results and a playable video."""

import json

import av
import numpy as np
import pytest
from PIL import Image


@pytest.mark.slow
def test_eval_one_episode_writes_results_and_a_playable_video(
    tiny_policy_dir, tmp_path, hybrid_cli
):
    run = hybrid_cli(
        "eval", "--policy", tiny_policy_dir, "--tasks", "reach-v3", "--episodes", 1,
        "--max-steps", 20, "--workers", 1, "--out", tmp_path, "--video", "--num-candidates", 2,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "closed-loop evaluation" in run.stdout and "amortised per chunk" in run.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["tasks"]) == {"reach-v3"}
    episode = results["episodes"][0]
    assert 1 <= episode["steps"] <= 20 and isinstance(episode["success"], bool)
    assert results["chunks"] == -(-episode["steps"] // 4), "4 actions of each chunk run"
    # by default the slow tiers run with each new subgoal: the generation gives the VLM's
    # features, no chunk runs the prefix pass alone, and imagination waits for a new subgoal
    assert {"subgoal", "imagine", "action"} <= set(results["latency"])
    assert "features" not in results["latency"]
    schedule = results["config"]["planner"]["schedule"]
    assert schedule["visual"] == schedule["features"] == "subgoal"
    imagined = results["latency"]["imagine"]["runs_per_chunk"]
    assert imagined == results["subgoal_refreshes_per_chunk"] < 1, "imagined per subgoal only"
    # the refresh rule is the time-out alone by default: the frame is encoded only to imagine
    assert results["latency"]["encode"]["runs_per_chunk"] == imagined
    assert results["targets_reached_per_chunk"] is None, "no target was checked"
    with av.open(episode["video"]) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == episode["steps"]
    assert frames[0].shape == (256, 768, 3), "camera | imagined subgoal | text, 256 px each"
    for noise in ("Warning", "Tip", "Traceback"):
        assert noise not in run.stdout + run.stderr, noise
    _nontrivial_png(tmp_path / "success.png", min_side=300)
    sheet = _nontrivial_png(tmp_path / "contact_sheet.png", min_side=256)
    assert sheet.shape[1] == 2 * 768, "two tiles a row, each camera | subgoal | text"


def _nontrivial_png(path, min_side: int) -> np.ndarray:
    """The picture at path, checked to be at least min_side a side and not one flat colour."""
    image = np.asarray(Image.open(path).convert("RGB"))
    assert min(image.shape[:2]) >= min_side, image.shape
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 16, "more than a few colours"
    return image


def test_eval_rejects_a_directory_that_is_no_policy(tmp_path, hybrid_cli):
    run = hybrid_cli("eval", "--policy", tmp_path, "--tasks", "reach-v3", "--out", tmp_path / "out")
    assert run.returncode == 2 and "not a policy directory" in run.stderr


def test_eval_refuses_a_privileged_scene_for_a_policy_that_reads_none(
    tiny_policy_dir, tmp_path, hybrid_cli
):
    run = hybrid_cli(
        "eval", "--policy", tiny_policy_dir, "--tasks", "reach-v3", "--episodes", 1,
        "--workers", 1, "--out", tmp_path, "--privileged-scene",
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert "reads no scene" in run.stderr and "privileged_scene.yaml" in run.stderr
    assert "Traceback" not in run.stderr
