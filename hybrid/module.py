"""The LightningModule: trains every tier of the hierarchy jointly from one batch.

It coordinates; the networks live in `experts/` and are composed by `HybridPolicy`, built in
`setup` from the DataModule (the tiny VLM's tokenizer trains on the dataset's text, FAST fits its
action chunks, normalisation comes from its statistics). Each loss is logged on its own
(`train/loss_lang`, `val/loss_world`, ...) and summed with the weights from the YAML. Validation
also measures what the planner relies on: the world model's future-latent error against the
copy-the-current-frame baseline, and the Spearman correlation of the value head with progress.
An exponential moving average of the weights (EMA) is kept beside them; validation and the export
use it. At the end of `fit` the policy is exported with `HybridPolicy.save_pretrained`: the
directory the planner loads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from hybrid.data.datamodule import HybridDataModule
from hybrid.data.windows import SCENE_KEY
from hybrid.latent_cache import LatentCache
from hybrid.policy import HybridPolicy

DEFAULT_WEIGHTS = {
    "lang": 1.0,
    "fast": 0.5,
    "world": 1.0,
    "value": 1.0,
    "action": 1.0,
    "vae": 1.0,
    "scene": 1.0,
    "plan": 1.0,
}


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Rank correlation of two 1-D tensors (ties broken by order)."""
    rx, ry = x.argsort().argsort().float(), y.argsort().argsort().float()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-12)


@dataclass
class Experts:
    """Each expert's constructor arguments (`HybridPolicy.create`), as `model.experts` in YAML.
    Config files stacked on the command line merge per entry: a later file that gives
    `action_expert` replaces that whole entry and keeps the others. `world_model: false` builds
    no world model (the flat VLA); `action_expert: false`, with `world_model.action_frames:
    true`, no action expert (`latent_frame_actions`); `latent_plan` builds the plan expert
    (`configs/formulation/latent_plan.yaml`)."""

    vlm: dict | None = None
    world_model: dict | bool | None = None
    action_expert: dict | bool | None = None
    fast: dict | None = None
    latent_plan: dict | None = None


class HybridModule(L.LightningModule):
    """Joint training of the VLM, world model and action expert.

    Args:
        experts: the experts' constructor arguments, by section (`vlm`, `world_model`,
            `action_expert`, `fast`), as in `configs/model/*.yaml`.
        loss_weights: weight of each loss term in the sum; missing terms weigh 1.
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to 10%.
        export_dir: where the policy directory goes at the end of fit; default
            `<log dir>/policy`.
        val_imagine_steps: flow steps of the world model in the validation metrics.
        visual_dropout, language_dropout: condition dropout for the action expert, so the
            planner's flat (no visual subgoal) and no-language-subgoal modes stay valid.
        imagined_share: share of samples whose visual subgoal is the world model's own estimate
            of the future rather than the true future frame (`HybridPolicy.losses`).
        ema_decay: decay of the weights' moving average, ramped up as (1 + n) / (10 + n) over
            the first steps n; None keeps no average.
        vlm_rows: samples of each training batch the VLM's language and FAST losses train on
            (None: all); the other samples' features come from a cheaper pass without gradient
            (`HybridPolicy.losses`). 8 of 32 cuts the quickstart's step time by a third.
        clip_per_expert: the trainer's `gradient_clip_val` bounds each expert's gradient norm on
            its own rather than the whole policy's: the experts learn from separate losses
            (knowledge insulation), and one clipped norm lets the largest (the VLM's, under its
            FAST loss) shrink every other expert's steps as well. Measured after 1,000 steps of
            configs/experiment/scene_estimator.yaml: norms VLM 1.1-1.6, world model 0.5-1.2,
            action expert 0.5-0.7, so one clip at 1.0 scaled every step by about 0.6; clipped
            per expert, that recipe's success and scene error stayed within their intervals
            and spread (README).
        lr_scale: multipliers of `lr` by parameter name in the policy: a key (an expert, or a
            module inside one, e.g. `action_expert.estimator`) scales the rate of every
            parameter under it, the longest matching key winning; the schedule scales them all
            alike. A key that names no trained parameter is an error.
        scene_future: the action expert's scene estimator also learns from each sample's future
            frame (False: from the current frame, and the frames of `data.scene_root`, alone).
            The future frame is a demonstration frame like the current one; dropping it saves a
            third of the estimator's images per step where a second dataset gives it others.
        channels_last: keep the policy's 4-D weights in channels-last memory order, which the
            CPU's convolution kernels (oneDNN) run faster: 11% off a quickstart step on the
            2-core machine (README). The exported weights are the same numbers either way.
        vae_steps: the world model's tiny VAE trains for this many steps and is then frozen
            (`WorldModel.freeze_vae`; None: it trains throughout). Whenever the VAE is frozen
            (after these steps, or a pretrained one from the start) each frame is encoded once
            and its latent kept (`hybrid.latent_cache`) instead of encoding the batch's current
            and future frames every step. From the freeze on, the VAE's average is the frozen VAE.
    """

    def __init__(
        self,
        experts: Experts | dict | None = None,
        loss_weights: dict[str, float] | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        export_dir: str | None = None,
        val_imagine_steps: int = 4,
        visual_dropout: float = 0.1,
        language_dropout: float = 0.1,
        imagined_share: float = 0.5,
        ema_decay: float | None = 0.999,
        vlm_rows: int | None = None,
        clip_per_expert: bool = False,
        lr_scale: dict[str, float] | None = None,
        scene_future: bool = True,
        channels_last: bool = False,
        vae_steps: int | None = None,
    ):
        super().__init__()
        if not lr > 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if weight_decay < 0 or warmup_steps < 0:
            raise ValueError(
                f"model.weight_decay and model.warmup_steps must be >= 0, got {weight_decay} and "
                f"{warmup_steps}"
            )
        for name, share in (
            ("visual_dropout", visual_dropout),
            ("language_dropout", language_dropout),
            ("imagined_share", imagined_share),
        ):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"model.{name} must be in [0, 1], got {share}")
        unknown = sorted(set(loss_weights or {}) - set(DEFAULT_WEIGHTS))
        if unknown or any(w < 0 for w in (loss_weights or {}).values()):
            raise ValueError(
                f"model.loss_weights: expected weights >= 0 for {sorted(DEFAULT_WEIGHTS)}, got "
                f"{loss_weights}"
            )
        if vlm_rows is not None and vlm_rows < 1:
            raise ValueError(
                f"vlm_rows must be a positive number of samples or None, got {vlm_rows}"
            )
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")
        if vae_steps is not None and vae_steps < 0:
            raise ValueError(f"model.vae_steps must be >= 0 or None, got {vae_steps}")
        if any(not scale > 0 for scale in (lr_scale or {}).values()):
            raise ValueError(f"model.lr_scale: every multiplier must be > 0, got {lr_scale}")
        if isinstance(experts, Experts):  # saved as a plain dict: checkpoints hold no classes
            experts = {k: v for k, v in asdict(experts).items() if v is not None}
        self.save_hyperparameters()
        self.weights = {**DEFAULT_WEIGHTS, **(loss_weights or {})}
        self.policy: HybridPolicy | None = None
        self._val_values: list[torch.Tensor] = []
        # read here, not from hparams: a subclass saves its own signature as its hyperparameters
        self.train_conditioning = {
            "visual_dropout": visual_dropout,
            "language_dropout": language_dropout,
            "imagined_share": imagined_share,
            "vlm_rows": vlm_rows,
            "scene_future": scene_future,
        }
        self.ema_decay = ema_decay
        self.channels_last = channels_last
        self.clip_per_expert = clip_per_expert
        self.lr_scale = dict(lr_scale or {})
        self.ema: dict[str, torch.Tensor] | None = None  # parameter name -> averaged value
        self.vae_steps = vae_steps
        self.latent_cache = LatentCache()

    # 1. building the policy from the data ---------------------------------------------------------
    def _datamodule(self, stage: str) -> HybridDataModule:
        dm = self.trainer.datamodule
        if not isinstance(dm, HybridDataModule):
            raise TypeError(
                f"{type(self).__name__} trains from a HybridDataModule, got {type(dm).__name__}"
            )
        dm.setup(stage)
        return dm

    def setup(self, stage: str) -> None:
        if self.policy is not None:
            return
        dm = self._datamodule(stage)
        spec, stats = dm.embodiment_spec(), dm.norm_stats()
        # an expert that acts on its scene estimate must learn it: refuse data without a scene
        expert = (self.hparams.experts or {}).get("action_expert") or {}
        if expert.get("scene_input") and SCENE_KEY not in stats:
            raise ValueError(
                f"model.experts.action_expert reads a scene (scene_input: true), but dataset "
                f"{dm.hparams.root} records none ({SCENE_KEY}; collected before scenes were "
                "recorded), so its estimate would never learn: collect the data again with "
                "`hybrid collect`, or train a recipe without scene_input"
            )
        # an expert not told the plan's age learns worse from lagged plans (README, "Planning")
        experts, plan_lag = self.hparams.experts or {}, dm.hparams.plan_lag
        no_plan_to_reuse = experts.get("action_expert") is False or experts.get("latent_plan")
        if plan_lag and no_plan_to_reuse:
            raise ValueError(
                f"data.plan_lag {plan_lag} trains an action expert on reused plans, "
                "but this formulation has none to reuse (no action expert, or a latent plan drawn "
                "every chunk): set data.plan_lag: 0"
            )
        if plan_lag != expert.get("plan_lag", 0):
            raise ValueError(
                f"data.plan_lag is {plan_lag} but "
                f"model.experts.action_expert.plan_lag is {expert.get('plan_lag', 0)}: the expert "
                "learns the lags the data draws, so set both to the same number of steps"
            )
        if dm.hparams.get("scene_root") and not expert.get("scene_estimator"):
            raise ValueError(
                f"data.scene_root {dm.hparams.scene_root} trains the action expert's scene "
                "estimator, but model.experts.action_expert has none (scene_estimator: "
                f"{expert.get('scene_estimator', 0)}): set scene_estimator > 0 (e.g. "
                "configs/experiment/scene_estimator.yaml), or drop data.scene_root"
            )
        self.policy = HybridPolicy.create(
            dm.train_set.texts(),
            dm.train_set.action_chunks(),
            [spec],
            {spec.name: stats},
            **(self.hparams.experts or {}),
        )
        if self.channels_last:
            self.policy.to(memory_format=torch.channels_last)
        sizes = ", ".join(
            f"{name.replace('_', ' ')} {get_human_readable_count(count)}"
            for name, count in self.policy.parameter_counts().items()
        )
        rank_zero_info(f"policy: {sizes} parameters")

    # 2. the step ----------------------------------------------------------------------------------
    def cached_latents(self, batch: dict) -> dict[str, torch.Tensor]:
        """`latents` and `future_latents` of the batch's frames from the cache while the VAE is
        frozen; nothing while it trains (or without a world model, or frame indices)."""
        wm = self.policy.world_model
        if wm is None or wm.train_vae or "future_frame_index" not in batch:
            return {}
        episode = batch["episode_index"]
        return {
            name: self.latent_cache(wm.encode, batch[images], episode, batch[frame])
            for name, images, frame in (
                ("latents", "images", "frame_index"),
                ("future_latents", "future_images", "future_frame_index"),
            )
        }

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        wm = self.policy.world_model
        if self.vae_steps is None or wm is None or not wm.train_vae:
            return
        if self.global_step < self.vae_steps:  # checked at every step: also on a resume past it
            return
        wm.freeze_vae()
        if self.ema is not None:  # its average becomes the frozen VAE the latents come from,
            vae = {id(p) for p in wm.vae.parameters()}  # for the export and a checkpoint's `ema`
            for name, param in self.policy.named_parameters():
                if id(param) in vae and name in self.ema:
                    self.ema[name] = param.detach().clone()

    def _common_step(self, batch: dict, stage: str) -> torch.Tensor:
        conditioning = self.train_conditioning if stage == "train" else {}
        batch = batch | self.cached_latents(batch)
        losses = self.policy.losses(batch, **conditioning)
        for name, value in losses.items():
            if not torch.isfinite(value):
                raise FloatingPointError(
                    f"{stage} loss '{name}' is {value.item()} at global step {self.global_step} "
                    f"(episodes {sorted(set(batch['episode_index'].tolist()))}); check the batch "
                    "for NaN/inf and lower the learning rate"
                )
        total = sum(self.weights[name] * value for name, value in losses.items())
        size = len(batch["state"])
        for name, value in losses.items():
            self.log(f"{stage}/loss_{name}", value, batch_size=size, sync_dist=stage != "train")
        self.log(f"{stage}/loss", total, batch_size=size, prog_bar=True, sync_dist=stage != "train")
        return total

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._common_step(batch, "val")
        self._planning_metrics(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._common_step(batch, "test")
        self._planning_metrics(batch, "test")

    @torch.no_grad()
    def _planning_metrics(self, batch: dict, stage: str) -> None:
        """World model vs copying the current frame (latent MSE), and the value head's outputs
        for the rank correlation at the end of the epoch; nothing without a world model."""
        wm, size = self.policy.world_model, len(batch["state"])
        if wm is None:
            return
        features, mask = self.policy.vlm.prefix_features(
            batch["images"], list(batch["instruction"]), list(batch["subgoal"])
        )
        cached = self.cached_latents(batch)
        if cached:
            current, future = cached["latents"], cached["future_latents"]
        else:
            current, future = wm.encode(batch["images"]), wm.encode(batch["future_images"])
        if wm.transformer is not None or self.policy.joint:  # something imagines the future
            imagined = self.policy.imagine_batch(
                batch, current, features, mask, self.hparams.val_imagine_steps
            )
            errors = (("world_mse", imagined - future), ("copy_mse", current - future))
            for name, error in errors:
                self.log(f"{stage}/{name}", error.square().mean(), batch_size=size, sync_dist=True)
        values = wm.score(current[:, None], features, mask)[:, 0]
        self._val_values.append(torch.stack([values, batch["progress"].to(values.dtype)]))

    def _log_value_correlation(self, stage: str) -> None:
        if not self._val_values:
            return
        values, progress = torch.cat(self._val_values, dim=1)
        self._val_values.clear()
        self.log(f"{stage}/value_spearman", spearman(values, progress), sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self._swap_ema()

    def on_validation_epoch_end(self) -> None:
        self._swap_ema()
        self._log_value_correlation("val")

    def on_test_epoch_end(self) -> None:
        self._log_value_correlation("test")

    # 3. optimisation ------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """One AdamW group per learning rate (`lr_scale`), each with the weight decay."""
        return self.scaled_groups([(self._trained(), self.hparams.weight_decay)])

    def scaled_groups(self, parts: list[tuple[dict[str, torch.Tensor], float]]) -> list[dict]:
        """AdamW groups: each part (parameters by name in the policy, weight decay) split by
        learning rate, the longest `lr_scale` key naming a parameter or a module above it
        winning. A key that names no parameter of any part is an error."""
        scales, matched, out = self.lr_scale, set(), []
        for named, decay in parts:
            groups: dict[float, list] = {}
            for name, param in named.items():
                name = name.replace("_fsdp_wrapped_module.", "")  # FSDP's wrappers, if any
                keys = [k for k in scales if name == k or name.startswith(f"{k}.")]
                key = max(keys, key=len, default=None)
                matched.add(key)
                groups.setdefault(scales.get(key, 1.0), []).append(param)
            out += [
                {"params": params, "lr": self.hparams.lr * scale, "weight_decay": decay}
                for scale, params in groups.items()
            ]
        unmatched = sorted(set(scales) - matched)
        if unmatched:
            raise ValueError(
                f"model.lr_scale: {unmatched} name no trained parameter of the policy; keys are "
                f"dotted module names under it, e.g. {list(self.policy.expert_names)} or "
                "action_expert.estimator"
            )
        return out

    def configure_optimizers(self):
        hp = self.hparams
        # Fused: one kernel updates every tensor (12 ms a step against 61 ms for the loop over
        # the quickstart's 445 tensors on the 2-core CPU). Lightning's mixed precision refuses
        # to clip the gradients of an optimiser that unscales them itself, as a fused one does,
        # so under it torch picks its default.
        fused = not isinstance(self.trainer.precision_plugin, MixedPrecision)
        optimiser = torch.optim.AdamW(self.param_groups(), lr=hp.lr, fused=fused or None)
        total = max(self.trainer.estimated_stepping_batches, hp.warmup_steps + 1)

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = (step - hp.warmup_steps) / max(total - hp.warmup_steps, 1)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
        return {
            "optimizer": optimiser,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Lightning's clipping, except: per expert with `clip_per_expert`; under FSDP, by norm
        through the root sharded module (Lightning's own FSDP precision refuses norm clipping,
        and `torch.nn.utils.clip_grad_norm_` would see only this rank's shards). The FSDP path
        has not run here: no machine with GPUs was lent since it was written."""
        norm = gradient_clip_algorithm in (None, "norm")
        fsdp = isinstance(self.trainer.strategy, FSDPStrategy)
        if self.clip_per_expert and gradient_clip_val and (fsdp or not norm):
            raise ValueError(
                "model.clip_per_expert clips each expert's gradient norm in place: it needs "
                "trainer.gradient_clip_algorithm 'norm' and a strategy other than fsdp, got "
                f"{gradient_clip_algorithm!r} under {type(self.trainer.strategy).__name__}"
            )
        if fsdp and gradient_clip_val and norm:
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        elif self.clip_per_expert and gradient_clip_val:
            for name in self.policy.expert_names:
                expert = getattr(self.policy, name)
                params = [p for p in getattr(expert, "parameters", list)() if p.grad is not None]
                if params:  # FAST is a tokenizer: nothing learned by gradient
                    torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # 4. the weights' moving average --------------------------------------------------------------
    def _trained(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.policy.named_parameters() if p.requires_grad}

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema_decay is None:
            return
        params = self._trained()
        if self.ema is None:
            self.ema = {n: p.detach().clone() for n, p in params.items()}
            return
        n = self.global_step
        decay = min(self.ema_decay, (1 + n) / (10 + n))
        with torch.no_grad():  # one fused update of every tensor, as in torch.optim.swa_utils
            averages = [self.ema[name] for name in params]
            torch._foreach_lerp_(averages, [p.detach() for p in params.values()], 1 - decay)

    def _swap_ema(self) -> None:
        """Exchange the live weights and their average (a second call swaps back)."""
        if self.ema is None:
            return
        with torch.no_grad():
            for name, param in self._trained().items():
                live = param.detach().clone()
                param.copy_(self.ema[name])
                self.ema[name] = live

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.ema = checkpoint.get("ema")

    # 5. export ------------------------------------------------------------------------------------
    def export_dir(self) -> Path:
        if self.hparams.export_dir:
            return Path(self.hparams.export_dir)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "policy"

    def on_fit_end(self) -> None:
        self._swap_ema()  # the average is what is exported
        if self.trainer.is_global_zero:
            directory = self.export_dir()
            self.policy.save_pretrained(directory)
            rank_zero_info(f"exported the policy to {directory}")
        self._swap_ema()
