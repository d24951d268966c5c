"""`hybrid collect metaworld` as a user runs it: a subprocess, killed and resumed."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hybrid.data.lerobot_dataset import LeRobotDataset

ENV = {**os.environ, "COLUMNS": "200"}  # rich wraps narrower output


def _collect(*args):
    return [sys.executable, "-m", "hybrid.cli", "collect", "metaworld", *map(str, args)]


def _run_collect(*args) -> subprocess.CompletedProcess:
    return subprocess.run(_collect(*args), capture_output=True, text=True, env=ENV)


def test_unknown_task_lists_valid_ones(tmp_path):
    run = _run_collect("--tasks", "pick-plate-v3", "--out", tmp_path / "d")
    assert run.returncode == 2
    assert run.stderr.startswith("hybrid collect: unknown Meta-World task 'pick-plate-v3'")
    assert "pick-place-v3" in run.stderr and "mt10" in run.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--start-spread", "0.5", "--start-spread must be in [0, 0.2] m, got 0.5"),
        ("--action-noise", "0.75", "--action-noise must be in [0, 0.5] action units, got 0.75"),
        (
            "--max-steps",
            "600",
            "--max-steps must be in [1, 500] (metaworld's own episode limit), got 600",
        ),
    ],
)
def test_collection_option_out_of_range_is_one_line(tmp_path, option, value, message):
    run = _run_collect("--tasks", "reach-v3", "--out", tmp_path / "d", option, value)
    assert run.returncode == 2
    assert run.stderr.strip() == f"hybrid collect: {message}"
    assert not (tmp_path / "d").exists()


def test_a_collection_from_before_the_newer_options_still_counts_as_complete(tmp_path):
    out = tmp_path / "d"
    args = _collect(
        "--tasks", "reach-v3", "--episodes-per-task", 1, "--image-size", 32, "--workers", 1,
        "--out", out,
    )  # fmt: skip
    subprocess.run(args, check=True, capture_output=True, timeout=120)
    done = out / "meta/collection.json"
    record = json.loads(done.read_text())
    for field in ("start_spread", "action_noise", "max_steps"):  # what older versions lack
        del record["config"][field]
    done.write_text(json.dumps(record))
    rerun = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=120)
    assert rerun.returncode == 0 and "already complete" in rerun.stdout, rerun.stderr
    noisy = subprocess.run([*args, "--action-noise", "0.1"], capture_output=True, text=True)
    assert noisy.returncode == 2 and "'action_noise': 0.1" in noisy.stderr


def test_max_steps_ends_an_attempt_that_has_not_succeeded_as_a_failure(tmp_path):
    out = tmp_path / "d"
    args = _collect(
        "--tasks", "push-v3", "--episodes-per-task", 1, "--image-size", 32, "--workers", 1,
        "--max-steps", 6, "--keep-failures", "--out", out,
    )  # fmt: skip
    run = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 0, run.stderr
    ds = LeRobotDataset(out)
    assert [meta["length"] for meta in ds.episodes] == [6]  # no push succeeds in 6 steps
    assert json.loads((out / "meta/collection.json").read_text())["config"]["max_steps"] == 6


@pytest.mark.slow
def test_sigkill_midway_then_rerun_yields_exactly_the_requested_episodes(tmp_path):
    out = tmp_path / "d"
    args = _collect(
        "--tasks",
        "reach-v3",
        "button-press-topdown-v3",
        "--episodes-per-task",
        4,
        "--image-size",
        32,
        "--workers",
        2,
        "--out",
        out,
    )
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while len(list(out.glob(".staging/*/*.npz"))) < 3:
        assert proc.poll() is None, "collection finished before it could be interrupted"
        assert time.monotonic() < deadline, "no episode was staged within 120 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the main process and its simulator workers
    proc.wait()
    assert not (out / "meta/info.json").exists(), "an interrupted collection must not look complete"

    rerun = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    ds = LeRobotDataset(out)
    assert not (out / ".staging").exists()
    assert ds.num_episodes == 8, "two tasks x four episodes, none lost, none duplicated"
    indices = np.concatenate([ds.episode(i)["index"] for i in range(ds.num_episodes)])
    assert np.array_equal(indices, np.arange(ds.info["total_frames"]))
    for i, meta in enumerate(ds.episodes):
        ep = ds.episode(i)
        assert meta["episode_index"] == i
        assert np.array_equal(ep["frame_index"], np.arange(meta["length"]))
        assert ds.camera_frames(i, "observation.images.front").shape[0] == meta["length"]
        assert ep["progress"][-1] == pytest.approx(1.0)
    # Episodes are reproducible: an uninterrupted run gives the very same data.
    clean = tmp_path / "clean"
    args[args.index(str(out))] = str(clean)
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    reference = LeRobotDataset(clean)
    for i in range(ds.num_episodes):
        np.testing.assert_array_equal(ds.episode(i)["action"], reference.episode(i)["action"])

    # The same command once more is a no-op; a different one is refused, naming both.
    again = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=60)
    assert again.returncode == 0 and "already complete" in again.stdout
    args[args.index("4")] = "5"
    refused = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=60)
    assert refused.returncode == 2 and "differs from this run" in refused.stderr


def test_a_bad_task_file_is_one_line_before_anything_runs(tmp_path):
    bad = tmp_path / "my_tasks.yaml"
    bad.write_text("door-close-v3: {instruction: close the door, phases: [{subgoal: a}, {}]}")
    for verb in (
        _collect("--tasks", "door-close-v3", "--task-file", bad, "--out", tmp_path / "d"),
        [sys.executable, "-m", "hybrid.cli", "eval", "--policy", tmp_path / "none"]
        + ["--tasks", "door-close-v3", "--task-file", str(bad)],
    ):
        run = subprocess.run(list(map(str, verb)), capture_output=True, text=True, env=ENV)
        assert run.returncode == 2
        assert run.stderr.count("\n") == 1
        message = f"task file {bad}, task 'door-close-v3', phase 0: only the last phase may lack"
        assert message in run.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_a_task_of_ones_own_is_collected_with_its_language(tmp_path):
    """door-close-v3 is in no table of the package: a user's file adds it, instruction and
    phases, and the dataset carries them."""
    tasks = tmp_path / "my_tasks.yaml"
    tasks.write_text(
        "door-close-v3:\n  instruction: close the door\n  phases:\n"
        "    - subgoal: move the gripper to the outer edge of the door handle\n"
        "      until: [{dist: [hand, object], axes: z, offset: [0.05, 0.12, 0.1], below: 0.04}]\n"
        "    - subgoal: push the door closed\n"
    )
    out = tmp_path / "d"
    args = ("--tasks", "door-close-v3", "--episodes-per-task", "1", "--image-size", "32")
    run = _run_collect(*args, "--workers", "1", "--task-file", tasks, "--out", out)
    assert run.returncode == 0, run.stderr
    episode = LeRobotDataset(out).episode(0)
    assert episode["task"] == "close the door"
    assert episode["subgoal"][0] == "move the gripper to the outer edge of the door handle"
    assert episode["subgoal"][-1] == "push the door closed"


def test_a_collection_is_not_resumed_with_other_task_entries(tmp_path):
    """The episodes' labels come from the task entries; a task file edited between a run and
    its rerun would mix two labellings, so the rerun is refused and names the task."""
    reworded = tmp_path / "my_tasks.yaml"
    reworded.write_text(
        "reach-v3: {instruction: touch the red target, phases: [{subgoal: touch the target}]}"
    )
    out = tmp_path / "d"
    args = ("--tasks", "reach-v3", "push-v3", "--episodes-per-task", "1", "--image-size", "32")
    first = _run_collect(*args, "--workers", "1", "--task-file", reworded, "--out", out)
    assert first.returncode == 0, first.stderr
    rerun = _run_collect(*args, "--workers", "1", "--out", out)
    assert rerun.returncode == 2
    assert rerun.stderr.strip() == (
        f"hybrid collect: the dataset in {out} was labelled with other language entries for "
        f"reach-v3 (a task file edited since?); choose another --out or delete {out}"
    )
