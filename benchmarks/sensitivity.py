"""What the action expert's first chunk of an episode depends on: the frames, or its own noise.
Prints figures; asserts nothing.

    python benchmarks/sensitivity.py --data data/quickstart \
        --policy outputs/quickstart/policy [--policy other/policy ...] --readme README.md

On the first frame of every episode of the dataset (training and held-out alike: a policy that
does not use the frames where it was trained will not use them elsewhere), per task, in
normalised action units (mean absolute difference over the chunk's real steps and dims):
- spread: how far each demonstrated chunk lies from the task's mean chunk. At the first frame
  every episode of a task starts from the same pose, so this is what only the frames (where the
  object and the goal are) can tell apart;
- error: the sampled chunk against the demonstrated one;
- frames: how far the sampled chunk moves when the frames are those of another episode of the
  same task (same state, instruction and noise);
- noise: how far it moves when only the flow's initial noise is drawn again;
- for a policy whose expert reads a scene (`action_expert.scene_input`), given the true one
  (as `hybrid eval --privileged-scene` does): true-scene error, the chunk against the
  demonstrated one, and scene, how far it moves when the true scene is another episode's
  (same frames); "–" for other policies.
A policy that reads the scene from its frames has `frames` near `spread` and `noise` small; one
whose noise picks the motion has the reverse. The expert acts without a visual subgoal here, so
what it sees is its own view of the frames.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from readme import check_figure, markdown_table, write_figure
from rich.console import Console
from rich.table import Table

from hybrid.data.datamodule import HybridDataModule
from hybrid.policy import HybridPolicy

FIGURES = ("spread", "error", "frames", "noise", "true-scene error", "scene")


@torch.no_grad()
def sensitivity(policy: HybridPolicy, data: HybridDataModule, action_steps: int = 10) -> dict:
    """{task instruction: {figure: value}} over the first frames of every episode."""
    policy.eval()
    data.setup("fit")
    first = defaultdict(list)
    for windows in (data.train_set, data.val_set):
        for i, (e, t) in enumerate(windows.index):
            if t == 0:
                first[windows.episodes[e]["instruction"]].append(windows[i])
    expert, cfg = policy.action_expert, policy.action_expert.config
    out = {}
    for task, items in first.items():
        if len(items) < 2:
            continue
        batch = torch.utils.data.default_collate(items)
        names = list(batch["embodiment"])
        ids, dims = policy.embodiment_ids(names), policy.dim_mask(names)
        features, mask = policy.vlm.prefix_features(
            batch["images"], list(batch["instruction"]), list(batch["subgoal"])
        )
        state = policy._pad(batch["state"], cfg.max_state_dim)
        target = policy._pad(batch["actions"], cfg.max_action_dim)
        weight = (batch["action_mask"][:, :, None] & dims[:, None, :]).float()

        inputs = (state, ids, features, mask)

        def sample(images, seed, scene=None, inputs=inputs, dims=dims):
            noise = torch.Generator().manual_seed(seed)
            return expert.sample(*inputs, images, None, dims, action_steps, noise, scene=scene)

        def distance(a, b, weight=weight):
            return float(((a - b).abs() * weight).sum() / weight.sum())

        actions = sample(batch["images"], 0)
        mean = (target * weight).sum(0) / weight.sum(0).clamp_min(1)
        out[task] = {
            "spread": distance(target, mean.expand_as(target)),
            "error": distance(actions, target),
            "frames": distance(sample(batch["images"].roll(1, 0), 0), actions),
            "noise": distance(sample(batch["images"], 1), actions),
            "episodes": len(items),
        }
        if cfg.scene_input and batch["scene"].shape[1]:
            true = policy._pad(batch["scene"], cfg.scene_dim)
            given = sample(batch["images"], 0, true)
            out[task]["true-scene error"] = distance(given, target)
            out[task]["scene"] = distance(sample(batch["images"], 0, true.roll(1, 0)), given)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the dataset the policies were trained on")
    parser.add_argument("--policy", action="append", required=True, help="one or more policies")
    parser.add_argument("--readme", help="rewrite this README's `sensitivity` table")
    args = parser.parse_args()
    if args.readme:
        check_figure(args.readme, "sensitivity")
    lines = []
    for path in args.policy:
        torch.manual_seed(0)
        policy = HybridPolicy.from_pretrained(path)
        data = HybridDataModule(
            args.data,
            chunk_size=policy.action_expert.config.chunk_size,
            future_offset=16,
            image_size=policy.frame_size,
            val_fraction=0.1,
        )
        for task, figures in sensitivity(policy, data).items():
            lines.append(
                [path, task, *(f"{figures[k]:.2f}" if k in figures else "–" for k in FIGURES)]
            )
    table = Table(title="the first chunk of each episode: what moves it (normalised units)")
    for column in ("policy", "task", *FIGURES):
        table.add_column(column, justify="left" if column in ("policy", "task") else "right")
    for line in lines:
        table.add_row(*line)
    Console().print(table)
    if args.readme:
        write_figure(
            args.readme, "sensitivity", markdown_table(["policy", "task", *FIGURES], lines)
        )


if __name__ == "__main__":
    main()
