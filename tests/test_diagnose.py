"""The benchmarks' scripts (diagnose, phases, sensitivity, perception, formulations, latency) on
small trained policies and real episodes, and their refusal of a README without their markers."""

import contextlib
import io
import json
import os
import runpy
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "diagnose.py"


def _benchmark(script: str, *args) -> str:
    """Run benchmarks/<script> with `args` as `python benchmarks/<script>` runs it, but in this
    process (runpy), whose imports are already paid (12-15 s a fresh interpreter on the 2-core
    machine): one torch thread, a wide console; it must finish without an error or a non-zero
    exit. Returns what it printed. Its rollout workers are processes of their own, as always."""
    threads, printed = torch.get_num_threads(), io.StringIO()
    try:
        torch.set_num_threads(1)
        with (
            mock.patch.dict(os.environ, {"COLUMNS": "200", "OMP_NUM_THREADS": "1"}),
            contextlib.redirect_stdout(printed),
        ):
            _run_script(script, *args)
    except SystemExit as done:
        assert done.code in (None, 0), f"{script} exited with {done.code!r}"
    finally:
        torch.set_num_threads(threads)
    return printed.getvalue()


def _run_script(script: str, *args) -> None:
    """benchmarks/<script> with `args`, in this process as `python benchmarks/<script>` runs it
    (runpy); its SystemExit, if any, propagates."""
    path = SCRIPT.with_name(script)
    with (
        mock.patch.object(sys, "argv", list(map(str, [path, *args]))),
        mock.patch.object(sys, "path", [str(path.parent), *sys.path]),  # it imports neighbours
    ):
        runpy.run_path(str(path), run_name="__main__")


def _diagnose(policy, data, out):
    args = ["--policy", policy, "--data", data, "--future-offset", "8"]
    args += ["--val-fraction", "0.5", "--batches", "1", "--batch-size", "8"]
    args += ["--num-candidates", "3", "--out", out]
    printed = _benchmark("diagnose.py", *args)
    return json.loads(Path(out).read_text()), printed


@pytest.mark.slow
def test_diagnosis_reports_every_tier(tiny_policy_dir, mt10_dataset, tmp_path):
    figures, printed = _diagnose(tiny_policy_dir, mt10_dataset[0], tmp_path / "a.json")
    assert figures["samples"] == 8
    for key in ("subgoal_exact", "best_of_k_closer"):
        assert 0.0 <= figures[key] <= 1.0, key
    for key in ("value_spearman_real", "value_spearman_imagined"):
        assert -1.0 <= figures[key] <= 1.0, key
    conditions = ["true_future", "imagined", "no_visual", "mean_action"]
    errors = [figures[f"action_mse_{c}"] for c in conditions]
    assert all(e > 0 for e in errors) and figures["world_mse_copy"] > 0
    # conditioning matters: the three sampled conditions share their noise, yet differ
    assert len({round(e, 6) for e in errors[:3]}) == 3
    assert figures["action_mse_medoid"] > 0 and figures["action_mse_central"] > 0
    # the planner's default flow steps unless told otherwise, and the setting in the title
    assert (figures["imagine_steps"], figures["action_steps"]) == (1, 3)
    assert "open-loop diagnosis on 8 held-out frames; K = 3, 1 imagination and 3 action" in printed
    # the K candidates differ, and the one nearest the truth is no farther than the value head's
    # pick, the medoid or the central choice
    assert figures["candidate_spread"] > 0
    for choice in ("chosen", "medoid", "central"):
        assert figures["world_mse_nearest"] <= figures[f"world_mse_{choice}"], choice
    # its eyes: how sharply its keypoints look and how far they move, in pixels
    assert 0.0 < figures["keypoint_entropy"] <= 1.0 and figures["keypoint_spread_px"] > 0
    assert "keypoints: softmax entropy, share of uniform" in printed
    # and where the keypoints put each point of the recorded scene, in cm
    assert {"scene_cm_object", "scene_cm_goal"} <= set(figures)
    assert all(0 < figures[f"scene_cm_{p}"] < 1000 for p in ("object", "goal"))
    assert "scene estimate, goal position error (cm)" in printed
    again, _ = _diagnose(tiny_policy_dir, mt10_dataset[0], tmp_path / "b.json")
    assert again == figures, "the same policy, data and seed give the same figures"


@pytest.mark.slow
def test_phase_report_writes_its_readme_table(tiny_policy_dir, tmp_path):
    readme = tmp_path / "README.md"
    oracle = "<!-- figure: phases_oracle -->\nold\n<!-- /figure: phases_oracle -->\n"
    phases = "<!-- figure: phases -->\nold\n<!-- /figure: phases -->\n"
    readme.write_text(f"before\n{phases}{oracle}after\n")
    args = ["--policy", tiny_policy_dir, "--tasks", "push-v3", "--episodes", "2"]
    args += ["--max-steps", "12", "--readme", readme]
    _benchmark("phases.py", *args)
    text = readme.read_text()
    assert text.count("old") == 1 and text.startswith("before") and text.rstrip().endswith("after")
    row = next(line for line in text.splitlines() if line.startswith("| push-v3 | failure"))
    cells = row.strip("|").split("|")
    assert cells[2].strip() == "2" and cells[3].strip() == "6", "2 episodes of 3 chunks of 4 steps"
    shares = [int(c.strip().rstrip("%")) for c in cells[4:]]
    assert 99 <= sum(shares) <= 101, "every chunk is in one column"
    # --oracle: the subgoal is the true phase's in every chunk
    _benchmark("phases.py", *args, "--oracle")
    text = readme.read_text()
    assert "old" not in text
    oracle_rows = text.split("figure: phases_oracle")[1].splitlines()
    row = next(line for line in oracle_rows if line.startswith("| push-v3"))
    assert row.strip("|").split("|")[4].strip() == "100%", row


@pytest.mark.slow
def test_sensitivity_writes_one_row_per_task_with_what_moves_the_first_chunk(
    tiny_policy_dir, mt10_dataset, tmp_path
):
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- figure: sensitivity -->\nold\n<!-- /figure: sensitivity -->\nb\n")
    args = ["--data", mt10_dataset[0], "--policy", tiny_policy_dir, "--readme", readme]
    _benchmark("sensitivity.py", *args)
    rows = [
        line for line in readme.read_text().splitlines() if line.startswith(f"| {tiny_policy_dir}")
    ]
    assert len(rows) >= 2, "a row per task with at least two episodes"
    cells = [row.strip("| ").split(" | ")[2:] for row in rows]
    assert all(c[4:] == ["–", "–"] for c in cells), "no scene read: no true-scene columns"
    figures = [list(map(float, c[:4])) for c in cells]
    for (spread, error, frames, noise), row in zip(figures, rows, strict=True):
        assert spread >= 0 and frames >= 0 and error > 0, row
        assert noise > 0, "another noise, another chunk"
    assert max(spread for spread, *_ in figures) > 0, "demonstrations differ somewhere"
    assert "old" not in readme.read_text()


@pytest.mark.slow
def test_perception_reports_the_scene_estimate_open_and_closed_loop(
    tiny_policy_dir, mt10_dataset, tmp_path
):
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- figure: perception -->\nold\n<!-- /figure: perception -->\n")
    args = ["--policy", tiny_policy_dir, "--data", mt10_dataset[0], "--val-fraction", "0.5"]
    args += ["--tasks", "push-v3", "--episodes", "2", "--max-steps", "12", "--readme", readme]
    _benchmark("perception.py", *args)
    rows = [line.strip("|").split("|") for line in readme.read_text().splitlines()]
    rows = {r[1].strip(): r for r in rows if r[0].strip() == "push-v3"}
    assert rows["held-out, first frame"][2].strip() == "1", "one held-out episode, one first frame"
    counts = {
        label.split("), ", 1)[1]: int(row[2])
        for label, row in rows.items()
        if label.startswith("closed loop")
    }
    assert counts.pop("first chunk") == 2 and sum(counts.values()) == 4, "2 x 3 chunks of 4 steps"
    for row in rows.values():
        assert all(0 < float(cell) < 1000 for cell in row[3:]), row


@pytest.mark.slow
def test_misses_reports_where_failed_episodes_end(tiny_policy_dir, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- figure: misses -->\nold\n<!-- /figure: misses -->\n")
    args = ["--policy", tiny_policy_dir, "--tasks", "push-v3", "--episodes", "2"]
    _benchmark("misses.py", *args, "--max-steps", "12", "--readme", readme)
    (row,) = _table(readme.read_text(), "misses").values()
    assert row[0] == "2 of 2", "12 steps solve no push"
    assert row[1].endswith(" of 2") and row[2].endswith(" of 2")
    for cell in row[3:6]:  # closest / final distances, and the goal estimate's first / last error
        closest, final = map(float, cell.split(" / "))
        assert 0 < closest < 100 and 0 < final < 100, cell
    hand, item = ([float(x) for x in cell.split(" / ")] for cell in row[3:5])
    assert hand[0] <= hand[1] and item[0] <= item[1], "the closest is at most the final"
    assert row[6] == "-", "nothing solved"


@pytest.mark.slow
def test_formulations_train_evaluate_and_fill_one_row_each(mt10_dataset, tmp_path):
    """Each formulation named is fitted from its config on the same data and steps, evaluated
    on the same tasks, and written as one row of the README table and of formulations.json."""
    readme = tmp_path / "README.md"
    readme.write_text("<!-- figure: formulations -->\nold\n<!-- /figure: formulations -->\n")
    out = tmp_path / "runs"
    args = ["--formulations", "flat_vla", "--data", mt10_dataset[0]]
    args += ["--steps", "2", "--tasks", "reach-v3", "--episodes", "1", "--max-steps", "3"]
    args += ["--workers", "1", "--out", out, "--readme", readme]
    _benchmark("formulations.py", *args)
    runs = json.loads((out / "formulations.json").read_text())["runs"]
    assert list(runs) == ["flat_vla"]
    table = readme.read_text()
    assert "| `flat_vla` | actions only |" in table and "old" not in table
    # a formulation run alone adds its row; the others stay as the same comparison left them
    _benchmark("formulations.py", *(["--formulations", "joint"] + args[2:]))
    again = json.loads((out / "formulations.json").read_text())["runs"]
    assert list(again) == ["flat_vla", "joint"] and again["flat_vla"] == runs["flat_vla"]
    for name, run in again.items():
        assert (out / name / "policy" / "policy_config.json").is_file()
        assert run["successes"]["reach-v3"] in (0, 1)
        assert run["ms_per_chunk"] > 0 and run["s_per_step"] > 0
    assert again["flat_vla"]["parameters"] < again["joint"]["parameters"], "no world model"
    assert "| `flat_vla` |" in readme.read_text() and "| `joint` |" in readme.read_text()
    # --reuse-fits evaluates the saved policy again and keeps its training time
    fitted = (out / "joint" / "policy" / "policy_config.json").stat().st_mtime_ns
    _benchmark("formulations.py", *(["--formulations", "joint", "--reuse-fits"] + args[2:]))
    third = json.loads((out / "formulations.json").read_text())["runs"]
    assert third["joint"]["s_per_step"] == again["joint"]["s_per_step"]
    assert (out / "joint" / "policy" / "policy_config.json").stat().st_mtime_ns == fitted


def _table(text: str, figure: str) -> dict[str, list[str]]:
    """The rows of a README table, by their first cell."""
    body = text.split(f"<!-- figure: {figure} -->")[1].split(f"<!-- /figure: {figure} -->")[0]
    rows = [line.strip("|").split("|") for line in body.strip().splitlines()[2:]]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


@pytest.mark.slow
def test_latency_writes_its_replay_and_closed_loop_tables(tiny_policy_dir, mt10_dataset, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "<!-- figure: latency -->\nold\n<!-- /figure: latency -->\n"
        "<!-- figure: latency_replay -->\nold\n<!-- /figure: latency_replay -->\n"
    )
    args = ["--policy", tiny_policy_dir, "--dataset", mt10_dataset[0], "--replay-episodes", "2"]
    args += ["--modes", "every tier every chunk", "flat", "full", "--readme", readme]
    _benchmark("latency.py", *args, "--episodes", "0", "--figure", "latency_replay")
    replay = _table(readme.read_text(), "latency_replay")
    assert list(replay) == ["every tier every chunk", "flat", "full"]
    # columns: warm-up s, replay ms, x flat, then encode, subgoal, features, imagine, action
    assert replay["flat"][2] == "1.00x" and replay["flat"][3] == "-" and replay["flat"][6] == "-"
    assert replay["flat"][5].endswith("(100%)"), "a flat VLA runs its VLM every chunk"
    assert replay["every tier every chunk"][6].endswith("(100%)"), "imagines every chunk"
    share = replay["full"][4].split("(")[1]
    assert replay["full"][6].split("(")[1] == share, "by default it imagines with each subgoal"
    assert replay["full"][3].split("(")[1] == share, "and encodes the frame only to imagine"
    assert share != "100%)", "the tiny policy keeps a subgoal for more than one chunk"
    assert replay["full"][5] == "-", "by default no chunk runs the VLM's prefix pass alone"
    _benchmark("latency.py", *args, "--episodes", "1", "--tasks", "reach-v3", "--max-steps", "12")
    closed = _table(readme.read_text(), "latency")
    assert "old" not in readme.read_text() and list(closed) == list(replay)
    # replay, closed loop ms, x flat, imagine p50, refreshes, control step, success
    assert closed["flat"][2] == "1.00x" and closed["flat"][3] == "-"
    assert all(float(row[1]) > 0 for row in closed.values())
    assert all(row[6] in ("0% [0–79%]", "100% [21–100%]") for row in closed.values())


def test_pool_pairs_runs_episode_by_episode(tmp_path):
    """Runs pool by concatenating each mode's outcomes; a run's own names for a mode are
    renamed for it alone (two modes can swap); a mode missing from a run is left out."""
    first = {"outcomes": {"full": [1, 1, 0, 0], "flat": [1, 0, 0, 0], "K=1": [1, 1, 0, 0]}}
    # the second run named the reference otherwise, and ran no K=1
    second = {"outcomes": {"old default": [1, 1], "full": [0, 0], "flat": [1, 1]}}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, record in zip(paths, (first, second), strict=True):
        path.write_text(json.dumps(record))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- figure: pooled -->\nold\n<!-- /figure: pooled -->\n")
    swap = ["--rename", paths[1], "old default", "full", "--rename", paths[1], "full", "other"]
    _benchmark("pool.py", *paths, "--reference", "full", *swap, "--readme", readme)
    table = _table(readme.read_text(), "pooled")
    assert list(table) == ["full", "flat"], "K=1 is missing from the second run"
    assert table["full"][:3] == ["6", "67% [30–90%]", "-"]
    # flat solved 3 of 6 against full's 4 of 6: one episode lost (the first run's second), none won
    assert table["flat"][2].startswith("-16.7 [") and table["flat"][2].endswith("(0 / 1)")
    with pytest.raises(SystemExit, match="no mode 'nothing'"):
        _run_script("pool.py", *paths, "--reference", "full", "--rename", paths[0], "nothing", "x")


MISSING = {  # each script's required inputs, named where nothing exists
    "ablation.py": ["--policy"],
    "diagnose.py": ["--policy", "--data"],
    "finetune.py": ["--base", "--data"],
    "formulations.py": ["--data"],
    "latency.py": ["--policy", "--dataset"],
    "misses.py": ["--policy"],
    "learning_curve.py": ["--run"],
    "sensitivity.py": ["--policy", "--data"],
}
OTHER_ARGS = {
    "learning_curve.py": ["--steps", "1000", "--figure", "mt10_curve"],
    "diagnose.py": ["--figure", "diagnosis_quickstart"],
}


@pytest.mark.parametrize("script", sorted(MISSING))
def test_a_benchmark_refuses_a_readme_without_its_markers_before_it_runs(script, tmp_path):
    """A README that lacks the table's markers stops the benchmark at once, naming them, before
    minutes of rollouts or training (the inputs named here do not even exist). The script runs
    in this process as `python benchmarks/<script>` runs it (runpy), which saves a fresh
    interpreter's imports per script; its one line is the message of its SystemExit, which
    Python prints without a traceback."""
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    args = [a for flag in MISSING[script] for a in (flag, tmp_path / "none")]
    args += OTHER_ARGS.get(script, [])
    with pytest.raises(SystemExit) as done:
        _run_script(script, *args, "--readme", readme)
    message = done.value.code
    assert isinstance(message, str), f"{script} exited with {message!r}, not one line"
    assert "must hold the markers" in message and "figure:" in message
    if "--figure" in args:
        assert f"figure: {args[args.index('--figure') + 1]}" in message
    assert readme.read_text() == "no markers here\n"
    assert not (tmp_path / "none").exists()
