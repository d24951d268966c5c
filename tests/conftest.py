"""Shared fixtures. The session dataset is a real Meta-World collection (every MT10 task, two
attempts each), made once per test session by the same code path as `hybrid collect`."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")

import pytest  # noqa: E402
from rich.console import Console  # noqa: E402

from hybrid.collect import collect_metaworld  # noqa: E402

MT10_EPISODES = 2


@pytest.fixture(scope="session")
def mt10_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "mt10"
    summary = collect_metaworld(
        ["mt10"], MT10_EPISODES, out, image_size=64, workers=2, console=Console(quiet=True)
    )
    return out, summary
