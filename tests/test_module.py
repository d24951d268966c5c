"""The LightningModule in the real Lightning loop, on the real Meta-World collection."""

import lightning as L
import pytest
import torch

from hybrid.data.datamodule import HybridDataModule
from hybrid.module import HybridModule, spearman
from hybrid.policy import HybridPolicy

SMALL = dict(
    vlm=dict(text_hidden=64, text_layers=2, vision_hidden=32, vision_layers=1),
    world_model=dict(vae_channels=(16, 16, 32, 32), hidden=32, num_layers=1, value_hidden=32),
    action_expert=dict(hidden=32, num_layers=1, image_size=64),
    fast=dict(vocab_size=128),
)


def _trainer(tmp_path, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def _datamodule(root):
    return HybridDataModule(
        str(root), chunk_size=8, future_offset=8, batch_size=8, val_fraction=0.3
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_dev_run_trains_validates_and_exports(mt10_dataset, tmp_path, channels_last):
    module = HybridModule(
        experts=SMALL,
        export_dir=str(tmp_path / "policy"),
        warmup_steps=1,
        channels_last=channels_last,
    )
    trainer = _trainer(tmp_path, fast_dev_run=2)
    trainer.fit(module, _datamodule(mt10_dataset[0]))
    logged = trainer.callback_metrics
    for name in ("lang", "fast", "world", "value", "vae", "action"):
        assert torch.isfinite(logged[f"train/loss_{name}"]), name
        assert torch.isfinite(logged[f"val/loss_{name}"]), name
    for name in ("val/world_mse", "val/copy_mse", "val/value_spearman"):
        assert torch.isfinite(logged[name]), name
    conv = module.policy.world_model.vae.encoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert conv.is_contiguous() != channels_last
    loaded = HybridPolicy.from_pretrained(tmp_path / "policy")
    # the weights' moving average is what is exported; the live weights stay in the module
    exported = {**module.policy.state_dict(), **module.ema}
    for key, value in exported.items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    live = module.policy.state_dict()
    assert any(not torch.equal(live[k], v) for k, v in module.ema.items()), "an average, not a copy"


def test_the_vae_freezes_after_vae_steps_and_its_latents_are_then_cached(mt10_dataset, tmp_path):
    module = HybridModule(
        experts=SMALL, export_dir=str(tmp_path / "policy"), warmup_steps=1, vae_steps=2
    )
    seen = []  # the VAE's first weights before each step

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.policy.world_model.vae.encoder.conv_in.weight.detach().clone())

    trainer = _trainer(tmp_path, max_steps=4, limit_val_batches=1, callbacks=[Watch()])
    datamodule = _datamodule(mt10_dataset[0])
    trainer.fit(module, datamodule)
    wm = module.policy.world_model
    assert not torch.equal(seen[0], seen[1]), "the VAE trains for its first two steps"
    assert torch.equal(seen[2], seen[3]) and torch.equal(seen[3], wm.vae.encoder.conv_in.weight)
    assert not wm.train_vae and not any(p.requires_grad for p in wm.vae.parameters())
    assert len(module.latent_cache) > 0
    # a batch's cached latents are its frames' encodings by the frozen VAE
    batch = next(iter(datamodule.val_dataloader()))
    cached = module.cached_latents(batch)
    assert torch.allclose(cached["latents"], wm.encode(batch["images"]), atol=1e-5)
    assert torch.allclose(cached["future_latents"], wm.encode(batch["future_images"]), atol=1e-5)
    # the export holds the frozen VAE the latents came from, and the other weights' average
    loaded = HybridPolicy.from_pretrained(tmp_path / "policy").state_dict()
    for key, value in module.policy.state_dict().items():
        if key.startswith("world_model.vae."):
            assert torch.equal(value, loaded[key]), key
    # and the average holds that VAE too, for what reads a checkpoint's average (learning_curve)
    assert any(".vae." in k for k in module.ema)
    assert all(torch.equal(v, loaded[k]) for k, v in module.ema.items())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_optimiser_is_fused_unless_mixed_precision_clips(mt10_dataset, tmp_path, precision):
    """AdamW is fused where Lightning can clip its gradients; under mixed precision, which
    refuses to clip for an optimiser that unscales gradients itself (a fused one), it is torch's
    default. Either way a fit with gradient clipping trains."""
    module = HybridModule(experts=SMALL, export_dir=str(tmp_path / "policy"), warmup_steps=1)
    trainer = _trainer(tmp_path, fast_dev_run=2, precision=precision, gradient_clip_val=1.0)
    trainer.fit(module, _datamodule(mt10_dataset[0]))
    assert bool(trainer.optimizers[0].defaults["fused"]) == (precision == "32-true")
    assert torch.isfinite(trainer.callback_metrics["train/loss_action"])
    steps = {int(state["step"]) for state in trainer.optimizers[0].state.values()}
    assert steps == {2}, "every parameter was updated at both steps"


FORMULATIONS = {  # the formulations whose experts differ from the hierarchy's in what they learn
    "latent_frame_actions": dict(
        world_model=dict(SMALL["world_model"], action_frames=True), action_expert=False
    ),
    "latent_plan": dict(
        world_model=dict(SMALL["world_model"], flow=False),
        latent_plan=dict(plan_tokens=4, plan_dim=8, hidden=32, num_layers=1),
    ),
}


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_a_formulation_trains_validates_and_exports_with_the_recipes_weights(
    mt10_dataset, tmp_path, formulation
):
    """Each loss a formulation adds (`plan`) has a weight, also where the recipe names its own
    (the quickstart's `loss_weights`), and the policy exports and loads."""
    experts = SMALL | FORMULATIONS[formulation]
    module = HybridModule(
        experts=experts,
        export_dir=str(tmp_path / "policy"),
        warmup_steps=1,
        loss_weights={"lang": 1.0, "fast": 0.5, "action": 1.0},
    )
    trainer = _trainer(tmp_path, fast_dev_run=1)
    trainer.fit(module, _datamodule(mt10_dataset[0]))
    names = {"action", "value"} | ({"plan"} if formulation == "latent_plan" else {"world"})
    for name in names:
        assert torch.isfinite(trainer.callback_metrics[f"train/loss_{name}"]), name
    loaded = HybridPolicy.from_pretrained(tmp_path / "policy")
    assert (loaded.latent_plan is not None) == (formulation == "latent_plan")
    assert (loaded.action_expert is None) == (formulation == "latent_frame_actions")


class _PoisonBatch(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 1:
            batch["state"][0, 0] = float("nan")


def test_a_nan_in_the_batch_stops_training_naming_the_loss(mt10_dataset, tmp_path):
    module = HybridModule(experts=SMALL, export_dir=str(tmp_path / "policy"))
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[_PoisonBatch()])
    with pytest.raises(FloatingPointError, match=r"train loss 'action' is nan at global step 1"):
        trainer.fit(module, _datamodule(mt10_dataset[0]))
    assert not (tmp_path / "policy").exists(), "a failed run exports nothing"


def test_spearman():
    x = torch.tensor([0.1, 0.4, 0.2, 0.9])
    assert spearman(x, x * 3 + 1) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


class _NormsAtStep(L.Callback):
    """Each expert's gradient norm as the optimiser stepped: Lightning runs the loss, backward and
    clipping inside `step`, so the gradients are read after it."""

    def __init__(self):
        self.norms: list[dict[str, float]] = []

    def on_train_start(self, trainer, module):
        def record(optimiser, args, kwargs):
            norms = {}
            for name in module.policy.expert_names:
                expert = getattr(module.policy, name)
                grads = [
                    p.grad for p in getattr(expert, "parameters", list)() if p.grad is not None
                ]
                if grads:  # FAST is a tokenizer: nothing learned by gradient
                    squares = sum(float(g.square().sum()) for g in grads)
                    norms[name] = squares**0.5
            self.norms.append(norms)

        trainer.optimizers[0].register_step_post_hook(record)


@pytest.mark.parametrize("per_expert", [True, False])
def test_gradient_clipping_bounds_each_expert_or_the_whole_policy(
    mt10_dataset, tmp_path, per_expert
):
    clip = 1e-3  # far below any expert's gradient norm: every bound is active
    module = HybridModule(experts=SMALL, export_dir=str(tmp_path / "p"), clip_per_expert=per_expert)
    norms = _NormsAtStep()
    trainer = _trainer(
        tmp_path, max_steps=2, limit_val_batches=0, gradient_clip_val=clip, callbacks=[norms]
    )
    trainer.fit(module, _datamodule(mt10_dataset[0]))
    assert len(norms.norms) == 2 and all(len(step) == 3 for step in norms.norms), norms.norms
    for step in norms.norms:
        total = sum(n**2 for n in step.values()) ** 0.5
        if per_expert:
            assert all(n == pytest.approx(clip, rel=1e-3) for n in step.values()), step
            assert total > 1.5 * clip, "each expert keeps its own step"
        else:
            assert total == pytest.approx(clip, rel=1e-3), step


def test_lr_scale_sets_the_rate_of_the_named_module_through_the_schedule(mt10_dataset, tmp_path):
    experts = {**SMALL, "action_expert": {**SMALL["action_expert"], "scene_dim": 9}}
    experts["action_expert"]["scene_estimator"] = 4
    scale = {"action_expert": 0.5, "action_expert.estimator": 4.0}
    module = HybridModule(
        experts=experts, export_dir=str(tmp_path / "p"), lr=1e-3, warmup_steps=2, lr_scale=scale
    )
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(module, _datamodule(mt10_dataset[0]))
    groups = trainer.optimizers[0].param_groups
    estimator = {id(p) for p in module.policy.action_expert.estimator.parameters()}
    expert = {id(p) for p in module.policy.action_expert.parameters()} - estimator
    rate = {}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        if ids & estimator:
            assert ids == estimator, "the longest key takes the estimator, nothing else"
            rate["estimator"] = group["lr"]
        elif ids & expert:
            assert ids == expert
            rate["expert"] = group["lr"]
        else:
            rate["rest"] = group["lr"]
    assert len(groups) == 3
    # after three steps the schedule has moved every rate alike
    assert rate["rest"] != pytest.approx(1e-3)
    assert rate["estimator"] == pytest.approx(4.0 * rate["rest"])
    assert rate["expert"] == pytest.approx(0.5 * rate["rest"])


def test_an_lr_scale_key_that_names_nothing_is_an_error(mt10_dataset, tmp_path):
    module = HybridModule(
        experts=SMALL, export_dir=str(tmp_path / "p"), lr_scale={"action_expert.estimatr": 3.0}
    )
    with pytest.raises(ValueError, match=r"estimatr.*name no trained parameter"):
        _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(
            module, _datamodule(mt10_dataset[0])
        )
    with pytest.raises(ValueError, match="must be > 0"):
        HybridModule(experts=SMALL, lr_scale={"vlm": 0.0})


def test_a_recipe_that_acts_on_the_scene_refuses_data_that_records_none(mt10_dataset, tmp_path):
    """A collection made before scenes were recorded: the column, its feature and its statistics
    are gone. An expert that reads its scene estimate would act on an estimator nothing trained,
    so the fit stops before the first step, naming the dataset and the fix."""
    import json
    import shutil

    import pyarrow.parquet as pq

    from hybrid.data.windows import SCENE_KEY

    old = tmp_path / "old"
    shutil.copytree(mt10_dataset[0], old)
    for path in (old / "data").rglob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns([SCENE_KEY]), path)
    for name in ("info.json", "stats.json"):
        meta = json.loads((old / "meta" / name).read_text())
        (meta["features"] if name == "info.json" else meta).pop(SCENE_KEY)
        (old / "meta" / name).write_text(json.dumps(meta))
    expert = dict(SMALL["action_expert"], scene_dim=9, scene_estimator=4, scene_input=True)
    experts = {**SMALL, "action_expert": expert}
    module = HybridModule(experts=experts, export_dir=str(tmp_path / "p"))
    with pytest.raises(ValueError, match=r"reads a scene.*records none.*hybrid collect"):
        _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, _datamodule(old))
    assert not (tmp_path / "p").exists(), "nothing exported"


def test_a_lagged_plan_trains_an_expert_told_its_age_and_refuses_one_that_is_not(
    mt10_dataset, tmp_path
):
    """`data.plan_lag` with the expert's `plan_lag`: the fit trains and exports an expert that
    reads the plan's age; data that lags the plan for an expert that learns no age (or the
    reverse) stops the fit before the first step, naming both settings."""
    lagged = dict(SMALL["action_expert"], plan_lag=3)
    module = HybridModule(
        experts={**SMALL, "action_expert": lagged}, export_dir=str(tmp_path / "policy")
    )
    data = HybridDataModule(
        str(mt10_dataset[0]), chunk_size=8, future_offset=8, batch_size=8, val_fraction=0.3,
        plan_lag=3,
    )  # fmt: skip
    _trainer(tmp_path, fast_dev_run=1).fit(module, data)
    loaded = HybridPolicy.from_pretrained(tmp_path / "policy")
    assert loaded.action_expert.config.plan_lag == 3
    for expert, lag in ((SMALL["action_expert"], 3), (lagged, 0)):
        module = HybridModule(
            experts={**SMALL, "action_expert": expert}, export_dir=str(tmp_path / "p")
        )
        data = HybridDataModule(str(mt10_dataset[0]), chunk_size=8, future_offset=8, plan_lag=lag)
        named = rf"data.plan_lag is {lag} but .*plan_lag is {3 - lag}"
        with pytest.raises(ValueError, match=named):
            _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, data)
    # a latent plan is drawn anew every chunk: no plan of an earlier frame to learn from
    experts = {**SMALL, "action_expert": lagged, "latent_plan": {"plan_tokens": 4}}
    module = HybridModule(experts=experts, export_dir=str(tmp_path / "p"))
    data = HybridDataModule(str(mt10_dataset[0]), chunk_size=8, future_offset=8, plan_lag=3)
    with pytest.raises(ValueError, match="data.plan_lag 3 .* has none to reuse.*plan_lag: 0"):
        _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, data)
    assert not (tmp_path / "p").exists(), "nothing exported"
