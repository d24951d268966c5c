"""Collection speed (frames/s with scripted experts and offscreen rendering) and DataModule
throughput (training samples/s) on this machine. Prints numbers; asserts nothing.

    python benchmarks/collect.py --tasks mt10 --episodes-per-task 3
"""

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console

from hybrid.collect import collect
from hybrid.data.datamodule import HybridDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["mt10"])
    parser.add_argument("--episodes-per-task", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        for workers in (1, 2):
            out = root / f"workers{workers}"
            start = time.perf_counter()
            summary = collect(
                "metaworld",
                args.tasks,
                args.episodes_per_task,
                out,
                args.image_size,
                workers=workers,
                console=Console(quiet=True),
            )
            wall = time.perf_counter() - start
            frames = sum(row["frames"] for row in summary["tasks"].values())
            console.print(
                f"collect workers={workers}: {summary['frames_per_s']:.0f} frames/s while "
                f"rolling out, {frames / wall:.0f} frames/s end to end ({wall:.1f} s, "
                f"{frames} frames kept)"
            )
        for num_workers in (0, 2):
            dm = HybridDataModule(
                str(out), batch_size=args.batch_size, num_workers=num_workers, image_size=64
            )
            start = time.perf_counter()
            dm.setup("fit")
            setup = time.perf_counter() - start
            loader = dm.train_dataloader()
            for _epoch in range(2):  # the first epoch includes worker start-up
                start, samples = time.perf_counter(), 0
                for batch in loader:
                    samples += len(batch["state"])
                rate = samples / (time.perf_counter() - start)
            console.print(
                f"datamodule num_workers={num_workers}: setup (decode + windows) {setup:.1f} s, "
                f"{rate:.0f} samples/s (batch {args.batch_size}, 64 px)"
            )


if __name__ == "__main__":
    main()
