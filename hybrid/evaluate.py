"""`hybrid eval`: closed-loop rollouts of a trained policy in the simulator of its robot
(Meta-World for the Sawyer, panda-gym for the Panda; `--embodiment` picks the robot and adapter).

Episodes run in worker processes (one torch thread each, so two workers share two cores without
fighting), each with its own planner and simulator. Reported per task: success rate and mean
steps; per tier: latency p50/p95 over every plan, and the amortised milliseconds per action chunk;
the control step (each call to `act`, what the robot's loop waits for) p50/p99.
`results.json` holds all of it, `success.png` draws it (per task, with 95% intervals); `--video`
writes one MP4 per episode showing the camera, the imagined visual subgoal the planner chose, and
the subgoal text with its score, 256 px a pane, and `contact_sheet.png`, a still of each task.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from hybrid.collect import episode_seed
from hybrid.intervals import format_rate, wilson_interval
from hybrid.plots import contact_sheet, panel, success_chart
from hybrid.sim import simulator_for
from hybrid.types import Observation

VIDEO_FPS = 20
# "subgoal" is the VLM pass that generates a new subgoal (and gives its features), "features" the
# one that reads the subgoal in force; a chunk runs one of them. "imagine" includes the scores;
# "world_features" is the world model's one pass of the representation formulation.
TIERS = (
    "encode", "subgoal", "features", "imagine", "world_features", "plan", "joint", "decode",
    "action",
)  # fmt: skip


@dataclass(frozen=True)
class EvalConfig:
    policy: str
    embodiment: str
    tasks: tuple[str, ...]
    episodes: int
    seed: int = 1000
    max_steps: int = 300
    image_size: int = 96
    video_dir: str | None = None
    planner: dict = field(default_factory=dict)
    privileged_scene: bool = False


@dataclass
class EpisodeResult:
    task: str
    episode: int
    success: bool
    steps: int
    timings_ms: list[dict[str, float]]
    step_ms: list[float]
    subgoals: list[str]
    refreshes: int
    reached: int  # of the refreshes, those where the last subgoal's visual target was reached
    video: str | None


_worker: dict = {}


def _cameras(spec, sim) -> dict[str, str]:
    """The robot's cameras: simulator camera name -> feature key."""
    keys = spec.cameras or [f"observation.images.{c}" for c in sim.DEFAULT_CAMERAS]
    return {key.rsplit(".", 1)[-1]: key for key in keys}


def _load_planner(config: EvalConfig):
    from planners.hierarchical import HybridPlanner

    return HybridPlanner.from_pretrained(
        config.policy, embodiment=config.embodiment, **config.planner
    )


def _init_worker(config: EvalConfig, planner=None) -> None:
    import torch

    torch.set_num_threads(1)
    _worker["planner"] = planner or _load_planner(config)
    _worker["config"] = config


def _preflight(config: EvalConfig):
    """Load the planner and open the first task's simulator here, before any worker starts, so a
    policy or simulator that cannot load fails at once with its own message. Returns the planner."""
    planner = _load_planner(config)
    sim = simulator_for(config.embodiment)
    cameras = tuple(_cameras(planner.spec, sim))
    sim.make_env(config.tasks[0], cameras, config.image_size, config.seed).close()
    return planner


def _run_episode(job: tuple[str, int]) -> EpisodeResult:
    task, episode = job
    planner, config = _worker["planner"], _worker["config"]
    sim = simulator_for(config.embodiment)
    cameras = _cameras(planner.spec, sim)
    if _worker.get("task") != task:
        if "env" in _worker:
            _worker["env"].close()
        _worker["env"] = sim.make_env(task, tuple(cameras), config.image_size, config.seed)
        _worker["task"] = task
    env = _worker["env"]
    instruction = sim.task_language()[task].instruction
    seed = episode_seed(config.seed, task, episode)
    obs = env.reset(seed)
    planner.reset(seed)  # the episode's own noise, the same in every mode: episodes stay paired
    timings, step_ms, subgoals, frames, success, steps = [], [], [], [], False, 0
    refreshes = reached = 0
    # the visual subgoal in force, and its (score, K): the schedule does not imagine every chunk
    chosen, chosen_score = None, None
    while steps < config.max_steps and not success:
        steps += 1
        images = {cameras[name]: frame for name, frame in env.render().items()}
        plans = planner.plans
        start = time.perf_counter()
        scene = sim.scene_state(obs) if config.privileged_scene else None
        action = planner.act(Observation(images, sim.policy_state(obs), scene), instruction)
        step_ms.append((time.perf_counter() - start) * 1e3)
        if planner.plans > plans:  # a new chunk entered the queue
            plan = planner.executing
            timings.append(plan.timings_ms)
            subgoals.append(plan.subgoal)
            refreshes += plan.subgoal_refreshed
            reached += plan.target_reached
            if plan.chosen_image is not None:
                chosen = plan.chosen_image
                chosen_score = (float(plan.scores[plan.chosen]), len(plan.scores))
        if config.video_dir:
            camera = next(iter(images.values()))
            frames.append(panel(camera, chosen, planner.executing.subgoal, chosen_score))
        obs, success = env.step(action)
    video = None
    if config.video_dir:
        from hybrid.data.video import encode_video

        path = Path(config.video_dir) / f"{task}_{episode:03d}.mp4"
        tmp = path.with_name(f".{path.name}.tmp.mp4")
        encode_video(np.stack(frames), tmp, fps=VIDEO_FPS)
        os.replace(tmp, path)
        video = str(path)
    planner.reset()  # waits for a plan still running in the background
    return EpisodeResult(
        task, episode, success, steps, timings, step_ms, subgoals, refreshes, reached, video
    )


def _summarise(
    config: EvalConfig,
    results: list[EpisodeResult],
    seconds: float,
    not_run: list[tuple[str, int]],
    error: str | None,
) -> dict:
    """The tables and `results.json`. Episodes a crashed worker never finished are listed in
    `not_run`, with the `error`, and counted in no rate."""
    per_task = {}
    for task in config.tasks:
        rows = [r for r in results if r.task == task]
        if not rows:
            continue
        successes = sum(r.success for r in rows)
        per_task[task] = {
            "success_rate": successes / len(rows),
            "successes": successes,
            "ci95": wilson_interval(successes, len(rows)),
            "mean_steps": float(np.mean([r.steps for r in rows])),
            "episodes": len(rows),
        }
    successes = sum(r.success for r in results)
    plans = [t for r in results for t in r.timings_ms]
    latency = {}
    for tier in TIERS:
        values = [t[tier] for t in plans if tier in t]
        if values:
            latency[tier] = {
                "p50_ms": float(np.percentile(values, 50)),
                "p95_ms": float(np.percentile(values, 95)),
                "runs_per_chunk": len(values) / len(plans),
            }
    rates = [row["success_rate"] for row in per_task.values()]
    return {
        "config": asdict(config),
        "tasks": per_task,
        "mean_success_rate": float(np.mean(rates)) if rates else None,
        # every task runs the same number of episodes, so the pooled interval is the mean's
        "successes": successes,
        "episodes_total": len(results),
        "mean_ci95": wilson_interval(successes, len(results)) if results else None,
        "not_run": [list(job) for job in not_run],
        "error": error,
        "subgoal_refreshes_per_chunk": sum(r.refreshes for r in results) / max(len(plans), 1),
        # the refreshes where the visual target was reached, not timed out; None: not checked
        "targets_reached_per_chunk": (
            sum(r.reached for r in results) / max(len(plans), 1)
            if _checks_reached(config)
            else None
        ),
        "latency": latency,
        "amortised_ms_per_chunk": float(np.mean([sum(t.values()) for t in plans])) if plans else 0,
        # the time of each call to `act`, as the robot's control loop waits for it
        "control_step_ms": _percentiles([ms for r in results for ms in r.step_ms]),
        "chunks": len(plans),
        "wall_seconds": seconds,
        "episodes": [asdict(r) | {"timings_ms": None, "step_ms": None} for r in results],
    }


def _checks_reached(config: EvalConfig) -> bool:
    """Whether the planner's refresh rule checks the subgoal's visual target (opt-in)."""
    from planners.schedule import RefreshSchedule

    return (config.planner.get("schedule") or RefreshSchedule()).checks_reached


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50_ms": float(p50), "p99_ms": float(p99)}


class EvaluationError(RuntimeError):
    """An evaluation that could not run every episode; `results.json` holds what did run."""


def evaluate(
    policy: str,
    tasks: list[str],
    episodes: int,
    out: Path,
    seed: int = 1000,
    max_steps: int = 300,
    workers: int = 2,
    video: bool = False,
    planner: dict | None = None,
    embodiment: str | None = None,
    console: Console | None = None,
    privileged_scene: bool = False,
) -> dict:
    """Run the rollouts, print the tables, write `<out>/results.json` (and videos). `embodiment`
    None is the policy's first robot; another one needs its adapter under `<policy>/adapters/`.
    `privileged_scene` hands the action expert the simulator's true object and goal positions
    (a policy trained with `scene_input` reads them in place of its own estimate): an upper
    bound on what better perception could give, never a result of the policy."""
    from hybrid.adapters import available_embodiments

    console = console or Console()
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    if not (Path(policy) / "policy_config.json").is_file():
        raise ValueError(f"--policy {policy}: not a policy directory (no policy_config.json)")
    robots = available_embodiments(policy)
    embodiment = embodiment or robots[0]
    if embodiment not in robots:
        raise ValueError(
            f"--embodiment {embodiment!r}: {policy} has no such robot or adapter; it offers "
            f"{robots} (`hybrid finetune` adds one)"
        )
    sim = simulator_for(embodiment)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    video_dir = None
    if video:
        video_dir = out / "videos"
        video_dir.mkdir(exist_ok=True)
    config = EvalConfig(
        policy=str(policy),
        embodiment=embodiment,
        tasks=tuple(sim.resolve_tasks(tasks)),
        episodes=episodes,
        seed=seed,
        max_steps=max_steps,
        video_dir=str(video_dir) if video_dir else None,
        # nothing reads the imagined pixels unless a video shows them, and it shows the chosen
        planner={"decode": "chosen" if video else "none", **(planner or {})},
        privileged_scene=privileged_scene,
    )
    planner = _preflight(config)
    expert = planner.policy.action_expert
    if privileged_scene and (expert is None or not expert.config.scene_input):
        raise ValueError(
            f"--privileged-scene: the action expert of {policy} reads no scene; train one with "
            "configs/experiment/privileged_scene.yaml (action_expert.scene_input: true)"
        )
    jobs = [(task, i) for task in config.tasks for i in range(episodes)]
    start, results, crash = time.perf_counter(), [], None
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("evaluating", total=len(jobs))
        try:
            for result in _map(config, jobs, workers, planner):
                results.append(result)
                progress.update(bar, advance=1, description=_running(config.tasks, results))
        except _WorkerCrash as error:
            crash = str(error)
    results.sort(key=lambda r: (config.tasks.index(r.task), r.episode))
    done = {(r.task, r.episode) for r in results}
    not_run = [job for job in jobs if job not in done]
    summary = _summarise(config, results, time.perf_counter() - start, not_run, crash)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "results.json")
    pictures = []
    if results:
        print_summary(summary, console)
        counts = {t: (row["successes"], row["episodes"]) for t, row in summary["tasks"].items()}
        title = f"{policy} ({embodiment}), {episodes} episodes per task, seed {seed}"
        pictures.append(success_chart({"success": counts}, out / "success.png", title))
        if video:
            pictures.append(contact_sheet(_stills(results), out / "contact_sheet.png"))
    if crash:
        raise EvaluationError(
            f"{crash}; {len(not_run)} of {len(jobs)} episodes not run (listed in "
            f"{out / 'results.json'}, counted in no rate)"
        )
    console.print(
        f"wrote {out / 'results.json'}, "
        + ", ".join(map(str, pictures))
        + (f" and videos in {video_dir}" if video else "")
    )
    return summary


def _running(tasks: tuple[str, ...], results: list[EpisodeResult]) -> str:
    """The progress line: successes so far of each task begun, `reach-v3 3/5 · push-v3 0/2`."""
    parts = []
    for task in tasks:
        done = [r.success for r in results if r.task == task]
        if done:
            parts.append(f"{task} [green]{sum(done)}[/]/{len(done)}")
    return " · ".join(parts)


def _stills(results: list[EpisodeResult]) -> dict[str, np.ndarray]:
    """The middle frame of each task's first episode video: {task: (256, 768, 3) uint8}."""
    from hybrid.data.video import decode_video

    stills = {}
    for result in results:
        if result.task not in stills and result.video:
            frames = decode_video(Path(result.video), 0.0, result.steps / VIDEO_FPS, VIDEO_FPS)
            stills[result.task] = frames[len(frames) // 2]
    return stills


class _WorkerCrash(Exception):
    """A worker raised or died; the message says which episode and why."""


def _map(config: EvalConfig, jobs: list, workers: int, planner):
    """Episode results as they finish. One worker runs here with the preflight's planner; more
    run in spawned processes. The first worker that raises or dies ends the map (_WorkerCrash):
    the pending episodes are cancelled, never retried, so nothing restarts forever."""
    if workers == 1 or len(jobs) == 1:
        _init_worker(config, planner)
        try:
            for job in jobs:
                try:
                    yield _run_episode(job)
                except Exception as error:
                    raise _WorkerCrash(f"episode {job[1]} of {job[0]} failed: {error}") from error
        finally:
            if "env" in _worker:
                _worker.pop("env").close()
            _worker.clear()
        return
    del planner  # each worker loads its own
    pool = ProcessPoolExecutor(
        min(workers, len(jobs)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(config,),
    )
    futures = {pool.submit(_run_episode, job): job for job in jobs}
    try:
        for future in as_completed(futures):
            task, episode = futures[future]
            try:
                yield future.result()
            except BrokenProcessPool as error:
                raise _WorkerCrash(
                    f"an evaluation worker died (killed, out of memory or a simulator crash) "
                    f"while running episode {episode} of {task}"
                ) from error
            except Exception as error:
                raise _WorkerCrash(f"episode {episode} of {task} failed: {error}") from error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def print_summary(summary: dict, console: Console) -> None:
    table = Table(title="closed-loop evaluation")
    for column in ("task", "success [95% CI]", "mean steps", "episodes"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, row in summary["tasks"].items():
        table.add_row(
            task,
            format_rate(row["successes"], row["episodes"]),
            f"{row['mean_steps']:.0f}",
            str(row["episodes"]),
        )
    table.add_section()
    table.add_row(
        "mean",
        format_rate(summary["successes"], summary["episodes_total"]),
        "",
        str(summary["episodes_total"]),
    )
    console.print(table)
    latency = Table(title="latency per tier (ms; runs per chunk: how often the schedule ran it)")
    for column in ("tier", "p50", "p95", "runs per chunk"):
        latency.add_column(column, justify="left" if column == "tier" else "right")
    for tier, row in summary["latency"].items():
        latency.add_row(
            tier, f"{row['p50_ms']:.1f}", f"{row['p95_ms']:.1f}", f"{row['runs_per_chunk']:.2f}"
        )
    latency.add_section()
    latency.add_row("amortised per chunk", f"{summary['amortised_ms_per_chunk']:.1f}", "", "")
    latency.add_row(
        "language subgoal refreshes", "", "", f"{summary['subgoal_refreshes_per_chunk']:.2f}"
    )
    reached = summary.get("targets_reached_per_chunk")
    if reached is not None:
        latency.add_row("  of which the target was reached", "", "", f"{reached:.2f}")
    console.print(latency)
    if summary["control_step_ms"]:
        step = summary["control_step_ms"]
        console.print(
            f"control step (each call to act): p50 {step['p50_ms']:.1f} ms, "
            f"p99 {step['p99_ms']:.1f} ms"
        )
