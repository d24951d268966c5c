"""`hybrid fit` as a user runs it: config printing, a SIGKILL and a resume, DDP on two CPUs."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
SMALL = {
    "vlm": {"text_hidden": 64, "text_layers": 2, "vision_hidden": 32, "vision_layers": 1},
    "world_model": {"vae_channels": [16, 16, 32, 32], "hidden": 32, "num_layers": 1},
    "action_expert": {
        "hidden": 32,
        "num_layers": 1,
        "max_state_dim": 8,
        "max_action_dim": 8,
        "image_size": 64,
    },
    "fast": {"vocab_size": 128},
}


def _config(tmp_path, dataset, **trainer):
    config = {
        "model": {"experts": SMALL, "warmup_steps": 2, "export_dir": str(tmp_path / "policy")},
        "data": {
            "root": str(dataset),
            "chunk_size": 8,
            "future_offset": 8,
            "batch_size": 8,
            "image_size": "${model.experts.world_model.image_size}",
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 6,
            # not 1: `hybrid fit` reads it as 1.0, which Lightning takes for every batch
            "limit_val_batches": 2,
            "val_check_interval": 3,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "out"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "out")},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(tmp_path / "ckpt"),
                        "save_last": True,
                        "every_n_train_steps": 1,
                        "save_top_k": -1,
                    },
                }
            ],
            **trainer,
        },
    }
    config["model"]["experts"]["world_model"]["image_size"] = 64
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _hybrid(*args, **kwargs):
    return [sys.executable, "-m", "hybrid.cli", *map(str, args)]


def test_print_config_round_trips_with_interpolation_resolved(tmp_path, mt10_dataset, print_config):
    first = print_config("fit", "--config", _config(tmp_path, mt10_dataset[0]))
    printed = yaml.safe_load(first)
    assert printed["data"]["image_size"] == 64, "omegaconf interpolation is resolved"
    assert printed["model"]["experts"]["vlm"]["text_hidden"] == 64
    (tmp_path / "printed.yaml").write_text(first)
    assert print_config("fit", "--config", tmp_path / "printed.yaml") == first


def _global_step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_uninterrupted_step_count(tmp_path, mt10_dataset):
    config = _config(tmp_path, mt10_dataset[0], max_steps=10)
    proc = subprocess.Popen(
        _hybrid("fit", "--config", config),
        env=ENV,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not list((tmp_path / "ckpt").glob("*step=4*.ckpt")):
        assert proc.poll() is None, "fit ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint at step 4 within 240 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _global_step(tmp_path / "ckpt" / "last.ckpt")  # may lag the step-4 file by one
    assert 3 <= killed_at < 10 and not (tmp_path / "policy").exists()
    resumed = subprocess.run(
        _hybrid("fit", "--config", config, "--ckpt_path", "last"),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert _global_step(tmp_path / "ckpt" / "last.ckpt") == 10, "same count as an unbroken run"
    assert (tmp_path / "policy" / "policy_config.json").exists()
    # Every checkpoint on disk is whole: an interrupted save never leaves a torn file.
    for path in (tmp_path / "ckpt").glob("*.ckpt"):
        _global_step(path)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path, mt10_dataset):
    config = _config(
        tmp_path, mt10_dataset[0], max_steps=2, devices=2, strategy="ddp", limit_val_batches=0
    )
    run = subprocess.run(
        _hybrid("fit", "--config", config), capture_output=True, text=True, env=ENV, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert _global_step(tmp_path / "ckpt" / "last.ckpt") == 2
    assert (tmp_path / "policy" / "policy_config.json").exists()
