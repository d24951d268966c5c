"""Pictures of results, for people who would rather look than read.

- `success_chart`: success per task with its 95% Wilson interval, and the mean; several modes of
  one policy side by side (`hybrid eval` writes `success.png`, the ablation benchmark its modes).
- `loss_curves`: each loss, train and val, against steps, from Lightning's CSV log
  (`LossCurves` draws `curves.png` when `hybrid fit` ends).
- `contact_sheet`: one still per task from the evaluation videos, camera | visual subgoal in force
  | subgoal text and score, 256 px a pane (`hybrid eval --video` writes `contact_sheet.png`).

Drawn with matplotlib's Agg backend (no display needed); files are written atomically.
"""

from __future__ import annotations

import csv
import math
import os
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from hybrid.intervals import wilson_interval


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(picture, path: Path) -> Path:
    """Write a matplotlib figure or a PIL image to `path` atomically (a temporary file renamed),
    making its folder if need be (a fit's root folder exists only if something wrote there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if hasattr(picture, "savefig"):
        picture.savefig(tmp, dpi=120, bbox_inches="tight")
    else:
        picture.save(tmp)
    os.replace(tmp, path)
    return path


def success_chart(modes: dict[str, dict[str, tuple[int, int]]], path: Path, title: str) -> Path:
    """modes: {mode: {task: (successes, episodes)}}, every mode over the same tasks. Bars per task
    and for the pooled mean, one colour per mode, labelled with their counts, whiskers at the 95%
    Wilson interval."""
    plt = _pyplot()
    tasks = list(next(iter(modes.values())))
    labels = [*tasks, "mean"]
    width = 0.8 / len(modes)
    figure, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 4))
    for i, (mode, counts) in enumerate(modes.items()):
        pooled = (sum(s for s, _ in counts.values()), sum(n for _, n in counts.values()))
        rows = [counts[t] for t in tasks] + [pooled]
        rates = np.array([s / n for s, n in rows])
        bounds = np.array([wilson_interval(s, n) for s, n in rows])
        errors = np.abs(bounds.T - rates)
        x = np.arange(len(labels)) + (i - (len(modes) - 1) / 2) * width
        ax.bar(x, 100 * rates, width, yerr=100 * errors, capsize=3, label=mode)
        for xi, rate, (succeeded, episodes) in zip(x, rates, rows, strict=True):
            label = f"{succeeded}/{episodes}"  # beside the whisker, not on it
            ax.text(xi + width / 10, 100 * rate + 1, label, ha="left", fontsize="x-small")
    ax.set_xticks(np.arange(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("success (%), 95% Wilson interval")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(modes) > 1:
        ax.legend(fontsize="small")
    path = _save(figure, path)
    plt.close(figure)
    return path


def read_metrics(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning's CSV log as {metric: [(step, value), ...]} (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, "") or step in (None, ""):
                    continue
                series.setdefault(key, []).append((int(float(step)), float(value)))
    return series


def loss_curves(csv_path: Path, path: Path) -> Path:
    """One panel per loss term (`train/loss_x` and `val/loss_x` together), against steps."""
    plt = _pyplot()
    series = read_metrics(csv_path)
    names = sorted({k.split("/", 1)[1] for k in series if k.startswith(("train/loss", "val/loss"))})
    if not names:
        raise ValueError(f"{csv_path} holds no train/loss or val/loss column")
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for stage, style in (("train", ".-"), ("val", "o-")):
            points = series.get(f"{stage}/{name}")
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, style, markersize=3, label=stage)
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    figure.tight_layout()
    path = _save(figure, path)
    plt.close(figure)
    return path


class LossCurves(Callback):
    """Draws `curves.png` beside the CSV log when fit ends (on the main process; nothing without a
    CSVLogger) and says where."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()
                metrics = Path(logger.log_dir) / "metrics.csv"
                if metrics.is_file():  # drawn before the export: a picture must not stop it
                    try:
                        path = loss_curves(metrics, Path(trainer.default_root_dir) / "curves.png")
                    except ValueError as error:  # fewer steps than log_every_n_steps
                        print(f"loss curves: none ({error})")
                    else:
                        print(f"loss curves: {path}")
                return


def wrapped(text: str, width: int) -> list[str]:
    """text in lines of at most `width` characters, broken between words."""
    return textwrap.wrap(text, width, break_long_words=False) or [""]


def panel(
    camera: np.ndarray,
    imagined: np.ndarray | None,
    subgoal: str | None,
    score: tuple[float, int] | None,
    size: int = 256,
) -> np.ndarray:
    """camera | imagined visual subgoal | subgoal text (and (score, K)): (size, 3 * size, 3)
    uint8, the text wrapped between words at a font readable at `size`."""
    from PIL import Image, ImageDraw, ImageFont

    def pane(image: np.ndarray | None) -> Image.Image:
        if image is None:
            return Image.new("RGB", (size, size), "black")
        return Image.fromarray(image).resize((size, size), Image.NEAREST)

    text = Image.new("RGB", (size, size), "black")
    font = ImageFont.load_default(size=max(12, size // 14))
    lines = wrapped(subgoal or "", 22)[:8]
    if score is not None:
        lines += ["", f"score {score[0]:.2f}", f"best of {score[1]}"]
    ImageDraw.Draw(text).multiline_text((8, 8), "\n".join(lines), fill="white", font=font)
    row = [pane(camera), pane(imagined), text]
    return np.concatenate([np.asarray(p) for p in row], axis=1)


def contact_sheet(tiles: dict[str, np.ndarray], path: Path, columns: int = 2) -> Path:
    """tiles: {task: (H, W, 3) uint8 panel}, laid out in a grid with the task named above each."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = next(iter(tiles.values())).shape[:2]
    label = 28
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * width, rows * (height + label)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=20)
    for i, (task, tile) in enumerate(tiles.items()):
        x, y = (i % columns) * width, (i // columns) * (height + label)
        draw.text((x + 6, y + 3), task, fill="black", font=font)
        sheet.paste(Image.fromarray(tile), (x, y + label))
    return _save(sheet, path)
