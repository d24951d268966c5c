"""Where a trained policy loses success, tier by tier, open loop on held-out episodes. Prints
figures; asserts nothing.

    python benchmarks/diagnose.py --policy outputs/quickstart/policy --data data/quickstart \
        --readme README.md [--figure diagnosis]

The held-out episodes are the validation split `hybrid fit` used (same seed and fraction). Per
batch of held-out frames:
- language: how often the generated subgoal is the annotated one (exact text);
- world model: latent MSE of the imagined chosen future to the true future frame, beside copying
  the current frame (a world model that has learned nothing beats neither) and beside the
  candidate nearest the truth (what a perfect scorer would pick), the candidates' medoid (the
  one nearest the others: a choice by consensus, no scorer) and the value head's best among the
  half nearest the others (`central`; `planners/scoring.py` has the planner's choices); how far
  the K candidates spread (their RMS deviation from their mean, as a share of the RMS distance
  from the current frame to the true future);
- value head: Spearman correlation with true progress on real current latents and on *imagined*
  futures (what it ranks when planning), and whether best-of-K picks a candidate closer to the
  true future than a random one;
- action expert: MSE of the sampled chunk to the demonstrated one (normalised units, padded steps
  masked), conditioned on (a) the true future latent, (b) the imagined chosen future, (b') the
  candidates' medoid, (b'') the central choice, (c) no visual subgoal; beside (d) always
  predicting the mean action (zeros after normalisation);
- its eyes, where it has keypoints: the entropy of each keypoint's softmax as a share of a uniform
  one's (near 100%: the point averages the whole map), and how far the points move across the
  held-out frames (std, in pixels of the frames it sees; near 0: they see nothing that varies);
  where it has a scene head and the data records the scene, the mean distance, in cm, between
  each point of the scene (object, goal, ...) and where the expert's keypoints place it.
Held-out batches are drawn shuffled (seeded), so every task contributes. The world model and the
action expert take as many flow steps as the planner does by default (`HybridPlanner`), unless
`--imagine-steps` and `--action-steps` say otherwise.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import numpy as np
import torch
from readme import check_figure, markdown_table, write_figure
from rich.console import Console
from rich.table import Table

from hybrid.data.datamodule import HybridDataModule
from hybrid.data.normalize import EPS
from hybrid.data.windows import SCENE_KEY
from hybrid.module import spearman
from hybrid.policy import HybridPolicy
from planners.hierarchical import HybridPlanner
from planners.schedule import latent_distance
from planners.scoring import CHOICES, choose

_PLANNER = inspect.signature(HybridPlanner).parameters
IMAGINE_STEPS = _PLANNER["imagine_steps"].default
ACTION_STEPS = _PLANNER["action_steps"].default


@torch.no_grad()
def diagnose(
    policy: HybridPolicy,
    data: HybridDataModule,
    batches: int,
    num_candidates: int = 8,
    imagine_steps: int = IMAGINE_STEPS,
    action_steps: int = ACTION_STEPS,
    seed: int = 0,
) -> dict:
    """The figures of the module docstring, averaged over `batches` held-out batches."""
    policy.eval()
    data.setup("fit")
    generator = torch.Generator().manual_seed(seed)
    wm, expert = policy.world_model, policy.action_expert
    sums: dict[str, list[float]] = {}
    values: dict[str, list[torch.Tensor]] = {"real": [], "imagined": [], "progress": []}
    futures: list[torch.Tensor] = []

    def add(name: str, value) -> None:
        sums.setdefault(name, []).append(float(value))

    loader = torch.utils.data.DataLoader(
        data.val_set, batch_size=data.hparams.batch_size, shuffle=True, generator=generator
    )
    scene_names = data.dataset.features.get(SCENE_KEY, {}).get("names") or []
    for _, batch in zip(range(batches), loader, strict=False):
        names, images = list(batch["embodiment"]), batch["images"]
        instructions, subgoals = list(batch["instruction"]), list(batch["subgoal"])
        proposed, _, _ = policy.propose_subgoals(images, instructions)
        add("subgoal_exact", np.mean([a == b for a, b in zip(proposed, subgoals, strict=True)]))
        features, mask = policy.vlm.prefix_features(images, instructions, subgoals)
        current, future = wm.encode(images), wm.encode(batch["future_images"])
        candidates = wm.imagine(current, features, mask, num_candidates, imagine_steps, generator)
        scores = wm.score(candidates, features, mask)  # (B, K)
        rows = torch.arange(len(names))
        picks = {rule: choose(rule, candidates, scores) for rule in CHOICES}  # (B,) each
        chosen, medoid, central = (
            candidates[rows, picks[rule]] for rule in ("value", "medoid", "central")
        )
        add("world_mse_chosen", (chosen - future).square().mean())
        add("world_mse_copy", (current - future).square().mean())
        distances = torch.stack(
            [latent_distance(candidates[:, k], future) for k in range(num_candidates)], 1
        )  # (B, K)
        add("world_mse_nearest", distances.min(1).values.square().mean())
        add("world_mse_medoid", (medoid - future).square().mean())
        add("world_mse_central", (central - future).square().mean())
        spread = (candidates - candidates.mean(1, keepdim=True)).square().mean().sqrt()
        add("candidate_spread", spread / (future - current).square().mean().sqrt())
        add(
            "best_of_k_closer",
            (distances[rows, picks["value"]] < distances.mean(1)).float().mean(),
        )
        values["real"].append(wm.score(current[:, None], features, mask)[:, 0])
        values["imagined"].append(scores[rows, picks["value"]])
        values["progress"].append(batch["progress"].float())
        futures.append(batch["future_progress"].float())

        cfg = expert.config
        ids, dims = policy.embodiment_ids(names), policy.dim_mask(names)
        state = policy._pad(batch["state"], cfg.max_state_dim)
        target = policy._pad(batch["actions"], cfg.max_action_dim)
        step_mask = (batch["action_mask"][:, :, None] & dims[:, None, :]).float()
        conditions = [
            ("true_future", future),
            ("imagined", chosen),
            ("medoid", medoid),
            ("central", central),
        ]
        for label, visual in [*conditions, ("no_visual", None)]:
            noise_seed = torch.Generator().manual_seed(seed + 1)  # the same noise per condition
            actions = expert.sample(
                state, ids, features, mask, images, visual, dims, action_steps, noise_seed
            )
            error = ((actions - target).square() * step_mask).sum() / step_mask.sum()
            add(f"action_mse_{label}", error)
        add("action_mse_mean_action", (target.square() * step_mask).sum() / step_mask.sum())
        points = None  # (B, N, K, 2) in [-1, 1], read once for the keypoints' and scene's rows
        if expert.image_in is not None and expert.image_in.keypoints:
            seen = expert.eye_input(images)  # the frames, or the estimator's map they share
            weights = expert.image_in.heatmaps_softmax(seen)  # (B, N, K, cells)
            entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1)
            add("keypoint_entropy", (entropy / np.log(weights.shape[-1])).mean())
            _, points = expert.image_in(seen)
            add("keypoint_spread_px", points.std(0).mean() * images.shape[-1] / 2)
        if expert.config.scene_dim and batch["scene"].shape[1] and scene_names:
            width = batch["scene"].shape[1]
            estimate = expert.estimate_scene(images, ids, points)[:, :width].numpy()
            normalizer = data.normalizer
            estimate = normalizer.unnormalize(SCENE_KEY, estimate)
            truth = normalizer.unnormalize(SCENE_KEY, batch["scene"].numpy())
            varies = normalizer.params[SCENE_KEY][1] > EPS  # a point fixed in the data is skipped
            for point, dims in _points(scene_names).items():
                if not varies[dims].any():
                    continue
                distance = np.linalg.norm(estimate[:, dims] - truth[:, dims], axis=1)
                add(f"scene_cm_{point}", 100 * distance.mean())

    figures = {name: float(np.mean(v)) for name, v in sums.items()}
    progress = torch.cat(values["progress"])
    figures["value_spearman_real"] = float(spearman(torch.cat(values["real"]), progress))
    figures["value_spearman_imagined"] = float(
        spearman(torch.cat(values["imagined"]), torch.cat(futures))
    )
    figures["samples"] = int(len(progress))
    figures |= {
        "candidates": num_candidates,
        "imagine_steps": imagine_steps,
        "action_steps": action_steps,
    }
    return figures


def _points(names: list[str]) -> dict[str, list[int]]:
    """Scene dims grouped by point: ['object_x', 'object_y', 'goal_x'] -> {object: [0, 1], ...}."""
    points: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        points.setdefault(name.rsplit("_", 1)[0], []).append(i)
    return points


ROWS = [  # (tier, figure, key, format)
    ("language", "generated subgoal = annotated", "subgoal_exact", "{:.0%}"),
    ("world model", "latent MSE, imagined chosen vs true future", "world_mse_chosen", "{:.3f}"),
    ("world model", "latent MSE, copying the current frame", "world_mse_copy", "{:.3f}"),
    ("world model", "latent MSE, the candidate nearest the truth", "world_mse_nearest", "{:.3f}"),
    ("world model", "latent MSE, the candidates' medoid", "world_mse_medoid", "{:.3f}"),
    (
        "world model",
        "latent MSE, the best value of the central half",
        "world_mse_central",
        "{:.3f}",
    ),
    (
        "world model",
        "spread of the K candidates, share of the true motion",
        "candidate_spread",
        "{:.0%}",
    ),
    ("value head", "Spearman with progress, real latents", "value_spearman_real", "{:.3f}"),
    ("value head", "Spearman with progress, imagined futures", "value_spearman_imagined", "{:.3f}"),
    (
        "value head",
        "best-of-K nearer the truth than the mean candidate",
        "best_of_k_closer",
        "{:.0%}",
    ),
    (
        "action expert",
        "chunk MSE given (a) the true future latent",
        "action_mse_true_future",
        "{:.3f}",
    ),
    (
        "action expert",
        "chunk MSE given (b) the imagined chosen future",
        "action_mse_imagined",
        "{:.3f}",
    ),
    (
        "action expert",
        "chunk MSE given (b') the candidates' medoid",
        "action_mse_medoid",
        "{:.3f}",
    ),
    (
        "action expert",
        "chunk MSE given (b'') the central half's best value",
        "action_mse_central",
        "{:.3f}",
    ),
    ("action expert", "chunk MSE given (c) no visual subgoal", "action_mse_no_visual", "{:.3f}"),
    ("action expert", "chunk MSE of (d) the mean action", "action_mse_mean_action", "{:.3f}"),
]


KEYPOINT_ROWS = [
    ("action expert", "keypoints: softmax entropy, share of uniform", "keypoint_entropy", "{:.0%}"),
    (
        "action expert",
        "keypoints: movement across frames (std, px)",
        "keypoint_spread_px",
        "{:.1f}",
    ),
]


def rows(figures: dict) -> list[tuple[str, str, str, str]]:
    """ROWS, the keypoints' rows where the expert has keypoints, and a row per scene point where
    the policy estimates the scene."""
    keypoints = [row for row in KEYPOINT_ROWS if row[2] in figures]
    scene = [
        ("action expert", f"scene estimate, {key[9:]} position error (cm)", key, "{:.1f}")
        for key in figures
        if key.startswith("scene_cm_")
    ]
    return ROWS + keypoints + scene


def _setting(figures: dict) -> str:
    return (
        f"{figures['samples']} held-out frames; K = {figures['candidates']}, "
        f"{figures['imagine_steps']} imagination and {figures['action_steps']} action steps"
    )


def print_figures(figures: dict, console: Console) -> None:
    table = Table(title=f"open-loop diagnosis on {_setting(figures)}")
    for column in ("tier", "figure", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for tier, label, key, fmt in rows(figures):
        table.add_row(tier, label, fmt.format(figures[key]))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--data", required=True, help="the dataset the policy was trained on")
    parser.add_argument("--future-offset", type=int, default=16, help="as in training")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="as in training")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-candidates", type=int, default=8)
    parser.add_argument("--imagine-steps", type=int, default=IMAGINE_STEPS, help="as planned")
    parser.add_argument("--action-steps", type=int, default=ACTION_STEPS, help="as planned")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument("--readme", help="rewrite this README's table named by --figure")
    parser.add_argument("--figure", default="diagnosis", help="the README table's marker name")
    args = parser.parse_args()
    if args.readme:
        check_figure(args.readme, args.figure)
    torch.manual_seed(0)
    policy = HybridPolicy.from_pretrained(args.policy)
    data = HybridDataModule(
        args.data,
        chunk_size=policy.action_config.chunk_size,
        future_offset=args.future_offset,
        image_size=policy.frame_size,
        val_fraction=args.val_fraction,
        batch_size=args.batch_size,
    )
    figures = diagnose(
        policy, data, args.batches, args.num_candidates, args.imagine_steps, args.action_steps
    )
    print_figures(figures, Console())
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    if args.readme:
        lines = [[tier, label, fmt.format(figures[key])] for tier, label, key, fmt in rows(figures)]
        header = ["tier", f"figure ({_setting(figures)})", ""]
        table = markdown_table(header, lines)
        write_figure(args.readme, args.figure, table)


if __name__ == "__main__":
    main()
