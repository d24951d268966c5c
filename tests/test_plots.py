"""The pictures: charts with intervals, loss curves from a CSV log, panels with wrapped text."""

import numpy as np
import pytest
from PIL import Image

from hybrid.plots import loss_curves, panel, success_chart, wrapped


def _colours(path) -> int:
    image = np.asarray(Image.open(path).convert("RGB"))
    return len(np.unique(image.reshape(-1, 3), axis=0))


def test_a_grouped_success_chart_draws_every_mode(tmp_path):
    counts = {"reach-v3": (6, 20), "push-v3": (0, 20)}
    one = success_chart({"full": counts}, tmp_path / "one.png", "one mode")
    two = success_chart(
        {"full": counts, "flat": {"reach-v3": (9, 20), "push-v3": (3, 20)}},
        tmp_path / "two.png",
        "two modes",
    )
    assert _colours(two) > _colours(one) > 16, "a second mode adds a colour of bars"
    assert not list(tmp_path.glob(".*")), "no temporary file left behind"


def test_loss_curves_read_lightnings_csv_and_refuse_one_without_losses(tmp_path):
    rows = ["step,epoch,train/loss_action,val/loss_action,lr"]
    rows += [f"{s},0,{1 / (s + 1)},,0.001" for s in range(0, 50, 10)] + ["49,0,,0.4,"]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    path = loss_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    assert _colours(path) > 16
    # a fit whose root folder nothing else wrote to (its logger saves elsewhere)
    elsewhere = loss_curves(tmp_path / "metrics.csv", tmp_path / "new" / "run" / "curves.png")
    assert elsewhere.is_file()
    (tmp_path / "bare.csv").write_text("step,epoch,lr\n0,0,0.001\n")
    with pytest.raises(ValueError, match="holds no train/loss or val/loss column"):
        loss_curves(tmp_path / "bare.csv", tmp_path / "bare.png")


def test_text_is_wrapped_between_words_and_panels_are_three_panes():
    text = "move the gripper above the puck and then lower it"
    lines = wrapped(text, 12)
    assert " ".join(lines) == text and all(len(line) <= 12 for line in lines)
    assert set(" ".join(lines).split()) == set(text.split()), "no word is cut"
    frame = np.full((96, 96, 3), 200, np.uint8)
    out = panel(frame, None, text, (0.83, 8), size=256)
    assert out.shape == (256, 768, 3) and out[:, 512:].max() == 255, "white text on the third"
