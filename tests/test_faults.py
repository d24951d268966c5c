"""The fault suite: each test breaks a copy of a real policy, dataset or run, then runs the real
command or API and checks that it ends at once, non-zero, with one line naming the file or value,
and that nothing on disk was lost. (A corrupt LoRA adapter is in `test_finetune.py`, beside the
fixture that trains one.)"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from test_fit_cli import _config

from hybrid.data.datamodule import HybridDataModule
from hybrid.data.lerobot_dataset import DatasetError
from hybrid.policy import HybridPolicy
from hybrid.types import Observation
from planners.hierarchical import HybridPlanner

ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
INSTRUCTION = "reach the goal"


def _hybrid(*args, timeout=120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "hybrid.cli", *map(str, args)],
        capture_output=True, text=True, env=ENV, timeout=timeout,
    )  # fmt: skip
    return run, time.monotonic() - start


def _one_line_error(run: subprocess.CompletedProcess, verb: str) -> str:
    """The run failed with exit status 2, its error in one line, `hybrid <verb>: ...`, the last
    on stderr (Lightning's own start-up lines may come before it), and no traceback."""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    errors = [line for line in lines if line.startswith("hybrid ")]
    assert errors == lines[-1:] and errors[0].startswith(f"hybrid {verb}: "), run.stderr[-2000:]
    assert "Traceback" not in run.stdout + run.stderr
    return errors[0]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def policy_copy(tiny_policy_dir, tmp_path):
    copy = tmp_path / "policy"
    shutil.copytree(tiny_policy_dir, copy)
    return copy


# 1. evaluation workers fail fast ---------------------------------------------------------------
@pytest.mark.parametrize(
    "break_it,named",
    [
        (lambda p: _truncate(p / "vlm" / "backbone" / "model.safetensors"), "model.safetensors"),
        (
            lambda p: (p / "action_expert" / "diffusion_pytorch_model.safetensors").write_bytes(
                os.urandom(4096)
            ),
            "diffusion_pytorch_model.safetensors",
        ),
        (lambda p: (p / "action_expert" / "config.json").unlink(), "action_expert"),
        (lambda p: (p / "policy_config.json").write_text("{"), "policy_config.json"),
    ],
    ids=[
        "truncated-vlm-weights",
        "random-action-weights",
        "missing-action-expert-config",
        "invalid-policy-config",
    ],
)
def test_eval_of_a_policy_that_does_not_load_fails_at_once(policy_copy, tmp_path, break_it, named):
    break_it(policy_copy)
    run, seconds = _hybrid(
        "eval", "--policy", policy_copy, "--tasks", "reach-v3", "--episodes", 2, "--workers", 2,
        "--out", tmp_path / "eval",
    )  # fmt: skip
    line = _one_line_error(run, "eval")
    assert named in line and str(policy_copy) in line and "re-export" in line
    assert seconds < 30


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_reported_and_its_episodes_not_counted(
    tiny_policy_dir, tmp_path
):
    out = tmp_path / "eval"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybrid.cli", "eval", "--policy", str(tiny_policy_dir), "--tasks",
         "reach-v3", "--episodes", "4", "--workers", "2", "--max-steps", "200", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    workers = []
    while len(workers) < 2:  # the pool's two workers (a spawn start also runs a tracker)
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        workers = [c for c in _children(proc.pid) if b"spawn_main" in _cmdline(c)]
        time.sleep(0.2)
    time.sleep(3)  # inside their episodes
    os.kill(workers[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=60)
    run = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    line = _one_line_error(run, "eval")
    assert "worker died" in line and "not run" in line
    results = json.loads((out / "results.json").read_text())
    assert results["not_run"] and results["episodes_total"] + len(results["not_run"]) == 4
    assert "worker died" in results["error"]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# 2. resume never silently starts over --------------------------------------------------------
def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_resume_starts_fresh_saves_its_end_and_resumes_from_the_newest(tmp_path, mt10_dataset):
    ckpt = tmp_path / "ckpt"
    config = yaml.safe_load(_config(tmp_path, mt10_dataset[0], max_steps=5).read_text())
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
    config["trainer"]["val_check_interval"] = 5
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    # no checkpoint at all: a fresh start, said in one line, not Lightning's warning
    fit = ("fit", "--config", tmp_path / "config.yaml", "--ckpt_path", "last")
    run, _ = _hybrid(*fit, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"no checkpoint in {ckpt}: training starts from step 0" in run.stderr
    assert "no last checkpoint available" not in run.stdout + run.stderr
    # a quiet console: Lightning's info lines stay, save the accelerators it found
    for noise in ("Warning", "Tip", "Traceback", "GPU available", "TPU available"):
        assert noise not in run.stdout + run.stderr, noise
    curves = np.asarray(Image.open(tmp_path / "out" / "curves.png").convert("RGB"))
    assert min(curves.shape[:2]) > 200 and len(np.unique(curves.reshape(-1, 3), axis=0)) > 16
    # the end of a run is saved although 5 is no multiple of the period 2
    assert _step(ckpt / "last.ckpt") == 5
    # killed after the step-4 checkpoint but before last.ckpt: resume from step 4, not from 0
    (ckpt / "last.ckpt").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in ckpt.glob("*.ckpt")}
    assert sorted(kept) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    run, _ = _hybrid(*fit, "--trainer.max_steps", 7, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"resuming from {ckpt / 'epoch=0-step=4.ckpt'}" in run.stderr
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.glob("*step=[24].ckpt")} == kept
    assert sorted(p.name for p in ckpt.glob("*.ckpt")) == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=4.ckpt",
        "epoch=0-step=6.ckpt",
        "last.ckpt",
    ], "steps 2 and 4 were not trained again"
    assert _step(ckpt / "last.ckpt") == 7


# 3. planner inputs are bounded, outputs never NaN ----------------------------------------------
@pytest.fixture(scope="module")
def obs(tiny_policy_dir):
    images = {f"observation.images.{c}": np.zeros((64, 64, 3), np.uint8) for c in ("front", "side")}
    return Observation(images, np.array([0.0, 0.6, 0.2, 1.0]))


def test_an_instruction_longer_than_the_vlm_context_is_refused(tiny_policy_dir, obs):
    planner = HybridPlanner.from_pretrained(tiny_policy_dir, num_candidates=1)
    with pytest.raises(ValueError, match=r"instruction: \d+ tokens \(10000 characters\).*shorten"):
        planner.plan(obs, "reach " * 1666 + "up!!")


def test_a_state_far_outside_the_training_data_is_refused(tiny_policy_dir, obs):
    planner = HybridPlanner.from_pretrained(tiny_policy_dir, num_candidates=1)
    far = Observation(obs.images, np.array([1e6, 0.6, 0.2, 1.0]))
    with pytest.raises(ValueError, match=r"state: .* normalised units .* \(bound 10000\)"):
        planner.plan(far, INSTRUCTION)


def test_a_non_finite_action_chunk_names_the_tier(policy_copy, obs):
    weights = policy_copy / "action_expert" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, weights)
    planner = HybridPlanner.from_pretrained(policy_copy, num_candidates=1)
    with pytest.raises(FloatingPointError, match="the action expert produced non-finite values"):
        planner.plan(obs, INSTRUCTION)


# 4. every load names its file ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["policy_config.json", "fast/fast_config.json", "vlm/config.json"])
def test_invalid_json_in_a_policy_is_named(policy_copy, name):
    (policy_copy / name).write_text('{"embodiments": [')
    with pytest.raises(ValueError, match=rf"cannot read {policy_copy / name} .*re-export"):
        HybridPolicy.from_pretrained(policy_copy)


def test_a_corrupt_video_names_the_file_and_the_episode(mt10_dataset, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(mt10_dataset[0], copy)
    video = sorted(copy.glob("videos/**/*.mp4"))[0]
    _truncate(video)
    with pytest.raises(DatasetError, match=rf"{video}.*recollect"):
        HybridDataModule(str(copy), image_size=64).setup("fit")
    assert mt10_dataset[0].exists() and video.exists(), "the copy is broken, nothing is removed"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data.batch_size", "-4"], "data.batch_size must be >= 1, got -4"),
        (["--model.lr", "0"], "model.lr must be > 0, got 0"),
        (["--data.root", "nowhere"], "dataset directory nowhere does not exist"),
        (["--model.nope", "1"], "unrecognized arguments: --model.nope 1"),
    ],
    ids=["negative-batch-size", "zero-lr", "missing-dataset", "unknown-config-key"],
)
def test_bad_training_arguments_are_one_line_before_anything_is_built(
    tmp_path, mt10_dataset, args, message
):
    config = _config(tmp_path, mt10_dataset[0])
    run, seconds = _hybrid("fit", "--config", config, *args)
    assert message in _one_line_error(run, "fit")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()
