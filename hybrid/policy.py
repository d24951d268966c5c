"""HybridPolicy: the three experts, the FAST tokenizer, the robots and their normalisation, as one
object that trains from a batch and saves to / loads from one directory, offline.

    <dir>/policy_config.json   embodiments, normalisation statistics, chunk size
    <dir>/vlm/                 HighLevelVLM (transformers backbone + tokenizer)
    <dir>/world_model/         WorldModel (diffusers VAE + transformer, value head); absent in a
                               policy made without one (`world_model=False`: the flat VLA)
    <dir>/latent_plan/         LatentPlan (posterior and prior over plan tokens); only in a
                               `latent_plan` policy
    <dir>/action_expert/       ActionExpert (diffusers config.json + safetensors); absent in a
                               policy whose world model denoises the actions as latent frames
                               (`action_expert=False`: `latent_frame_actions`)
    <dir>/fast/                FastTokenizer

Training (`losses`) and inference sit side by side, with one set of conventions for padding,
dim masks and normalisation:
    losses(batch)                                  -> every loss of the hierarchy
    normalize_state(state, robot)                  (B, state_dim) robot units -> (B, max_state_dim)
    propose_subgoals(images, instructions, drafts) -> subgoals, features (B, L, D), mask (B, L)
    prefix_features(images, instructions, subgoals) -> features, mask
    encode_frames(images)                          -> current latents (B, C, h, w)
    imagine(current, features, mask, K, steps)     -> candidates (B, K, C, h, w), scores (B, K)
    world_features(current, features, mask)        -> (B, P, D_wm), one pass (representation)
    sample_plan(current, state, features, mask)    -> (B, P, d), the prior's plan (latent_plan)
    imagine_and_act(state, robot, features, mask, images, K, steps[, committed])
                                                   -> K (chunk, future) pairs denoised together
                                                      and the futures' scores (joint, or
                                                      latent frame actions)
    sample_actions(state, robot, features, mask, images, visual[, committed, scene])
                                                   -> (B, H, action_dim) robot units, clipped
Batches are what `hybrid.data.windows.TrainingWindows` yields: state (B, state_dim) and actions
(B, H, action_dim) already normalised, the scene (B, E) where the dataset records one, images
(B, N, 3, S, S) in [0, 1], text as lists.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from experts.action import ActionExpert
from experts.fast import FastTokenizer
from experts.latent_plan import LatentPlan
from experts.vlm import HighLevelVLM, train_tokenizer
from experts.world_model import WorldModel
from hybrid.data.normalize import Normalizer
from hybrid.data.windows import ACTING_KEYS, ACTION_KEY, SCENE_KEY, STATE_KEY
from hybrid.embodiment import EmbodimentSpec
from hybrid.robots import Robots, fingerprint, head_rows, heads, set_head_rows
from hybrid.saved_files import SavedFileError, atomic_directory, check_files, read_json

CONFIG_NAME = "policy_config.json"
ADAPTERS_DIR = "adapters"  # per-robot LoRA adapters, see hybrid.adapters
# A state further than this from the training data, in normalised units, is refused (see
# `HybridPolicy.normalize_state`).
STATE_BOUND = 1e4
EXPERT_DIRS = (
    "vlm",
    "world_model",
    "latent_plan",
    "action_expert",
    "fast",
)  # one folder per expert, its name


class HybridPolicy(nn.Module):
    """See the module docstring. The robots it serves are `robots` (`hybrid.robots.Robots`);
    `embodiments`, `norm_stats` and `normalizers` read from there."""

    def __init__(
        self,
        vlm: HighLevelVLM,
        world_model: WorldModel | None,
        action_expert: ActionExpert | None,
        fast: FastTokenizer,
        embodiments: list[EmbodimentSpec],
        norm_stats: dict[str, dict[str, dict[str, list[float]]]],
        norm_modes: dict[str, str] | None = None,
        latent_plan: LatentPlan | None = None,
    ):
        super().__init__()
        self.vlm, self.world_model, self.action_expert, self.fast = (
            vlm,
            world_model,
            action_expert,
            fast,
        )
        self.latent_plan = latent_plan
        self.robots = Robots(norm_modes)
        if action_expert is None and (world_model is None or not world_model.num_action_frames):
            raise ValueError(
                "a policy without an action expert needs a world model that denoises the "
                "actions (world_model.action_frames: true)"
            )
        if action_expert is not None and action_expert.config.num_embodiments < len(embodiments):
            raise ValueError(
                f"the action expert has rows for {action_expert.config.num_embodiments} "
                f"embodiments, but {len(embodiments)} are given"
            )
        for spec in embodiments:
            self._register(spec, norm_stats[spec.name])
        self.fingerprint: str | None = None  # of the weights as saved; set by save/load

    @property
    def embodiments(self) -> dict[str, EmbodimentSpec]:
        return self.robots.specs

    @property
    def norm_stats(self) -> dict:
        return self.robots.norm_stats

    @property
    def norm_modes(self) -> dict[str, str]:
        return self.robots.norm_modes

    @property
    def normalizers(self) -> dict[str, Normalizer]:
        return self.robots.normalizers

    @property
    def action_config(self):
        """The config holding the action chunk's sizes (chunk_size, max_action_dim,
        max_state_dim): the action expert's, or that of a world model that denoises the actions
        as latent frames where there is no action expert."""
        return (self.world_model if self.action_expert is None else self.action_expert).config

    @property
    def joint(self) -> bool:
        """Whether the actions are drawn together with the futures they lead to
        (`imagine_and_act`: a joint action expert, or actions as latent frames), not
        conditioned on an imagined future chosen before (`sample_actions`)."""
        return self.action_expert is None or bool(self.action_expert.config.joint)

    def _register(self, spec: EmbodimentSpec, stats: dict) -> None:
        cfg = self.action_config
        self.robots.add(
            spec, stats, cfg.max_state_dim, cfg.max_action_dim, self.fast.config.action_dim
        )

    # 0. robots --------------------------------------------------------------------------------
    def add_embodiment(self, spec: EmbodimentSpec, norm_stats: dict) -> None:
        """A new robot: one more row in every per-embodiment layer (initialised as the mean of
        the existing rows) and its normalisation statistics. The shared weights are untouched."""
        if spec.name in self.embodiments:
            raise ValueError(f"embodiment {spec.name!r} already exists in {list(self.embodiments)}")
        self._register(spec, norm_stats)
        for head in heads(self.action_expert).values():
            head.add_row()
        if self.action_expert is not None:
            self.action_expert.register_to_config(num_embodiments=len(self.embodiments))

    def embodiment_rows(self, name: str) -> dict[str, torch.Tensor]:
        """The robot's own row of each per-embodiment parameter, by parameter name."""
        return head_rows(self.action_expert, self.robots.rows([name])[0])

    def set_embodiment_rows(self, name: str, rows: dict[str, torch.Tensor]) -> None:
        set_head_rows(self.action_expert, self.robots.rows([name])[0], rows, name)

    def keep_embodiments(self, names: list[str]) -> None:
        """Drop every robot not named (and its rows)."""
        rows = self.robots.rows(names)
        for head in heads(self.action_expert).values():
            head.keep_rows(rows)
        self.robots.keep(names)
        if self.action_expert is not None:
            self.action_expert.register_to_config(num_embodiments=len(names))

    def compute_fingerprint(self) -> str:
        """sha256 of every weight and the robots' specs (`hybrid.robots.fingerprint`)."""
        return fingerprint(self, list(self.embodiments.values()))

    @classmethod
    def create(
        cls,
        texts: list[str],
        action_chunks: np.ndarray,
        embodiments: list[EmbodimentSpec],
        norm_stats: dict,
        vlm: dict | None = None,
        world_model: dict | bool | None = None,
        action_expert: dict | bool | None = None,
        fast: dict | None = None,
        text_vocab_size: int = 512,
        latent_plan: dict | None = None,
    ) -> HybridPolicy:
        """Build fresh experts with consistent sizes. `texts` (instructions and subgoals) train
        the tiny VLM's tokenizer, `action_chunks` (N, H, action_dim), normalised, fit FAST. The
        dicts are each expert's keyword arguments; `vlm={"backbone": <hub name or dir>}` loads a
        pretrained VLM and its tokenizer. `world_model=False` builds no world model: the action
        expert reads the VLM's features, the frames and the state, and no visual subgoal (the
        flat VLA of `configs/formulation/flat_vla.yaml`). `action_expert={"joint": True}` with
        `world_model={"flow": False}` makes the action expert denoise the future latent with the
        actions (`configs/formulation/joint.yaml`); each needs the other. `action_expert=False`
        with `world_model={"action_frames": True}` builds no action expert: the world model's
        transformer denoises the actions as latent frames beside the future
        (`configs/formulation/latent_frame_actions.yaml`); each needs the other. `latent_plan`
        (the LatentPlan's keyword arguments) with `world_model={"flow": False}` makes the action
        expert read plan tokens in place of an imagined future
        (`configs/formulation/latent_plan.yaml`)."""
        vlm = dict(vlm or {})
        horizon, action_dim = action_chunks.shape[1:]
        fast_tokenizer = FastTokenizer(horizon, action_dim, **(fast or {})).fit(action_chunks)
        if vlm.get("backbone"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(vlm["backbone"])
        else:
            tokenizer = train_tokenizer(texts, text_vocab_size, fast_tokenizer.vocab_size)
        vlm_model = HighLevelVLM(
            tokenizer=tokenizer, num_action_tokens=fast_tokenizer.vocab_size, **vlm
        )
        # The YAML may leave room for robots added later (`hybrid finetune`); never less than now.
        needs = {
            "max_state_dim": max(s.state_dim for s in embodiments),
            "max_action_dim": max(s.action_dim for s in embodiments),
        }
        wm, channels, size = None, 0, 8
        if world_model is not False:  # None or True: the defaults
            settings = dict(world_model) if isinstance(world_model, dict) else {}
            if settings.get("action_frames"):  # the world model holds the chunk's sizes
                settings["chunk_size"] = horizon
                for key, need in needs.items():
                    settings[key] = max(settings.get(key, need), need)
            wm = WorldModel(context_dim=vlm_model.hidden_size, **settings)
            channels, size, _ = wm.latent_shape
        acts = wm is not None and bool(wm.num_action_frames)
        if (action_expert is False) != acts:
            raise ValueError(
                "action_expert: false and world_model.action_frames: true go together (the "
                "latent_frame_actions formulation: the world model denoises the actions), got "
                f"action_expert {'false' if action_expert is False else 'set'} with "
                f"world_model.action_frames {acts}"
            )
        if action_expert is False:
            return cls(vlm_model, wm, None, fast_tokenizer, embodiments, norm_stats)
        action_expert = dict(action_expert or {})
        flow = wm is None or wm.config.flow
        if latent_plan is not None:
            if (
                wm is None
                or flow
                or action_expert.get("joint")
                or action_expert.get("world_features")
            ):
                raise ValueError(
                    "latent_plan reads the world model's latent space and replaces its futures: "
                    "set world_model.flow: false, and neither action_expert.joint nor "
                    "world_features"
                )
        elif bool(action_expert.get("joint")) == flow:
            raise ValueError(
                "action_expert.joint and world_model.flow: false go together (the joint "
                "formulation: the action expert denoises the future the world model no longer "
                f"predicts), got joint {action_expert.get('joint', False)} with "
                + ("no world model" if wm is None else f"world_model.flow {flow}")
            )
        if action_expert.get("world_features"):  # `true` in YAML: the world model's own width
            if wm is None:
                raise ValueError(
                    "action_expert.world_features reads the world model's features: this "
                    "policy has none (world_model: false)"
                )
            action_expert["world_features"] = wm.feature_dim
            action_expert["latent_patch"] = wm.config.patch_size  # one token per its patches
        action_expert.setdefault("num_cameras", max(len(s.cameras) for s in embodiments) or 1)
        for key, need in needs.items():
            action_expert[key] = max(action_expert.get(key, need), need)
        plan = None
        if latent_plan is not None:  # the expert reads P plan tokens as a side x side grid
            plan = LatentPlan(
                latent_channels=channels,
                latent_size=size,
                chunk_size=horizon,
                max_action_dim=action_expert["max_action_dim"],
                max_state_dim=action_expert["max_state_dim"],
                context_dim=vlm_model.hidden_size,
                patch_size=wm.config.patch_size,
                **latent_plan,
            )
            action_expert["world_features"] = plan.config.plan_dim
            action_expert["latent_patch"] = 1
            size = round(plan.config.plan_tokens**0.5)
        expert = ActionExpert(
            vlm_dim=vlm_model.hidden_size,
            latent_channels=channels,
            latent_size=size,
            chunk_size=horizon,
            num_embodiments=len(embodiments),
            **action_expert,
        )
        return cls(vlm_model, wm, expert, fast_tokenizer, embodiments, norm_stats, latent_plan=plan)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def frame_size(self) -> int:
        """The side of the camera frames this policy trains and plans on: what its action expert
        sees (the VLM and the world model resize to their own sides)."""
        if self.action_expert is not None and self.action_expert.config.image_size:
            return self.action_expert.config.image_size
        if self.world_model is not None:
            return self.world_model.config.image_size
        return self.vlm.image_size

    # 1. batches -------------------------------------------------------------------------------
    def embodiment_ids(self, names: list[str]) -> torch.Tensor:
        """Row of each robot in the per-embodiment weights, (B,)."""
        return torch.tensor(self.robots.rows(names), device=self.device)

    def _pad(self, x: torch.Tensor, size: int) -> torch.Tensor:
        return F.pad(x, (0, size - x.shape[-1]))

    def dim_mask(self, names: list[str]) -> torch.Tensor:
        """(B, max_action_dim) bool: True on each robot's real action dims."""
        return self.robots.dim_mask(names, self.action_config.max_action_dim).to(self.device)

    # 2. training ------------------------------------------------------------------------------
    def losses(
        self,
        batch: dict,
        visual_dropout: float = 0.0,
        language_dropout: float = 0.0,
        imagined_share: float = 0.0,
        vlm_rows: int | None = None,
        scene_future: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Every loss of the hierarchy on one batch: lang, fast, world, value, action (+ vae when
        the world model's VAE trains, + scene when the action expert has a scene head and the
        data a scene). The action and scene losses reach only the action expert. With a scene
        estimator the scene loss also reads each sample's future frame (`future_scene`; not with
        `scene_future` False) and, where the batch has them, frames of other rollouts
        (`scene_images`, `scene_target`, `scene_target_mask`; `hybrid.data.scene_frames`).
        Where the batch has `latents` and `future_latents` (B, C, h, w), a frozen VAE's encodings
        of its frames (`hybrid.latent_cache`), they stand in for encoding them again.

        Condition dropout keeps the planner's ablation modes valid: for a `visual_dropout` share
        of samples the action expert acts without the visual subgoal, for a `language_dropout`
        share it reads VLM features whose subgoal is the instruction itself. For an
        `imagined_share` of samples its visual subgoal is the world model's own estimate of the
        future from this step (as at planning time, where the future is imagined), for the rest
        the true future frame. The VLM's own losses train on the first `vlm_rows` samples (None:
        all); the other samples' features come from a pass without gradient, which no loss
        below the VLM needs (knowledge insulation). Without an action expert, the world model's
        losses include `action` (`WorldModel.losses` with `action_frames`), and the switches
        and the scene have nothing to act on. Where the batch has `act_*` keys (`plan_lag`,
        `hybrid.data.windows`), the action expert acts at that later step of the episode: its
        frames, state, scene and actions are those, and the plan it reads (the VLM's features
        and the visual subgoal) is the one made at the batch's own frame."""
        names = list(batch["embodiment"])
        ids = self.embodiment_ids(names)
        actions = batch["actions"]
        images, instructions = batch["images"], list(batch["instruction"])
        subgoals = list(batch["subgoal"])
        size = len(names)
        rows = size if vlm_rows is None else min(vlm_rows, size)
        # robots with fewer action dims than FAST was fit on are zero-padded, as in the expert
        fast_actions = self._pad(actions[:rows].detach().float(), self.fast.config.action_dim)
        fast_tokens = self.fast.encode(fast_actions.cpu().numpy())
        out = self.vlm(images[:rows], instructions[:rows], subgoals[:rows], fast_tokens)
        features, feature_mask = out.features, out.feature_mask
        if rows < size:
            rest = self.vlm.prefix_features(images[rows:], instructions[rows:], subgoals[rows:])
            features, feature_mask = _cat_rows((features, feature_mask), rest)
        world, visual, visual_keep = {}, None, None
        cfg = self.action_config
        # padded once, as every expert that acts reads them
        padded_actions = self._pad(actions, cfg.max_action_dim)
        state = self._pad(batch["state"], cfg.max_state_dim)
        if self.world_model is not None:
            if "latents" in batch:  # a frozen VAE's, encoded once per frame (hybrid.latent_cache)
                current, future = batch["latents"], batch["future_latents"]
            else:
                with torch.no_grad():  # one encoding serves the world model and the action expert
                    frames = torch.cat([images, batch["future_images"]])
                    current, future = self.world_model.encode(frames).chunk(2)
            acting = {}
            if self.action_expert is None:  # the world model denoises the actions
                acting = {
                    "actions": padded_actions,
                    "action_mask": batch["action_mask"],
                    "dim_mask": self.dim_mask(names),
                    "state": state,
                }
            world, imagined = self.world_model.losses(
                images,
                current,
                future,
                features,
                feature_mask,
                batch["progress"],
                batch["future_progress"],
                **acting,
            )
            if self.action_expert is None:
                losses = {"lang": out.lang_loss, "fast": out.fast_loss, **world}
                return {k: v for k, v in losses.items() if v is not None}
            visual_keep = torch.rand(size, device=actions.device) >= visual_dropout
            if self.latent_plan is not None:  # a plan drawn from the posterior of the window
                visual, kl = self.latent_plan.loss(
                    current,
                    future,
                    padded_actions,
                    batch["action_mask"],
                    state,
                    features,
                    feature_mask,
                )
                world = {**world, **kl}
            elif cfg.world_features:  # representation: what the world model expects, one pass
                with torch.no_grad():  # the world model learns from its own objective only
                    visual = self.world_model.features(current, features, feature_mask)
            elif cfg.joint:  # the true future: the target the expert denoises with the actions
                visual, visual_keep = future, None
            else:
                use_imagined = torch.rand(size, device=actions.device) < imagined_share
                visual = torch.where(use_imagined[:, None, None, None], imagined, future)
        drop = (torch.rand(size) < language_dropout).nonzero()[:, 0]
        if len(drop):
            plain = [instructions[i] for i in drop.tolist()]
            alt, alt_mask = self.vlm.prefix_features(images[drop], plain, plain)
            width = max(features.shape[1], alt.shape[1])
            features, feature_mask = _widen(features, feature_mask, width)
            alt, alt_mask = _widen(alt, alt_mask, width)
            at = drop.to(features.device)
            features = features.index_copy(0, at, alt)
            feature_mask = feature_mask.index_copy(0, at, alt_mask)
        # the action expert's own step: its `act_*` keys where the data lags it behind the plan
        act = {k: batch.get(f"act_{k}", batch.get(k)) for k in ACTING_KEYS}
        scene_dim = cfg.scene_dim
        scene = act["scene"] if scene_dim else None  # no scene head: nothing learns it
        if scene is not None and scene.shape[1] > scene_dim:
            raise ValueError(
                f"the data's scene (observation.environment_state) has {scene.shape[1]} dims, but "
                f"the action expert's scene head has {scene_dim}: raise "
                "`model.experts.action_expert.scene_dim`, or set it to 0 to learn no scene"
            )
        extra = {}  # more frames for the scene estimator alone: the future, other rollouts
        if scene is not None:
            # (frames, scene, mask, robot rows); the scene data, as many frames as the data
            # module gives (`scene_batch_size`), is of the batch's robot (one per data module)
            sources = [("scene_images", "scene_target", "scene_target_mask", ids[:1])]
            if scene_future:
                sources.insert(0, ("future_images", "future_scene", "scene_mask", ids))
            parts = [
                (
                    batch[i],
                    self._pad(batch[t], scene_dim),
                    self._pad(batch[m], scene_dim),
                    rows.expand(len(batch[t])),
                )
                for i, t, m, rows in sources
                if t in batch
            ]
            if parts:
                keys = ("extra_images", "extra_scene", "extra_mask", "extra_ids")
                columns = zip(*parts, strict=True)
                extra = {k: torch.cat(x) for k, x in zip(keys, columns, strict=True)}
        action = self.action_expert.loss(
            self._pad(act["actions"], cfg.max_action_dim),
            act["action_mask"],
            self.dim_mask(names),
            self._pad(act["state"], cfg.max_state_dim),
            ids,
            features,
            feature_mask,
            act["images"],
            visual,
            visual_keep,
            None if scene is None else self._pad(scene, scene_dim),
            None if scene is None else self._pad(batch["scene_mask"], scene_dim).bool(),
            **extra,
            lag=batch.get("lag"),
        )
        losses = {"lang": out.lang_loss, "fast": out.fast_loss, **action, **world}
        return {k: v for k, v in losses.items() if v is not None}

    # 3. inference: tensors in and out, with the conventions of `losses` -----------------------
    def normalize_state(self, state: np.ndarray, embodiment: str) -> torch.Tensor:
        """States (B, state_dim) in the robot's units -> (B, max_state_dim), normalised and padded
        as `losses` reads them. A value more than STATE_BOUND normalised units (standard
        deviations, by default) from the training data, in any dimension that varied there, is
        refused: no network extrapolates that far, and beyond it float32 can overflow."""
        normalizer = self.normalizers[embodiment]
        raw = np.asarray(state, np.float32)
        for row in raw:
            deviation = normalizer.deviation(STATE_KEY, row)
            if not deviation <= STATE_BOUND:
                raise ValueError(
                    f"state: {row.tolist()} lies {deviation:.3g} normalised units from the "
                    f"training data (bound {STATE_BOUND:g}); is it in the robot's units "
                    f"({embodiment})?"
                )
        normalised = torch.as_tensor(normalizer.normalize(STATE_KEY, raw), device=self.device)
        return self._pad(normalised.float(), self.action_config.max_state_dim)

    def encode_frames(self, images: torch.Tensor) -> torch.Tensor:
        """Camera frames (B, N, 3, S, S) in [0, 1] -> the world model's latents (B, C, h, w)."""
        return self._world_model("encode frames").encode(images)

    def propose_subgoals(
        self, images: torch.Tensor, instructions: list[str], drafts: tuple[str, ...] = ()
    ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Generated subgoals and the prefix features (B, L, D) with their mask (B, L) that the
        lower tiers read, from one VLM pass (`HighLevelVLM.propose_subgoal`; `drafts`, for one
        sample, are texts it checks as guesses, which change the passes, not the subgoal)."""
        subgoals, features, mask = self.vlm.propose_subgoal(images, instructions, drafts)
        return subgoals, _finite("VLM", features), mask

    def prefix_features(
        self, images: torch.Tensor, instructions: list[str], subgoals: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix features (B, L, D) and mask (B, L) of a subgoal already chosen."""
        features, mask = self.vlm.prefix_features(images, instructions, subgoals)
        return _finite("VLM", features), mask

    def imagine(
        self,
        current: torch.Tensor,
        features: torch.Tensor,
        mask: torch.Tensor,
        num_candidates: int,
        steps: int,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K candidate future latents (B, K, C, h, w) from the current latents (B, C, h, w), and
        the value head's score of each (B, K)."""
        wm = self._world_model("imagine")
        candidates = wm.imagine(current, features, mask, num_candidates, steps, generator)
        _finite("world model", candidates)
        return candidates, _finite("value head", wm.score(candidates, features, mask))

    def imagine_batch(
        self,
        batch: dict,
        current: torch.Tensor,
        features: torch.Tensor,
        mask: torch.Tensor,
        steps: int,
    ) -> torch.Tensor:
        """One imagined future latent (B, C, h, w) per sample of a training batch, from its
        current latents (B, C, h, w), by whichever expert predicts the future: the world model,
        or a joint action expert with the sample's state and frames (for validation metrics)."""
        if not self.joint:  # nothing to score: the world model alone
            return self._world_model("imagine").imagine(current, features, mask, 1, steps)[:, 0]
        names = list(batch["embodiment"])
        state = self._pad(batch["state"], self.action_config.max_state_dim)
        ids, dims = self.embodiment_ids(names), self.dim_mask(names)
        if self.action_expert is None:  # actions as latent frames
            wm = self.world_model
            return wm.imagine_and_act(current, state, features, mask, dims, 1, steps)[1]
        expert = self.action_expert
        return expert.sample_joint(state, ids, features, mask, batch["images"], dims, steps)[1]

    def world_features(
        self, current: torch.Tensor, features: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The world model's transformer features (B, P, D_wm) of the current latents (B, C, h,
        w) under the prefix features, from one pass (`WorldModel.features`): what an action
        expert with `world_features` reads in place of an imagined future."""
        wm = self._world_model("read world features")
        return _finite("world model", wm.features(current, features, mask))

    def sample_plan(
        self,
        current: torch.Tensor,
        state: torch.Tensor,
        features: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """A plan (B, P, d) from the prior (`LatentPlan.sample`), given the current latents (B,
        C, h, w), the state (B, max_state_dim) of `normalize_state` and the prefix features:
        what a `latent_plan` policy's action expert reads in place of an imagined future."""
        if self.latent_plan is None:
            raise ValueError("sample_plan: this policy has no latent plan (configs/formulation)")
        plan = self.latent_plan.sample(current, state, features, mask, generator)
        return _finite("latent plan", plan)

    @property
    def reads_world_features(self) -> bool:
        """Whether the action expert reads world-model features, not imagined futures."""
        return self.action_expert is not None and bool(self.action_expert.config.world_features)

    def _world_model(self, what: str) -> WorldModel:
        if self.world_model is None:
            raise ValueError(
                f"cannot {what}: this policy has no world model (made with world_model=False, "
                "the flat VLA); plan without a visual subgoal"
            )
        return self.world_model

    def sample_actions(
        self,
        state: torch.Tensor,
        embodiment: str,
        features: torch.Tensor,
        mask: torch.Tensor,
        images: torch.Tensor | None,
        visual_latent: torch.Tensor | None,
        steps: int = 10,
        generator: torch.Generator | None = None,
        committed: np.ndarray | None = None,
        scene: np.ndarray | None = None,
        lag: int = 0,
    ) -> np.ndarray:
        """An action chunk (B, H, action_dim) in the robot's units, clipped to its limits.
        `state` (B, max_state_dim) is `normalize_state`'s; `committed` (B, d, action_dim), in the
        robot's units, are actions already sent for the chunk's first d steps: the flow is
        inpainted with them, so that the rest of the chunk continues what the robot does, and
        they are returned unchanged. `scene` (B, E), in the simulator's units (its
        `scene_state`), is privileged: the true object and goal positions, read by an expert
        trained with `scene_input` in place of its own estimate, to measure what perfect
        perception would give. `lag`: steps since the frame `features` and `visual_latent` were
        made from, cut at what the expert learned (its `plan_lag`; 0 where it learned none)."""
        if self.joint:
            raise ValueError(
                "sample_actions: this policy draws its actions with their futures (imagine_and_act)"
            )
        if lag < 0:
            raise ValueError(f"lag: expected the plan's age in steps, >= 0, got {lag}")
        normalised = self.action_expert.sample(
            state,
            vlm_features=features,
            vlm_mask=mask,
            images=images,
            visual_latent=visual_latent,
            steps=steps,
            generator=generator,
            lag=torch.full(
                (len(state),), min(lag, self.action_config.plan_lag), device=state.device
            ),
            **self._robot_inputs(len(state), embodiment, committed, scene),
        )
        return self._robot_actions(normalised, embodiment, committed)

    def imagine_and_act(
        self,
        state: torch.Tensor,
        embodiment: str,
        features: torch.Tensor,
        mask: torch.Tensor,
        images: torch.Tensor | None,
        num_candidates: int,
        steps: int = 10,
        generator: torch.Generator | None = None,
        committed: np.ndarray | None = None,
        scene: np.ndarray | None = None,
        current: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """The joint formulation's planning step: K action chunks (B, K, H, action_dim) in the
        robot's units, clipped, each denoised together with the future latent it leads to
        (B, K, C, h, w) from its own noise, and the value head's score of each future (B, K).
        The arguments are `sample_actions`'; `current` (B, C, h, w), the frames' latents where
        the caller has them (`encode_frames`), saves encoding them again when the world model
        denoises the actions (no action expert)."""
        wm, k = self._world_model("score futures"), num_candidates
        if not self.joint:
            raise ValueError("imagine_and_act: this policy's action expert is not joint; imagine")
        robot = self._robot_inputs(len(state), embodiment, committed, scene)
        if self.action_expert is None:  # actions as latent frames of the world model
            current = wm.encode(images) if current is None else current
            normalised, futures = wm.imagine_and_act(
                current, state, features, mask, robot["dim_mask"], k, steps, generator,
                robot["prefix"],
            )  # fmt: skip
        else:
            normalised, futures = self.action_expert.sample_joint(
                state,
                vlm_features=features,
                vlm_mask=mask,
                images=images,
                steps=steps,
                generator=generator,
                num_candidates=k,
                **robot,
            )
        repeated = None if committed is None else np.repeat(committed, k, 0)
        actions = self._robot_actions(normalised, embodiment, repeated)
        futures = rearrange(_finite("action expert", futures), "(b k) ... -> b k ...", k=k)
        scores = _finite("value head", wm.score(futures, features, mask))
        return rearrange(actions, "(b k) h a -> b k h a", k=k), futures, scores

    @torch.compiler.disable  # NumPy: left to Python under torch.compile
    def _robot_inputs(
        self, size: int, embodiment: str, committed: np.ndarray | None, scene: np.ndarray | None
    ) -> dict:
        """What the action expert's samplers read of the robot, for `size` samples of it: its
        rows, its real action dims, the committed actions (B, d, action_dim) in its units as
        the flow's fixed prefix (normalised and padded), the true scene (`_scene`)."""
        names = [embodiment] * size
        prefix = None
        if committed is not None:
            normalised = self.normalizers[embodiment].normalize(
                ACTION_KEY, np.asarray(committed, np.float32)
            )
            prefix = torch.as_tensor(normalised, dtype=torch.float32, device=self.device)
            prefix = self._pad(prefix, self.action_config.max_action_dim)
        return {
            "embodiment_ids": self.embodiment_ids(names),
            "dim_mask": self.dim_mask(names),
            "prefix": prefix,
            "scene": None if scene is None else self._scene(scene, embodiment),
        }

    @torch.compiler.disable  # NumPy: left to Python under torch.compile
    def _robot_actions(
        self, normalised: torch.Tensor, embodiment: str, committed: np.ndarray | None
    ) -> np.ndarray:
        """The expert's chunks (B, H, max_action_dim), normalised -> (B, H, action_dim) in the
        robot's units, clipped to its limits, the committed actions (B, d, action_dim) in place."""
        spec = self.embodiments[embodiment]
        normalised = _finite("action expert", normalised[..., : spec.action_dim])
        actions = self.normalizers[embodiment].unnormalize(
            ACTION_KEY, normalised.float().cpu().numpy()
        )
        if spec.action_low:
            actions = np.clip(actions, spec.action_low, spec.action_high)
        if committed is not None:
            actions[:, : committed.shape[1]] = committed
        return actions.astype(np.float32)

    def _scene(self, scene: np.ndarray, embodiment: str) -> torch.Tensor:
        """A true scene (B, E) in the simulator's units -> (B, scene_dim), normalised as the
        training windows normalise it, and padded."""
        if self.action_expert is None or not self.action_expert.config.scene_input:
            raise ValueError(
                "scene: this policy's action expert reads no scene (train it with "
                "`action_expert.scene_input: true`, e.g. configs/experiment/privileged_scene.yaml)"
            )
        width = self.action_expert.config.scene_dim
        raw = np.asarray(scene, np.float32)
        if SCENE_KEY not in self.normalizers[embodiment].params:
            raise ValueError(
                f"scene: this policy stores no scene statistics for {embodiment!r} (trained on "
                "data without observation.environment_state, or by an older version)"
            )
        if raw.ndim != 2 or not 0 < raw.shape[1] <= width or not np.isfinite(raw).all():
            raise ValueError(
                f"scene: expected finite values of shape (B, <= {width}), got {raw.shape}"
            )
        normalised = self.normalizers[embodiment].normalize(SCENE_KEY, raw)
        return self._pad(torch.as_tensor(normalised, device=self.device).float(), width)

    @property
    def expert_names(self) -> list[str]:
        """The experts this policy holds, each saved in the folder of its name."""
        return [name for name in EXPERT_DIRS if getattr(self, name) is not None]

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of each learned expert, and of whatever else the policy holds, by name."""
        experts = {name: getattr(self, name) for name in self.expert_names}
        counts = {
            name: sum(p.numel() for p in expert.parameters())
            for name, expert in experts.items()
            if isinstance(expert, nn.Module)  # FAST is a tokenizer: nothing learned by gradient
        }
        rest = sum(p.numel() for p in self.parameters()) - sum(counts.values())
        return {**counts, **({"other": rest} if rest else {})}

    # 3. persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the policy to `directory` atomically: into a sibling temporary folder first, then
        swapped into place, so an interrupted save never leaves a half-written policy. Adapters
        are not part of it (`hybrid.adapters` saves them); a policy with LoRA layers attached is
        refused: merge them first."""
        if any("lora_" in name for name, _ in self.named_parameters()):
            raise ValueError(
                "this policy has LoRA layers attached; save the adapter with "
                "EmbodimentAdapters.save, or merge it first (`hybrid export --merge`)"
            )
        directory = Path(directory)
        self.fingerprint = self.compute_fingerprint()
        with atomic_directory(directory) as tmp:
            for name in self.expert_names:
                getattr(self, name).save_pretrained(tmp / name)
            config = {
                "experts": self.expert_names,
                "embodiments": [s.to_dict() for s in self.embodiments.values()],
                "norm_stats": self.norm_stats,
                "norm_modes": self.norm_modes,
                "fingerprint": self.fingerprint,
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
            if (directory / ADAPTERS_DIR).is_dir():  # kept: they name the base they belong to
                shutil.copytree(directory / ADAPTERS_DIR, tmp / ADAPTERS_DIR)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> HybridPolicy:
        directory = Path(directory)
        path = directory / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{directory} is not a policy directory: {path} is missing "
                "(`hybrid fit` exports one; `HybridPolicy.save_pretrained` writes one)"
            )
        fix = "re-export the policy (`hybrid fit` or `hybrid export`) or point at another one"
        config = read_json(directory, CONFIG_NAME, "policy", fix)
        # older policies name no experts: they hold all four
        experts = config.get("experts", list(EXPERT_DIRS))
        for expert in experts:  # not adapters/: a broken adapter leaves the base usable
            check_files(directory / expert, fix)
        try:
            policy = cls(
                vlm=HighLevelVLM.from_pretrained(directory / "vlm"),
                world_model=WorldModel.from_pretrained(directory / "world_model")
                if "world_model" in experts
                else None,
                latent_plan=LatentPlan.from_pretrained(directory / "latent_plan")
                if "latent_plan" in experts
                else None,
                action_expert=ActionExpert.from_pretrained(directory / "action_expert")
                if "action_expert" in experts
                else None,
                fast=FastTokenizer.from_pretrained(directory / "fast"),
                embodiments=[EmbodimentSpec(**s) for s in config["embodiments"]],
                norm_stats=config["norm_stats"],
                norm_modes=config["norm_modes"],
            )
        except SavedFileError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            # a library's message (a missing file, mismatched shapes, a foreign config)
            cause = " ".join(str(error).split())[:300]
            message = f"cannot load the policy in {directory} ({cause}); {fix}"
            raise SavedFileError(message) from error
        policy.fingerprint = config.get("fingerprint") or policy.compute_fingerprint()
        return policy


@torch.compiler.disable  # a check on values: eager, not one graph per tensor rank
def _finite(tier: str, x: torch.Tensor) -> torch.Tensor:
    """x, or a FloatingPointError naming the tier that produced non-finite values."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(
            f"the {tier} produced non-finite values (NaN or inf); its weights may be corrupt: "
            "re-export the policy"
        )
    return x


def _widen(
    features: torch.Tensor, mask: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad features (B, L, D) and their mask (B, L) to `width` tokens."""
    pad = width - features.shape[1]
    return F.pad(features, (0, 0, 0, pad)), F.pad(mask, (0, pad))


def _cat_rows(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of (features, mask), padded to one width and stacked: (Ba + Bb, L, D)."""
    width = max(a[0].shape[1], b[0].shape[1])
    (fa, ma), (fb, mb) = _widen(*a, width), _widen(*b, width)
    return torch.cat([fa, fb]), torch.cat([ma, mb])
