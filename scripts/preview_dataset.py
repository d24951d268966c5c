"""Write a PNG contact sheet of a LeRobot v3 dataset: one row per task (its first episode), one
tile per subgoal phase (the phase's first frame) plus the last frame, captioned with the subgoal.

    python scripts/preview_dataset.py data/quickstart --out preview.png
"""

import argparse
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hybrid.data.lerobot_dataset import LeRobotDataset

TILE = 160


def contact_sheet(root: Path, camera: str | None = None) -> Image.Image:
    ds = LeRobotDataset(root)
    camera = camera or ds.camera_keys[0]
    first_per_task = {}
    for index, meta in enumerate(ds.episodes):
        first_per_task.setdefault(meta["tasks"][0], index)
    rows = []
    for task, index in first_per_task.items():
        subgoals = ds.episode(index)["subgoal"]
        frames = ds.camera_frames(index, camera)
        starts = [t for t in range(len(subgoals)) if t == 0 or subgoals[t] != subgoals[t - 1]]
        tiles = []
        for t in [*starts, len(frames) - 1]:
            tile = Image.fromarray(frames[t]).resize((TILE, TILE), Image.NEAREST)
            canvas = Image.new("RGB", (TILE, TILE + 40), "white")
            canvas.paste(tile, (0, 40))
            caption = [f"t={t}", *textwrap.wrap(str(subgoals[t]), 28)[:2]]
            ImageDraw.Draw(canvas).multiline_text((2, 0), "\n".join(caption), fill="black")
            tiles.append(np.asarray(canvas))
        header = Image.new("RGB", (TILE * len(tiles), 14), "lightgray")
        ImageDraw.Draw(header).text((2, 1), task, fill="black")
        rows.append(np.concatenate([np.asarray(header), np.concatenate(tiles, axis=1)]))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return Image.fromarray(np.concatenate(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--camera", default=None, help="camera feature key; default the first")
    parser.add_argument("--out", type=Path, default=Path("preview.png"))
    args = parser.parse_args()
    contact_sheet(args.root, args.camera).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
