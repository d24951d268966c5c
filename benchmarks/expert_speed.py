"""Size and speed of the tiny default experts on this machine. Prints numbers; asserts nothing.

    python benchmarks/expert_speed.py [--dataset DIR]

Without --dataset it collects a small Meta-World set first (three tasks, four episodes each).
Reports parameters per expert, a training step (all losses, forward + backward + AdamW) at batch
32, and batch-1 inference latency of each tier, plus the FAST compression ratio.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from hybrid.collect import collect
from hybrid.data.datamodule import HybridDataModule
from hybrid.policy import HybridPolicy
from hybrid.sim.metaworld import EMBODIMENT


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def params(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dataset
        if root is None:
            root = Path(tmp) / "data"
            tasks = ["reach-v3", "pick-place-v3", "drawer-open-v3"]
            collect("metaworld", tasks, 4, root, image_size=64, console=Console(quiet=True))
        dm = HybridDataModule(str(root), batch_size=args.batch_size, val_fraction=0.0)
        dm.setup("fit")
    chunks = dm.train_set.action_chunks()
    policy = HybridPolicy.create(
        dm.train_set.texts(), chunks, [EMBODIMENT], {EMBODIMENT.name: dm.norm_stats()}
    )
    batch = next(iter(dm.train_dataloader()))

    sizes = Table(title="parameters (M)")
    for column in (
        "vlm",
        "world model",
        "  vae",
        "  transformer",
        "  value head",
        "action expert",
        "total",
    ):
        sizes.add_column(column, justify="right")
    wm = policy.world_model
    sizes.add_row(
        *(
            f"{v:.2f}"
            for v in (
                params(policy.vlm),
                params(wm),
                params(wm.vae),
                params(wm.transformer),
                params(wm.value),
                params(policy.action_expert),
                params(policy),
            )
        )
    )
    console.print(sizes)

    optimiser = torch.optim.AdamW(policy.parameters(), lr=1e-4)

    def train_step():
        losses = policy.losses(batch)
        optimiser.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimiser.step()

    policy.train()
    step_ms = timed(train_step, repeats=5)
    policy.eval()
    one = {k: v[:1] for k, v in batch.items()}
    images, instruction, subgoal = one["images"], list(one["instruction"]), list(one["subgoal"])
    features, mask = policy.prefix_features(images, instruction, subgoal)
    state = policy.normalize_state(
        policy.normalizers[EMBODIMENT.name].unnormalize("observation.state", one["state"].numpy()),
        EMBODIMENT.name,
    )
    current = policy.encode_frames(images)
    latents8, _ = policy.imagine(current, features, mask, 8, 4)
    generated = tuple(policy.propose_subgoals(images, instruction)[0])  # a right guess
    rows = {
        f"train step, batch {args.batch_size} (all losses, fwd+bwd+AdamW)": step_ms,
        "subgoal generation (with its features)": timed(
            lambda: policy.propose_subgoals(images, instruction), 10
        ),
        "subgoal generation, the same subgoal as draft (checked in one pass)": timed(
            lambda: policy.propose_subgoals(images, instruction, generated), 10
        ),
        "prefix features": timed(lambda: policy.prefix_features(images, instruction, subgoal), 10),
        "imagine and score K=1": timed(lambda: policy.imagine(current, features, mask, 1, 4), 10),
        "imagine and score K=8": timed(lambda: policy.imagine(current, features, mask, 8, 4), 10),
        "decode K=8 to images": timed(lambda: wm.decode(latents8), 10),
        "action chunk (10 steps)": timed(
            lambda: policy.sample_actions(
                state, EMBODIMENT.name, features, mask, images, latents8[:, 0]
            ),
            10,
        ),
    }
    table = Table(title=f"latency on this machine ({torch.get_num_threads()} threads)")
    table.add_column("what")
    table.add_column("ms", justify="right")
    for name, ms in rows.items():
        table.add_row(name, f"{ms:.1f}")
    console.print(table)
    console.print(
        f"FAST: compression ratio {policy.fast.compression_ratio(chunks):.2f} on {len(chunks)} "
        f"chunks of {chunks.shape[1]}x{chunks.shape[2]}, vocabulary {policy.fast.vocab_size}"
    )


if __name__ == "__main__":
    main()
