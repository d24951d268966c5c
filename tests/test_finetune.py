"""LoRA per embodiment end to end: `hybrid finetune` on real panda-gym demonstrations from a base
trained on Meta-World, the adapter registry, switching robots, plain peft, merging, and eval."""

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from hybrid.adapters import adapter_dir
from hybrid.data.datamodule import HybridDataModule
from hybrid.finetune import FinetuneModule
from hybrid.policy import HybridPolicy
from hybrid.types import Observation
from planners.hierarchical import HybridPlanner

PANDA_SPEC = str(Path("configs/embodiment/panda.yaml").resolve())


def _config(tmp_path, base, dataset, max_steps):
    config = {
        "model": {
            "base_policy": str(base),
            "embodiment_spec": PANDA_SPEC,
            "lora": {"rank": 4, "alpha": 8},
            "warmup_steps": 1,
            "lr": 1e-2,
            "weight_decay": 0.01,  # on the LoRA weights only: the base's rows must not decay
            "lr_scale": {"action_expert.image_in": 5.0},
        },
        "data": {"root": str(dataset), "chunk_size": 8, "future_offset": 8, "batch_size": 8},
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            # not 1: `hybrid fit` reads it as 1.0, which Lightning takes for every batch
            "limit_val_batches": 2,
            "val_check_interval": 3,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            # a logger, as the shipped config has: it merges module and data hparams
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path), "name": "csv"},
            },
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(tmp_path / "checkpoints"),
                        "every_n_train_steps": 3,
                        "save_last": True,
                    },
                }
            ],
        },
    }
    path = tmp_path / f"finetune_{max_steps}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finetuned(tiny_policy_dir, panda_dataset, tmp_path_factory, hybrid_cli):
    """A copy of the Meta-World base, fine-tuned for the panda in two runs: 3 steps, then resumed
    from `last` to 6. Returns (base directory with its adapter, run directory)."""
    tmp = tmp_path_factory.mktemp("finetune")
    base = tmp / "policy"
    shutil.copytree(tiny_policy_dir, base)
    for steps, extra in ((3, []), (6, ["--ckpt_path", "last"])):
        run = hybrid_cli(
            "finetune", "--config", _config(tmp, base, panda_dataset[0], steps), *extra
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "parameters train" in run.stdout + run.stderr
    assert list(tmp.glob("csv/version_*/metrics.csv")), "the CSV logger wrote no metrics"
    return base, tmp


def _obs(state_dim, cameras, seed=0):
    rng = np.random.default_rng(seed)
    images = {key: rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for key in cameras}
    return Observation(images, rng.normal(size=state_dim))


PANDA = ("panda", 7, ["observation.images.front"], "push the cube to the red target")
SAWYER = (
    "sawyer",
    4,
    ["observation.images.front", "observation.images.side"],
    "push the puck to the goal",
)


def _actions(planner, robot):
    _, dim, camera, instruction = robot
    planner.reset()
    return planner.plan(_obs(dim, camera), instruction).actions


def test_finetune_resumes_and_changes_only_lora_and_the_new_rows(finetuned, tiny_policy_dir):
    base, run = finetuned
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6, "the resumed run continued to step 6"
    reference = HybridPolicy.from_pretrained(tiny_policy_dir).state_dict()
    lora, grown = {}, []
    for key, value in checkpoint["state_dict"].items():
        name = key.removeprefix("policy.").replace(".base_layer", "")
        if "lora_" in name:
            lora[name] = value
            continue
        before = reference[name]
        if value.shape != before.shape:  # a per-embodiment layer: one more row, the panda's
            assert value.shape[0] == before.shape[0] + 1
            assert torch.equal(value[:-1], before), f"{name}: the sawyer row changed"
            assert not torch.equal(value[-1], before.mean(0)), (
                f"{name}: the panda row never trained"
            )
            grown.append(name)
        else:
            assert torch.equal(value, before), f"{name} changed"
    # weight and bias of the state encoder, action in, action out and the scene readout
    assert len(grown) == 8
    trained = [k for k, v in lora.items() if "lora_B" in k and v.abs().sum() > 0]
    assert trained and {k.split(".")[0] for k in trained} == {"vlm", "world_model", "action_expert"}
    # a new robot's cameras: the action expert's eyes and the keypoints' path adapt too
    for module in ("image_in.stem.0", "image_in.heatmaps", "keypoint_cond.0", "modulation.1"):
        assert any(k.startswith(f"action_expert.{module}.lora_B") for k in trained), module


def test_lr_scale_and_weight_decay_reach_the_lora_weights_as_named(finetuned):
    _, run = finetuned
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    eyes = sum("lora_" in k and ".action_expert.image_in." in k for k in checkpoint["state_dict"])
    groups = [
        (g["lr"], g["weight_decay"], len(g["params"]))
        for g in checkpoint["optimizer_states"][0]["param_groups"]
    ]
    assert len(groups) == 3 and eyes > 0, groups
    (base_lr, _, _), (eyes_lr, _, eyes_count), (heads_lr, heads_decay, heads_count) = sorted(
        groups, key=lambda g: (g[1] == 0.0, g[0])
    )
    assert eyes_count == eyes and eyes_lr == pytest.approx(5.0 * base_lr)
    # the head rows (weight and bias of the state encoder, action in/out and the scene readout)
    # at the base rate and never decayed
    assert (heads_count, heads_decay, heads_lr) == (8, 0.0, pytest.approx(base_lr))


def test_adapter_registry_holds_peft_format_and_loads_with_plain_peft(finetuned):
    from peft import PeftModel
    from safetensors.torch import load_file

    base, _ = finetuned
    directory = adapter_dir(base, "panda")
    names = {p.name for p in directory.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "embodiment_heads.safetensors",
    } <= names
    record = json.loads((directory / "embodiment.json").read_text())
    assert record["embodiment"]["state_dim"] == 7
    assert (
        record["base_fingerprint"]
        == json.loads((base / "policy_config.json").read_text())["fingerprint"]
    )
    plain = PeftModel.from_pretrained(HybridPolicy.from_pretrained(base), str(directory))
    saved = load_file(directory / "adapter_model.safetensors")
    loaded = {n.replace(".default", ""): p for n, p in plain.named_parameters() if "lora_" in n}
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_switching_robots_matches_a_fresh_load_of_each(finetuned):
    base, _ = finetuned
    planner = HybridPlanner.from_pretrained(base, embodiment="panda", num_candidates=2)
    panda_first = _actions(planner, PANDA)
    planner.set_embodiment("sawyer")
    sawyer = _actions(planner, SAWYER)
    planner.set_embodiment("panda")
    panda_again = _actions(planner, PANDA)
    fresh_panda = HybridPlanner.from_pretrained(base, embodiment="panda", num_candidates=2)
    fresh_sawyer = HybridPlanner.from_pretrained(base, embodiment="sawyer", num_candidates=2)
    assert np.array_equal(panda_first, panda_again)
    assert np.array_equal(panda_first, _actions(fresh_panda, PANDA))
    assert np.array_equal(sawyer, _actions(fresh_sawyer, SAWYER))
    # switching changed nothing on disk: the base still knows only its own robot
    plain = HybridPolicy.from_pretrained(base)
    assert planner.policy.embodiments["panda"].state_dim == 7 and "panda" not in plain.embodiments


@pytest.mark.parametrize("robot", [SAWYER, PANDA], ids=["sawyer", "panda"])
def test_no_action_ever_leaves_the_robots_limits(finetuned, robot):
    """Extreme inputs on both robots (frames all black, all white or noise; states far out, up to
    the planner's bound; the policy's action scale blown up 50x so that its raw chunks overshoot),
    synchronously and with async planning: every action sent stays within the spec's limits."""
    base, _ = finetuned
    name, dim, cameras, instruction = robot
    for switches in ({}, {"async_delay": 2}):
        planner = HybridPlanner.from_pretrained(base, embodiment=name, num_candidates=2, **switches)
        spec = planner.spec
        assert spec.action_low and spec.action_high, "the robot's limits are stored"
        normalizer = planner.policy.normalizers[name]
        shift, scale = normalizer.params["action"]
        normalizer.params["action"] = (shift, scale * 50)
        rng = np.random.default_rng(0)
        overshoot = False
        for fill in (0, 255, None):
            for magnitude in (1e2, 1e3):
                images = {
                    key: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                    if fill is None
                    else np.full((64, 64, 3), fill, np.uint8)
                    for key in cameras
                }
                std = np.asarray(planner.policy.norm_stats[name]["observation.state"]["std"])
                state = np.asarray(planner.policy.norm_stats[name]["observation.state"]["mean"])
                state = state + magnitude * std * rng.choice([-1, 1], size=dim)
                planner.reset()
                for _ in range(10):
                    action = planner.act(Observation(images, state), instruction)
                    assert action.shape == (len(spec.action_low),)
                    assert np.all(action >= spec.action_low) and np.all(action <= spec.action_high)
                raw = planner.last_plan.actions
                overshoot |= bool(((raw == spec.action_low) | (raw == spec.action_high)).any())
        assert overshoot, "the blown-up scale never reached a limit: nothing was tested"


def test_missing_adapter_and_mismatched_base_are_refused(finetuned, tmp_path):
    base, _ = finetuned
    with pytest.raises(ValueError, match=r"no adapter for embodiment 'ur5'.*\['sawyer', 'panda'\]"):
        HybridPlanner.from_pretrained(base, embodiment="ur5")
    other = HybridPolicy.from_pretrained(base)
    with torch.no_grad():
        other.action_expert.vlm_in.weight.add_(1e-3)
    other.save_pretrained(tmp_path / "other")
    shutil.copytree(base / "adapters", tmp_path / "other" / "adapters")
    with pytest.raises(ValueError, match="trained on a base with fingerprint .* this base's is"):
        HybridPlanner.from_pretrained(tmp_path / "other", embodiment="panda")


def test_a_corrupt_adapter_is_named_and_the_base_still_loads(finetuned, tmp_path):
    """Part of the fault suite (`test_faults.py`), here beside the fixture that trains one."""
    base, _ = finetuned
    copy = tmp_path / "policy"
    shutil.copytree(base, copy)
    weights = adapter_dir(copy, "panda") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"cannot read {weights} .*fine-tune 'panda' again"):
        HybridPlanner.from_pretrained(copy, embodiment="panda")
    assert HybridPlanner.from_pretrained(copy).embodiment == "sawyer"


def test_spec_that_disagrees_with_the_dataset_is_named(tiny_policy_dir, panda_dataset, tmp_path):
    spec = yaml.safe_load(Path(PANDA_SPEC).read_text()) | {"state_dim": 6}
    (tmp_path / "panda6.yaml").write_text(yaml.safe_dump(spec))
    module = FinetuneModule(str(tiny_policy_dir), str(tmp_path / "panda6.yaml"))
    data = HybridDataModule(str(panda_dataset[0]), chunk_size=8, future_offset=8, batch_size=4)
    trainer = L.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"says state_dim=6 but dataset .* has state_dim=7"):
        trainer.fit(module, data)
    module = FinetuneModule(str(tiny_policy_dir), PANDA_SPEC)
    data = HybridDataModule(str(panda_dataset[0]), chunk_size=4, future_offset=8, batch_size=4)
    with pytest.raises(ValueError, match="data.chunk_size is 4 but the base policy .* with 8"):
        trainer.fit(module, data)
    data = HybridDataModule(
        str(panda_dataset[0]), chunk_size=8, future_offset=8, batch_size=4, plan_lag=4
    )
    with pytest.raises(ValueError, match="data.plan_lag is 4 but the base policy .* with 0"):
        trainer.fit(module, data)


def test_export_merge_writes_a_standalone_policy_that_acts_like_the_adapter(
    finetuned, tmp_path, hybrid_cli
):
    base, _ = finetuned
    run = hybrid_cli(
        "export", "--policy", base, "--embodiment", "panda", "--merge", "--out", tmp_path
    )
    assert run.returncode == 0, run.stdout + run.stderr
    merged = HybridPolicy.from_pretrained(tmp_path)
    assert list(merged.embodiments) == ["panda"]
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    adapted = _actions(
        HybridPlanner.from_pretrained(base, embodiment="panda", num_candidates=2), PANDA
    )
    standalone = _actions(HybridPlanner.from_pretrained(tmp_path, num_candidates=2), PANDA)
    np.testing.assert_allclose(standalone, adapted, atol=1e-4)
    run = hybrid_cli("export", "--policy", base, "--embodiment", "ur5", "--out", tmp_path / "x")
    assert run.returncode == 2 and "'ur5'" in run.stderr and "panda" in run.stderr


@pytest.mark.slow
def test_eval_runs_the_panda_through_its_adapter(finetuned, tmp_path, hybrid_cli):
    base, _ = finetuned
    run = hybrid_cli(
        "eval", "--policy", base, "--embodiment", "panda", "--tasks", "reach", "--episodes", 1,
        "--max-steps", 10, "--workers", 1, "--num-candidates", 2, "--out", tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["embodiment"] == "panda" and set(results["tasks"]) == {"reach"}
    assert 1 <= results["episodes"][0]["steps"] <= 10


def test_scene_teacher_is_checked_and_needs_a_base_that_reads_a_scene(
    tiny_policy_dir, panda_dataset, tmp_path, hybrid_cli
):
    """`model.scene_teacher` overrides the base's share for the fine-tune: a value outside [0, 1]
    and a base whose action expert reads no scene are refused in one line, before training."""
    with pytest.raises(ValueError, match=r"scene_teacher must be in \[0, 1\]"):
        FinetuneModule(str(tiny_policy_dir), PANDA_SPEC, scene_teacher=2)
    base = tmp_path / "policy"
    shutil.copytree(tiny_policy_dir, base)
    config = _config(tmp_path, base, panda_dataset[0], 1)
    run = hybrid_cli("finetune", "--config", config, "--model.scene_teacher", "0.0")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "scene_teacher 0.0: the base's action expert reads no scene" in run.stderr
    assert not (base / "adapters").exists()
