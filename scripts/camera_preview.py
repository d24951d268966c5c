"""Write a PNG of what each Meta-World camera shows at the side the policy sees: one row per
camera, one tile per task (the same configuration in every row), each tile upscaled with
nearest-neighbour so that the pixels stay visible.

    python scripts/camera_preview.py --out docs/cameras.png
"""

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from hybrid.sim.metaworld import MetaWorldEnv

TASKS = ["reach-v3", "push-v3", "pick-place-v3", "drawer-open-v3", "button-press-topdown-v3"]


def preview(cameras: list[str], tasks: list[str], size: int, scale: int, seed: int) -> Image.Image:
    tile, label = size * scale, 70
    sheet = Image.new("RGB", (label + tile * len(tasks), tile * len(cameras)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, camera in enumerate(cameras):
        draw.text((4, row * tile + tile // 2), f"{camera}\n{size} px", fill="black")
        for column, task in enumerate(tasks):
            env = MetaWorldEnv(task, camera=camera, image_size=size, seed=0)
            try:
                env.reset(seed)
                frame = env.render()[camera]
                frame = Image.fromarray(frame).resize((tile, tile), Image.NEAREST)
            finally:
                env.close()
            sheet.paste(frame, (label + column * tile, row * tile))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", nargs="+", default=["corner", "front", "side"])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", default="docs/cameras.png")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    preview(args.cameras, args.tasks, args.size, args.scale, args.seed).save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
