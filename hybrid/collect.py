"""`hybrid collect <simulator>`: scripted-expert demonstrations written as a LeRobot v3 dataset.

Collection is resumable. Each attempted episode is first staged on its own, atomically, under
`<out>/.staging/`; a rerun of the same command skips what is staged. Only when every attempt is
staged is the LeRobot v3 dataset written, with `meta/info.json` last, so a reader never sees a
partial or duplicated episode. The staging folder is removed once the dataset is complete.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
import zlib
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from hybrid.data.lerobot_writer import EpisodeData, LeRobotWriter, dataset_size_bytes
from hybrid.saved_files import write_json
from hybrid.sim import camera_names, simulator

COLLECTION_FILE = "meta/collection.json"


@dataclass(frozen=True)
class CollectConfig:
    """What a collection run produces; a rerun must ask for the same to resume."""

    simulator: str
    tasks: tuple[str, ...]
    episodes_per_task: int
    image_size: int
    cameras: tuple[str, ...]
    seed: int
    keep_failures: bool
    start_spread: float = 0.0
    action_noise: float = 0.0
    max_steps: int | None = None  # None: the simulator's own episode limit
    # each task's language entry (instruction, subgoals, phase ends) that labels its episodes:
    # a task file edited between a run and its resumption would mix two labellings
    language: dict | None = None


def _check_same_config(stored: dict, config: dict, where: str, fix: str) -> None:
    """Refuse to add to a collection made with another config, naming what differs; a field
    added to `CollectConfig` after it was written reads as its default (older collections lack
    it), and a collection from before `language` was recorded (None) is not checked for it."""
    defaults = {f.name: f.default for f in fields(CollectConfig) if f.default is not MISSING}
    stored = {**defaults, **stored}
    stored_language, language = stored.pop("language"), config["language"]
    plain = {k: v for k, v in config.items() if k != "language"}
    if stored != plain:
        raise ValueError(
            f"{where} was collected with {stored}, which differs from this run's {plain}; {fix}"
        )
    if stored_language is not None and stored_language != language:
        tasks = [t for t in config["tasks"] if stored_language.get(t) != language[t]]
        raise ValueError(
            f"{where} was labelled with other language entries for {', '.join(tasks)} (a task "
            f"file edited since?); {fix}"
        )


def episode_seed(seed: int, task: str, attempt: int) -> int:
    """A reproducible seed per (run seed, task, attempt), independent of the worker that runs it."""
    return int(
        np.random.SeedSequence([seed, zlib.crc32(task.encode()), attempt]).generate_state(1)[0]
    )


def _staged_path(staging: Path, task: str, attempt: int) -> Path:
    return staging / task / f"{attempt:05d}.npz"


_worker_env = None  # the simulator env of this worker process, reused across its attempts


def _run_attempt(job: tuple[str, int, str, CollectConfig]) -> tuple[str, bool, int, float]:
    """Worker: roll out one attempt and stage it atomically. Returns (task, success, frames, s)."""
    global _worker_env
    task, attempt, staging, config = job
    start = time.perf_counter()
    sim = simulator(config.simulator)
    if _worker_env is None or _worker_env.task != task:
        if _worker_env is not None:
            _worker_env.close()
        _worker_env = sim.make_env(task, config.cameras, config.image_size, config.seed)
    options = {"action_noise": config.action_noise}
    if config.max_steps is not None:
        options["max_steps"] = config.max_steps
    if config.start_spread:  # Meta-World's alone: panda draws each start pose already
        options["start_spread"] = config.start_spread
    episode = sim.rollout_expert(_worker_env, episode_seed(config.seed, task, attempt), **options)
    path = _staged_path(Path(staging), task, attempt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    keep = episode.success or config.keep_failures
    arrays = {"success": np.asarray(episode.success), "length": np.asarray(len(episode.phases))}
    if keep:  # a failed attempt is staged without its frames, only to count it as attempted
        arrays |= {f"images.{camera}": frames for camera, frames in episode.images.items()}
        arrays |= {"state": episode.state, "actions": episode.actions, "scene": episode.scene}
        arrays |= {"phases": episode.phases, "seed": np.asarray(episode.seed)}
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return task, episode.success, len(episode.phases), time.perf_counter() - start


def _to_episode_data(
    sim, task: str, staged: dict[str, np.ndarray], cameras: tuple[str, ...]
) -> EpisodeData:
    language = sim.task_language()[task]
    length = int(staged["length"])
    subgoals = np.asarray(language.subgoals, dtype=object)[staged["phases"]]
    progress = np.arange(length, dtype=np.float32) / max(length - 1, 1)
    return EpisodeData(
        task=language.instruction,
        frames={
            "observation.state": staged["state"],
            "observation.environment_state": staged["scene"],
            "action": staged["actions"],
            "subgoal": subgoals,
            "progress": progress,
        },
        videos={f"observation.images.{camera}": staged[f"images.{camera}"] for camera in cameras},
    )


def collect(
    simulator_name: str,
    tasks: list[str],
    episodes_per_task: int,
    out: Path,
    image_size: int = 96,
    camera: str | list[str] | None = None,
    seed: int = 0,
    workers: int = 2,
    keep_failures: bool = False,
    console: Console | None = None,
    start_spread: float = 0.0,
    action_noise: float = 0.0,
    max_steps: int | None = None,
) -> dict:
    """Collect (or resume collecting) demonstrations of `simulator_name` (`metaworld`, `panda`);
    returns the summary that was printed. `camera` is one camera or several; None is the
    simulator's default cameras. `action_noise` (`hybrid.sim.episode.record_rollout`) perturbs
    what the expert executes, never what is stored. `max_steps` ends an attempt that has not
    succeeded by then (a failure; kept only with `keep_failures`); None: the simulator's own
    limit (`MAX_EPISODE_STEPS`)."""
    console = console or Console()
    sim = simulator(simulator_name)
    cameras = camera_names(camera or sim.DEFAULT_CAMERAS, sim.CAMERAS, simulator_name)
    if episodes_per_task < 1:
        raise ValueError(f"--episodes-per-task must be >= 1, got {episodes_per_task}")
    if image_size < 16 or image_size % 2:
        raise ValueError(f"--image-size must be an even number >= 16, got {image_size}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if start_spread and simulator_name != "metaworld":
        raise ValueError(
            f"--start-spread is for Meta-World ({simulator_name} draws each start pose already)"
        )
    if not 0.0 <= start_spread <= 0.2:
        raise ValueError(f"--start-spread must be in [0, 0.2] m, got {start_spread}")
    if not 0.0 <= action_noise <= 0.5:
        raise ValueError(f"--action-noise must be in [0, 0.5] action units, got {action_noise}")
    if max_steps is not None and not 1 <= max_steps <= sim.MAX_EPISODE_STEPS:
        raise ValueError(
            f"--max-steps must be in [1, {sim.MAX_EPISODE_STEPS}] ({simulator_name}'s own episode "
            f"limit), got {max_steps}"
        )
    if len(set(cameras)) != len(cameras):
        raise ValueError(f"--camera names a camera twice: {list(cameras)}")
    tasks = sim.resolve_tasks(tasks)
    config = CollectConfig(
        simulator_name,
        tuple(tasks),
        episodes_per_task,
        image_size,
        cameras,
        seed,
        keep_failures,
        start_spread,
        action_noise,
        max_steps,
        {task: asdict(sim.task_language()[task]) for task in tasks},
    )
    out = Path(out)
    record = {"config": json.loads(json.dumps(asdict(config)))}  # as it reads back from disk
    done_file = out / COLLECTION_FILE
    if done_file.exists():
        previous = json.loads(done_file.read_text())
        fix = f"choose another --out or delete {out}"
        _check_same_config(previous["config"], record["config"], f"the dataset in {out}", fix)
        console.print(f"[green]{out} is already complete[/]; nothing to do.")
        return _print_summary(previous["summary"], console)

    staging = out / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    staged_config = staging / "config.json"
    if staged_config.exists():
        where, fix = f"the partial collection in {staging}", f"rerun as it was or delete {staging}"
        _check_same_config(json.loads(staged_config.read_text()), record["config"], where, fix)
    write_json(staging, staged_config.name, record["config"])

    jobs = [
        (task, attempt, str(staging), config)
        for task in config.tasks
        for attempt in range(episodes_per_task)
        if not _staged_path(staging, task, attempt).exists()
    ]
    total = len(config.tasks) * episodes_per_task
    frames_this_run, start = 0, time.perf_counter()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, TimeRemainingColumn(), console=console) as progress:
        bar = progress.add_task("collecting episodes", total=total, completed=total - len(jobs))
        for task, success, frames, _ in _map(jobs, workers):
            frames_this_run += frames
            status = "[green]ok[/]" if success else "[red]failed[/]"
            progress.update(bar, advance=1, description=f"{task} {status}")
    collect_seconds = time.perf_counter() - start

    summary = _write_dataset(sim, config, out, staging, console)
    summary["frames_per_s"] = frames_this_run / collect_seconds if frames_this_run else None
    write_json(done_file.parent, done_file.name, {"config": record["config"], "summary": summary})
    shutil.rmtree(staging)
    return _print_summary(summary, console)


def _map(jobs: list, workers: int):
    global _worker_env
    if workers == 1 or len(jobs) <= 1:
        yield from map(_run_attempt, jobs)
        if _worker_env is not None:  # release the renderer now, not at interpreter exit
            _worker_env.close()
            _worker_env = None
        return
    # spawn: a forked child would share the parent's GL state; each worker owns one renderer.
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(_run_attempt, jobs)


def _write_dataset(sim, config: CollectConfig, out: Path, staging: Path, console: Console) -> dict:
    per_task = {}
    writer = LeRobotWriter(out, fps=sim.FPS, robot_type=sim.ROBOT_TYPE)
    with console.status("writing the LeRobot v3 dataset"):
        for task in config.tasks:
            kept = frames = 0
            for attempt in range(config.episodes_per_task):
                with np.load(_staged_path(staging, task, attempt)) as staged:
                    if not (bool(staged["success"]) or config.keep_failures):
                        continue
                    writer.add_episode(_to_episode_data(sim, task, dict(staged), config.cameras))
                    kept += 1
                    frames += int(staged["length"])
            per_task[task] = {"kept": kept, "attempted": config.episodes_per_task, "frames": frames}
        writer.finish(
            names={
                "observation.state": sim.STATE_NAMES,
                "observation.environment_state": sim.SCENE_NAMES,
                "action": sim.ACTION_NAMES,
            },
            cameras={f"observation.images.{c}": sim.camera_info(c) for c in config.cameras},
        )
    return {
        "simulator": config.simulator,
        "tasks": per_task,
        "disk_bytes": dataset_size_bytes(out, exclude=".staging"),
    }


def _print_summary(summary: dict, console: Console) -> dict:
    table = Table(title=f"{summary['simulator']} demonstrations")
    for column in ("task", "kept / attempted", "frames"):
        table.add_column(column, justify="left" if column == "task" else "right")
    kept = attempted = frames = 0
    for task, row in summary["tasks"].items():
        table.add_row(task, f"{row['kept']} / {row['attempted']}", str(row["frames"]))
        kept, attempted, frames = (
            kept + row["kept"],
            attempted + row["attempted"],
            frames + row["frames"],
        )
    table.add_section()
    table.add_row("all", f"{kept} / {attempted} ({kept / attempted:.0%})", str(frames))
    console.print(table)
    rate = summary.get("frames_per_s")
    speed = f"{rate:.0f} frames/s" if rate else "n/a (resumed, nothing collected)"
    console.print(
        f"episodes {kept}, frames {frames}, collection {speed}, "
        f"disk {summary['disk_bytes'] / 2**20:.1f} MiB"
    )
    return summary
