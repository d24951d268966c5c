"""Shared fixtures. The session dataset is a real Meta-World collection (every MT10 task, two
attempts each), made once per test session by the same code path as `hybrid collect`."""

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")

import pytest  # noqa: E402
from rich.console import Console  # noqa: E402

from hybrid.collect import collect  # noqa: E402

MT10_EPISODES = 2
PANDA_EPISODES = 2


@pytest.fixture(scope="session")
def hybrid_cli():
    """`hybrid_cli(*args)` runs `hybrid <args>` in a fresh process and returns the completed
    process, output captured: wide, so rich does not wrap it, and one OpenMP thread."""
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}

    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "hybrid.cli", *map(str, args)],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip

    return run


@pytest.fixture
def print_config(capsys):
    """`print_config(verb, *args)`: the YAML that `hybrid <verb> <args> --print_config` prints,
    run through the command's own `main` in this process (a fresh interpreter would spend 12-15
    s importing). A refused configuration fails the test with the command's one-line error."""
    from hybrid.cli import main

    def run(verb: str, *args) -> str:
        capsys.readouterr()
        try:
            status = main([verb, *map(str, args), "--print_config"])  # refused: 2, one line
        except SystemExit as done:  # --print_config prints, then exits
            status = done.code
        printed = capsys.readouterr()
        assert status in (0, None), printed.err[-2000:]
        return printed.out

    return run


@pytest.fixture(scope="session")
def mt10_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "mt10"
    summary = collect(
        "metaworld",
        ["mt10"],
        MT10_EPISODES,
        out,
        image_size=64,
        workers=2,
        console=Console(quiet=True),
    )
    return out, summary


@pytest.fixture(scope="session")
def panda_dataset(tmp_path_factory):
    """A real panda-gym collection: every task, two attempts each, 64 px."""
    out = tmp_path_factory.mktemp("data") / "panda"
    summary = collect(
        "panda", ["all"], PANDA_EPISODES, out, image_size=64, workers=1, console=Console(quiet=True)
    )
    return out, summary


SMALL_EXPERTS = dict(
    vlm=dict(text_hidden=64, text_layers=2, vision_hidden=32, vision_layers=1),
    world_model=dict(vae_channels=(16, 16, 32, 32), hidden=32, num_layers=1, value_hidden=32),
    action_expert=dict(
        hidden=32,
        num_layers=1,
        max_state_dim=8,
        max_action_dim=8,
        image_size=64,
        keypoints=4,
        keypoint_conditioning=True,  # as the quickstart
        scene_dim=12,
    ),
    fast=dict(vocab_size=128),
)


@pytest.fixture(scope="session")
def tiny_policy_dir(mt10_dataset, tmp_path_factory):
    """A small policy trained for a few steps on the session dataset, saved as `hybrid fit`
    exports it."""
    import torch

    from hybrid.data.datamodule import HybridDataModule
    from hybrid.policy import HybridPolicy
    from hybrid.sim.metaworld import EMBODIMENT

    torch.manual_seed(0)
    dm = HybridDataModule(str(mt10_dataset[0]), chunk_size=8, future_offset=8, batch_size=16)
    dm.setup("fit")
    spec = type(EMBODIMENT)(**{**EMBODIMENT.to_dict(), "cameras": dm.cameras})
    policy = HybridPolicy.create(
        dm.train_set.texts(),
        dm.train_set.action_chunks(),
        [spec],
        {spec.name: dm.norm_stats()},
        **SMALL_EXPERTS,
    )
    optimiser = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for _, batch in zip(range(10), dm.train_dataloader(), strict=False):
        loss = sum(policy.losses(batch, visual_dropout=0.2, language_dropout=0.2).values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    directory = tmp_path_factory.mktemp("policy") / "policy"
    policy.save_pretrained(directory)
    return directory
