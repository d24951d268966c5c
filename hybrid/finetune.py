"""`hybrid finetune`: adapt a trained base policy to a new robot with LoRA, from few demonstrations.

The same LightningModule conventions and CLI as `hybrid fit` (YAML, checkpoints, `--ckpt_path last`
to resume); what differs is what trains. The base policy is loaded, the robot is added (one new row
in each per-embodiment layer, `HybridPolicy.add_embodiment`), peft LoRA adapters are attached to
each expert's declared targets (`hybrid.adapters.LoraSpec`), and everything else is frozen: the
base stays bit-identical, so every robot it already serves keeps working. At the end of fit the
adapter goes to the base's registry, `<base_policy>/adapters/<embodiment>/`, where
`HybridPlanner.from_pretrained(base_policy, embodiment=...)` finds it.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from hybrid.adapters import EmbodimentAdapters, LoraSpec, adapter_dir
from hybrid.embodiment import EmbodimentSpec
from hybrid.module import HybridModule
from hybrid.policy import HybridPolicy


class FinetuneModule(HybridModule):
    """LoRA fine-tuning of a base policy for one new embodiment.

    Args:
        base_policy: directory of the base policy (exported by `hybrid fit`).
        embodiment_spec: the new robot's spec file, e.g. `configs/embodiment/panda.yaml`; its name,
            dims and cameras must match the dataset's.
        lora: `LoraSpec` fields: rank, alpha, dropout, experts (which of vlm, world_model,
            action_expert get LoRA) and targets (per expert, a regex replacing its defaults).
        loss_weights, lr, lr_scale, weight_decay, warmup_steps, val_imagine_steps,
            visual_dropout, language_dropout, imagined_share, vlm_rows, scene_future: as for
            `hybrid fit` (`HybridModule`); `lr_scale` keys name modules of the base, and scale
            the rate of the LoRA weights inside them; weight decay applies to the LoRA weights
            only, never to the head rows.
        export_dir: where the adapter goes; default `<base_policy>/adapters/<embodiment name>`.
        scene_teacher: the share of training samples whose action path reads the true scene in
            place of its own estimate, for this fine-tune (None: the base's
            `action_expert.scene_teacher`; the base on disk is not changed). At 0 the adapter
            learns to act on the estimate it will plan with: on the panda, 29% [22-38%] over two
            seeds against 13% [7-24%] for the base's 1.0 (README).
    """

    def __init__(
        self,
        base_policy: str,
        embodiment_spec: str,
        lora: dict | None = None,
        loss_weights: dict[str, float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        export_dir: str | None = None,
        val_imagine_steps: int = 4,
        visual_dropout: float = 0.1,
        language_dropout: float = 0.1,
        imagined_share: float = 0.5,
        vlm_rows: int | None = None,
        lr_scale: dict[str, float] | None = None,
        scene_future: bool = True,
        scene_teacher: float | None = None,
    ):
        if scene_teacher is not None and not 0.0 <= scene_teacher <= 1.0:
            raise ValueError(f"model.scene_teacher must be in [0, 1] or None, got {scene_teacher}")
        super().__init__(
            experts=None,
            loss_weights=loss_weights,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            export_dir=export_dir,
            val_imagine_steps=val_imagine_steps,
            visual_dropout=visual_dropout,
            language_dropout=language_dropout,
            imagined_share=imagined_share,
            vlm_rows=vlm_rows,
            lr_scale=lr_scale,
            scene_future=scene_future,
            ema_decay=None,  # the adapter saved is the live one
        )
        self.save_hyperparameters()
        try:
            self.lora = LoraSpec(**(lora or {}))
        except TypeError as error:
            fields = list(LoraSpec.__dataclass_fields__)
            raise ValueError(f"model.lora: {error}; fields are {fields}") from error
        self.spec = EmbodimentSpec.from_yaml(embodiment_spec)
        self.adapters: EmbodimentAdapters | None = None

    def setup(self, stage: str) -> None:
        if self.policy is not None:
            return
        dm = self._datamodule(stage)
        spec, data, spec_file = self.spec, dm.embodiment_spec(), self.hparams.embodiment_spec
        for key in ("name", "state_dim", "action_dim"):
            if getattr(spec, key) != getattr(data, key):
                raise ValueError(
                    f"embodiment spec {spec_file} says {key}={getattr(spec, key)!r} "
                    f"but dataset {dm.hparams.root} has {key}={getattr(data, key)!r}; fix the "
                    "spec or use that robot's dataset"
                )
        missing = sorted(set(spec.cameras) - set(data.cameras))
        if missing:
            raise ValueError(
                f"embodiment spec {spec_file} names cameras {missing} that dataset "
                f"{dm.hparams.root} does not have (it has {data.cameras})"
            )
        policy = HybridPolicy.from_pretrained(self.hparams.base_policy)
        for key, base_value in (
            ("chunk_size", policy.action_config.chunk_size),
            ("image_size", policy.frame_size),
            ("plan_lag", policy.action_config.get("plan_lag", 0)),
        ):
            if dm.hparams[key] != base_value:
                raise ValueError(
                    f"data.{key} is {dm.hparams[key]} but the base policy "
                    f"{self.hparams.base_policy} was trained with {base_value}; "
                    f"set data.{key}: {base_value}"
                )
        if spec.name in policy.embodiments:
            raise ValueError(
                f"embodiment {spec.name!r} is already one of the base's robots "
                f"{list(policy.embodiments)}; fine-tune a robot the base does not have"
            )
        self.adapters = EmbodimentAdapters(policy, self.hparams.base_policy)
        self.adapters.attach(spec, dm.norm_stats(), self.lora)
        if policy.world_model is not None:
            policy.world_model.freeze_vae()  # the VAE is shared with the base
        teacher = self.hparams.scene_teacher
        if teacher is not None:
            expert = policy.action_expert
            if expert is None or not expert.config.scene_input:
                raise ValueError(
                    f"model.scene_teacher {teacher}: the base's action expert reads no scene "
                    "(scene_input false); drop the setting"
                )
            policy.action_expert.register_to_config(scene_teacher=teacher)  # in memory only
        self.policy = policy.train()  # from_pretrained leaves the backbones in eval mode
        lora, heads = self._trainable = self.adapters.trainable_parameters(spec.name)
        total = sum(p.numel() for p in policy.parameters())
        head_rows = sum(p[0].numel() for p in heads.values())
        trainable = sum(p.numel() for p in lora.values()) + head_rows
        rank_zero_info(
            f"fine-tuning {spec.name!r}: {trainable:,} of {total:,} parameters train "
            f"({trainable / total:.2%}: LoRA {trainable - head_rows:,}, head rows {head_rows:,})"
        )

    def param_groups(self) -> list[dict]:
        lora, heads = self._trainable
        # the other robots' rows must not decay
        return self.scaled_groups([(lora, self.hparams.weight_decay), (heads, 0.0)])

    def export_dir(self) -> Path:
        if self.hparams.export_dir:
            return Path(self.hparams.export_dir)
        return adapter_dir(self.hparams.base_policy, self.spec.name)

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            directory = self.export_dir()
            self.adapters.save(self.spec.name, directory)
            rank_zero_info(f"saved the {self.spec.name!r} adapter to {directory}")
