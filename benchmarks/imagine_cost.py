"""What K imagined futures cost against one, per world-model shape: imagine and score (one Euler
step, `WorldModel.imagine` then `WorldModel.score`) at batch 1, K = 1 and K = `--k`, on freshly
built (untrained) world models, whose cost is a trained one's. Prints a table, asserts nothing;
`--readme README.md` writes it there.

    python benchmarks/imagine_cost.py --calls 300 --readme README.md

Each shape is the quickstart's world model (64-px frames, an 8 x 8 x 4 latent, 3 blocks of width
128, patches of 2 x 2 latent cells) with one setting changed. The two K alternate call by call
(after 20 unmeasured calls), so a drift in the machine's speed reaches both; the table gives
medians, in one torch thread, as an evaluation worker plans. The context is `--context-tokens`
VLM tokens of width 256.
"""

import argparse
import statistics
import time

import torch
from readme import check_figure, show_table
from rich.console import Console

from experts.world_model import WorldModel

SHAPES = {  # name -> the settings changed from the quickstart's world model before 0207826
    "patch 2 (16 tokens a future)": {},
    "patch 4 (4 tokens a future)": {"patch_size": 4},
    "patch 2, width 96": {"hidden": 96},
    "patch 2, 2 blocks": {"num_layers": 2},
}


def measure(settings: dict, k: int, calls: int, context_tokens: int) -> tuple[float, float]:
    """Median milliseconds of imagine-and-score at K = 1 and K = k."""
    torch.manual_seed(0)
    shape = {"image_size": 64, "vae_channels": (16, 32, 32, 32), "hidden": 128, "num_layers": 3}
    model = WorldModel(context_dim=256, **(shape | settings)).eval()
    current = torch.randn(1, *model.latent_shape)
    context = torch.randn(1, context_tokens, 256)
    mask = torch.ones(1, context_tokens, dtype=torch.bool)
    times: dict[int, list[float]] = {1: [], k: []}
    with torch.inference_mode():
        for call in range(20 + calls):
            for n in (1, k):
                start = time.perf_counter()
                model.score(model.imagine(current, context, mask, n, 1), context, mask)
                if call >= 20:
                    times[n].append(time.perf_counter() - start)
    return statistics.median(times[1]) * 1e3, statistics.median(times[k]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8, help="candidates against one")
    parser.add_argument("--calls", type=int, default=300, help="measured calls per K and shape")
    parser.add_argument("--context-tokens", type=int, default=40)
    parser.add_argument("--readme", help="write the table into this README")
    parser.add_argument("--figure", default="imagine_cost", help="the README table's marker name")
    args = parser.parse_args()
    if args.readme:
        check_figure(args.readme, args.figure)
    torch.set_num_threads(1)
    rows = []
    for name, settings in SHAPES.items():
        one, many = measure(settings, args.k, args.calls, args.context_tokens)
        rows.append([name, f"{one:.2f}", f"{many:.2f}", f"{many / one:.2f}x"])
    show_table(
        Console(),
        f"imagine and score at batch 1, one thread, median of {args.calls} calls",
        ["world model", "K = 1 ms", f"K = {args.k} ms", f"K = {args.k} / K = 1"],
        rows,
        readme=args.readme,
        figure=args.figure,
    )


if __name__ == "__main__":
    main()
