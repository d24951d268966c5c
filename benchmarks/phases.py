"""Where the language tier stands against the task: in closed loop, the phase of each generated
subgoal against the phase the scripted expert's own rules (`metaworld_tasks.yaml`) give the
current observation. Prints numbers; asserts nothing.

    python benchmarks/phases.py --policy outputs/quickstart/policy --tasks push-v3 pick-place-v3

Per task and episode outcome, the share of planned chunks whose subgoal is the true phase, ahead
of it (the language tier moved on before the world did: e.g. "push the puck to the goal" while
the gripper never got behind the puck), behind it, or text of no phase; and, for failed episodes,
the furthest true phase they reached. The true phase only moves forward (it labels demonstrations
the same way), so "ahead" is a lower bound.

With `--oracle` the VLM's subgoal is replaced, every chunk, by the true phase's: the success the
tiers below reach with a perfect language tier, i.e. how much of the loss the language tier owns.
"""

import argparse
from collections import Counter

from readme import check_figure, markdown_table, write_figure
from rich.console import Console
from rich.table import Table

from hybrid.collect import episode_seed
from hybrid.sim import metaworld
from hybrid.types import Observation
from planners.hierarchical import HybridPlanner
from planners.schedule import RefreshSchedule


def rollout(planner, env, language, cameras, seed: int, max_steps: int, oracle=None):
    """One episode: (success, [(generated phase or -1, true phase) per planned chunk], furthest
    true phase). `oracle`, a one-item list, is given the true phase's subgoal before each step."""
    obs = env.reset(seed)
    planner.reset(seed)  # the episode's own noise, as `hybrid eval` draws it
    tracker = metaworld.PhaseTracker(language)
    chunks, success, steps = [], False, 0
    while steps < max_steps and not success:
        steps += 1
        true_phase = tracker.update(obs)
        if oracle is not None:
            oracle[0] = language.subgoals[true_phase]
        images = {cameras[name]: frame for name, frame in env.render().items()}
        planned = not planner.queue
        action = planner.act(Observation(images, metaworld.policy_state(obs)), language.instruction)
        if planned:
            subgoal = planner.last_plan.subgoal
            said = language.subgoals.index(subgoal) if subgoal in language.subgoals else -1
            chunks.append((said, true_phase))
        obs, success = env.step(action)
    return success, chunks, tracker.phase


def _relation(said: int, true: int) -> str:
    if said < 0:
        return "none"
    return "=" if said == true else "ahead" if said > true else "behind"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--tasks", nargs="+", default=["push-v3", "pick-place-v3"])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument(
        "--readme", help="rewrite this README's `phases` table (`phases_oracle` with --oracle)"
    )
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="replace the VLM's subgoal by the true phase's, refreshed every chunk: what a "
        "perfect language tier would give the tiers below",
    )
    args = parser.parse_args()
    if args.readme:
        check_figure(args.readme, "phases_oracle" if args.oracle else "phases")
    console = Console()
    oracle = None
    if args.oracle:
        planner = HybridPlanner.from_pretrained(
            args.policy, decode="none", schedule=RefreshSchedule(1)
        )
        oracle = [""]
        policy = planner.policy

        def propose_oracle(images, instructions, drafts=()):
            return list(oracle), *policy.prefix_features(images, instructions, list(oracle))

        policy.propose_subgoals = propose_oracle
    else:
        planner = HybridPlanner.from_pretrained(args.policy, decode="none")
    cameras = {key.rsplit(".", 1)[-1]: key for key in planner.spec.cameras}
    table = Table(title=f"generated subgoal vs true phase, {args.episodes} episodes per task")
    columns = ("task", "outcome", "episodes", "chunks", "= true", "ahead", "behind", "no phase")
    for column in columns:
        table.add_column(column, justify="left" if column in ("task", "outcome") else "right")
    furthest: dict[str, Counter] = {}
    rows = []
    for task in metaworld.resolve_tasks(args.tasks):
        language = metaworld.task_language()[task]
        env = metaworld.make_env(task, tuple(cameras), 96, args.seed)
        outcomes = {True: [], False: []}
        furthest[task] = Counter()
        for i in range(args.episodes):
            seed = episode_seed(args.seed, task, i)
            success, chunks, reached = rollout(
                planner, env, language, cameras, seed, args.max_steps, oracle
            )
            outcomes[success].append(chunks)
            if not success:
                furthest[task][language.subgoals[reached]] += 1
        env.close()
        for success, episodes in outcomes.items():
            chunks = [c for episode in episodes for c in episode]
            if not chunks:
                continue
            share = Counter(_relation(said, true) for said, true in chunks)
            rows.append(
                [
                    task,
                    "success" if success else "failure",
                    str(len(episodes)),
                    str(len(chunks)),
                    *(f"{share[k] / len(chunks):.0%}" for k in ("=", "ahead", "behind", "none")),
                ]
            )
            table.add_row(*rows[-1])
    console.print(table)
    lines = [f"{task}: {dict(counts)}" for task, counts in furthest.items()]
    console.print("furthest true phase of the failed episodes:", *lines, sep="\n")
    if args.readme:
        furthest_rows = [
            f"- {task}: " + ", ".join(f'{n} × "{phase}"' for phase, n in counts.most_common())
            for task, counts in furthest.items()
        ]
        markdown = markdown_table([c.replace("= true", "= true phase") for c in columns], rows)
        markdown += "\n\nFurthest true phase of the failed episodes:\n\n" + "\n".join(furthest_rows)
        write_figure(args.readme, "phases_oracle" if args.oracle else "phases", markdown)


if __name__ == "__main__":
    main()
