"""HybridPolicy: the three experts, the FAST tokenizer, the robots and their normalisation, as one
object that trains from a batch and saves to / loads from one directory, offline.

    <dir>/policy_config.json   embodiments, normalisation statistics, chunk size
    <dir>/vlm/                 HighLevelVLM (transformers backbone + tokenizer)
    <dir>/world_model/         WorldModel (diffusers VAE + transformer, value head)
    <dir>/action_expert/       ActionExpert (diffusers config.json + safetensors)
    <dir>/fast/                FastTokenizer

Batches are what `hybrid.data.windows.TrainingWindows` yields: state (B, state_dim) and actions
(B, H, action_dim) already normalised, the scene (B, E) where the dataset records one, images
(B, N, 3, S, S) in [0, 1], text as lists.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experts.action import ActionExpert
from experts.config_io import SavedFileError, atomic_directory, check_files, load_config
from experts.embodiment_heads import EmbodimentLinear
from experts.fast import FastTokenizer
from experts.vlm import HighLevelVLM, train_tokenizer
from experts.world_model import WorldModel
from hybrid.data.normalize import Normalizer
from hybrid.data.windows import ACTION_KEY, STATE_KEY
from hybrid.embodiment import EmbodimentSpec

CONFIG_NAME = "policy_config.json"
ADAPTERS_DIR = "adapters"  # per-robot LoRA adapters, see hybrid.adapters
EXPERT_DIRS = ("vlm", "world_model", "action_expert", "fast")  # one folder per expert, its name


class HybridPolicy(nn.Module):
    """See the module docstring. `norm_stats[embodiment][feature]` holds mean/std/min/max lists."""

    def __init__(
        self,
        vlm: HighLevelVLM,
        world_model: WorldModel,
        action_expert: ActionExpert,
        fast: FastTokenizer,
        embodiments: list[EmbodimentSpec],
        norm_stats: dict[str, dict[str, dict[str, list[float]]]],
        norm_modes: dict[str, str] | None = None,
    ):
        super().__init__()
        self.vlm, self.world_model, self.action_expert, self.fast = (
            vlm,
            world_model,
            action_expert,
            fast,
        )
        self.embodiments: dict[str, EmbodimentSpec] = {}
        self.norm_stats: dict = {}
        self.norm_modes = norm_modes or {STATE_KEY: "mean_std", ACTION_KEY: "mean_std"}
        self.normalizers: dict[str, Normalizer] = {}
        cfg = action_expert.config
        if cfg.num_embodiments < len(embodiments):
            raise ValueError(
                f"the action expert has rows for {cfg.num_embodiments} embodiments, "
                f"but {len(embodiments)} are given"
            )
        for spec in embodiments:
            self._register(spec, norm_stats[spec.name])
        self.fingerprint: str | None = None  # of the weights as saved; set by save/load

    def _register(self, spec: EmbodimentSpec, stats: dict) -> None:
        cfg = self.action_expert.config
        if spec.state_dim > cfg.max_state_dim or spec.action_dim > cfg.max_action_dim:
            raise ValueError(
                f"embodiment {spec.name!r} has state/action dims {spec.state_dim}/"
                f"{spec.action_dim}; the action expert takes at most "
                f"{cfg.max_state_dim}/{cfg.max_action_dim} (a base policy made with larger "
                "`action_expert.max_state_dim` / `max_action_dim` leaves room)"
            )
        if spec.action_dim > self.fast.action_dim:
            raise ValueError(
                f"embodiment {spec.name!r} has {spec.action_dim} action dims; the FAST tokenizer "
                f"of this policy was fit on {self.fast.action_dim}"
            )
        self.embodiments[spec.name] = spec
        self.norm_stats[spec.name] = stats
        self.normalizers[spec.name] = Normalizer(
            {k: {s: np.asarray(v) for s, v in d.items()} for k, d in stats.items()},
            self.norm_modes,
        )

    # 0. robots --------------------------------------------------------------------------------
    def _heads(self) -> dict[str, EmbodimentLinear]:
        return {
            name: module
            for name, module in self.action_expert.named_modules()
            if isinstance(module, EmbodimentLinear)
        }

    def add_embodiment(self, spec: EmbodimentSpec, norm_stats: dict) -> None:
        """A new robot: one more row in every per-embodiment layer (initialised as the mean of
        the existing rows) and its normalisation statistics. The shared weights are untouched."""
        if spec.name in self.embodiments:
            raise ValueError(f"embodiment {spec.name!r} already exists in {list(self.embodiments)}")
        self._register(spec, norm_stats)
        for head in self._heads().values():
            head.add_row()
        self.action_expert.register_to_config(num_embodiments=len(self.embodiments))

    def embodiment_rows(self, name: str) -> dict[str, torch.Tensor]:
        """The robot's own row of each per-embodiment parameter, by parameter name."""
        (row,) = self.embodiment_ids([name]).tolist()
        return {
            f"{path}.{kind}": getattr(head, kind).data[row].clone()
            for path, head in self._heads().items()
            for kind in ("weight", "bias")
        }

    def set_embodiment_rows(self, name: str, rows: dict[str, torch.Tensor]) -> None:
        (row,) = self.embodiment_ids([name]).tolist()
        for path, head in self._heads().items():
            for kind in ("weight", "bias"):
                param = getattr(head, kind)
                value = rows[f"{path}.{kind}"]
                if value.shape != param.shape[1:]:
                    raise ValueError(
                        f"embodiment {name!r}: head {path}.{kind} has shape {tuple(value.shape)}, "
                        f"this policy's rows are {tuple(param.shape[1:])}"
                    )
                param.data[row] = value.to(param.dtype)

    def keep_embodiments(self, names: list[str]) -> None:
        """Drop every robot not named (and its rows)."""
        rows = self.embodiment_ids(names).tolist()
        for head in self._heads().values():
            head.keep_rows(rows)
        self.embodiments = {n: self.embodiments[n] for n in names}
        self.norm_stats = {n: self.norm_stats[n] for n in names}
        self.normalizers = {n: self.normalizers[n] for n in names}
        self.action_expert.register_to_config(num_embodiments=len(names))

    def compute_fingerprint(self) -> str:
        """sha256 of every weight (names, dtypes, shapes, bytes) and the robots' specs."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        digest.update(json.dumps([s.to_dict() for s in self.embodiments.values()]).encode())
        return digest.hexdigest()

    @classmethod
    def create(
        cls,
        texts: list[str],
        action_chunks: np.ndarray,
        embodiments: list[EmbodimentSpec],
        norm_stats: dict,
        vlm: dict | None = None,
        world_model: dict | None = None,
        action_expert: dict | None = None,
        fast: dict | None = None,
        text_vocab_size: int = 512,
    ) -> HybridPolicy:
        """Build fresh experts with consistent sizes. `texts` (instructions and subgoals) train
        the tiny VLM's tokenizer, `action_chunks` (N, H, action_dim), normalised, fit FAST. The
        dicts are each expert's keyword arguments; `vlm={"backbone": <hub name or dir>}` loads a
        pretrained VLM and its tokenizer."""
        vlm, world_model = dict(vlm or {}), dict(world_model or {})
        horizon, action_dim = action_chunks.shape[1:]
        fast_tokenizer = FastTokenizer(horizon, action_dim, **(fast or {})).fit(action_chunks)
        if vlm.get("backbone"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(vlm["backbone"])
        else:
            tokenizer = train_tokenizer(texts, text_vocab_size, fast_tokenizer.vocab_size)
        vlm_model = HighLevelVLM(tokenizer, num_action_tokens=fast_tokenizer.vocab_size, **vlm)
        wm = WorldModel(context_dim=vlm_model.hidden_size, **world_model)
        channels, size, _ = wm.latent_shape
        action_expert = dict(action_expert or {})
        action_expert.setdefault("num_cameras", max(len(s.cameras) for s in embodiments) or 1)
        # The YAML may leave room for robots added later (`hybrid finetune`); never less than now.
        for key, need in (
            ("max_state_dim", max(s.state_dim for s in embodiments)),
            ("max_action_dim", max(s.action_dim for s in embodiments)),
        ):
            action_expert[key] = max(action_expert.get(key, need), need)
        expert = ActionExpert(
            vlm_dim=vlm_model.hidden_size,
            latent_channels=channels,
            latent_size=size,
            chunk_size=horizon,
            num_embodiments=len(embodiments),
            **action_expert,
        )
        return cls(vlm_model, wm, expert, fast_tokenizer, embodiments, norm_stats)

    @property
    def frame_size(self) -> int:
        """The side of the camera frames this policy trains and plans on: what its action expert
        sees (the VLM and the world model resize to their own sides)."""
        return self.action_expert.config.image_size or self.world_model.config["image_size"]

    # 1. batches -------------------------------------------------------------------------------
    def embodiment_ids(self, names: list[str]) -> torch.Tensor:
        """Row of each robot in the per-embodiment weights, (B,)."""
        order = list(self.embodiments)
        unknown = sorted(set(names) - set(order))
        if unknown:
            raise ValueError(f"unknown embodiment(s) {unknown}; this policy knows {order}")
        return torch.tensor([order.index(n) for n in names], device=self.action_expert.device)

    def _pad(self, x: torch.Tensor, size: int) -> torch.Tensor:
        return F.pad(x, (0, size - x.shape[-1]))

    def dim_mask(self, names: list[str]) -> torch.Tensor:
        """(B, max_action_dim) bool: True on each robot's real action dims."""
        dims = torch.tensor([self.embodiments[n].action_dim for n in names])
        mask = torch.arange(self.action_expert.config.max_action_dim)[None] < dims[:, None]
        return mask.to(self.action_expert.device)

    # 2. training ------------------------------------------------------------------------------
    def losses(
        self,
        batch: dict,
        visual_dropout: float = 0.0,
        language_dropout: float = 0.0,
        imagined_share: float = 0.0,
        vlm_rows: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every loss of the hierarchy on one batch: lang, fast, world, value, action (+ vae when
        the world model's VAE trains, + scene when the action expert has a scene head and the
        data a scene). The action and scene losses reach only the action expert.

        Condition dropout keeps the planner's ablation modes valid: for a `visual_dropout` share
        of samples the action expert acts without the visual subgoal, for a `language_dropout`
        share it reads VLM features whose subgoal is the instruction itself. For an
        `imagined_share` of samples its visual subgoal is the world model's own estimate of the
        future from this step (as at planning time, where the future is imagined), for the rest
        the true future frame. The VLM's own losses train on the first `vlm_rows` samples (None:
        all); the other samples' features come from a pass without gradient, which no loss
        below the VLM needs (knowledge insulation)."""
        cfg = self.action_expert.config
        names = list(batch["embodiment"])
        ids = self.embodiment_ids(names)
        actions = batch["actions"]
        images, instructions = batch["images"], list(batch["instruction"])
        subgoals = list(batch["subgoal"])
        size = len(names)
        rows = size if vlm_rows is None else min(vlm_rows, size)
        # robots with fewer action dims than FAST was fit on are zero-padded, as in the expert
        fast_actions = self._pad(actions[:rows].detach().float(), self.fast.action_dim)
        fast_tokens = self.fast.encode(fast_actions.cpu().numpy())
        out = self.vlm(images[:rows], instructions[:rows], subgoals[:rows], fast_tokens)
        features, feature_mask = out.features, out.feature_mask
        if rows < size:
            rest = self.vlm.prefix_features(images[rows:], instructions[rows:], subgoals[rows:])
            features, feature_mask = _cat_rows((features, feature_mask), rest)
        with torch.no_grad():  # one encoding serves the world model and the action expert
            frames = torch.cat([images, batch["future_images"]])
            current, future = self.world_model.encode(frames).chunk(2)
        world, imagined = self.world_model.losses(
            images,
            current,
            future,
            features,
            feature_mask,
            batch["progress"],
            batch["future_progress"],
        )
        visual_keep = torch.rand(size, device=actions.device) >= visual_dropout
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
        scene_dim = cfg.scene_dim
        scene = batch.get("scene") if scene_dim else None  # no scene head: nothing learns it
        if scene is not None and scene.shape[1] > scene_dim:
            raise ValueError(
                f"the data's scene (observation.environment_state) has {scene.shape[1]} dims, but "
                f"the action expert's scene head has {scene_dim}: raise "
                "`model.experts.action_expert.scene_dim`, or set it to 0 to learn no scene"
            )
        action = self.action_expert.loss(
            self._pad(actions, cfg.max_action_dim),
            batch["action_mask"],
            self.dim_mask(names),
            self._pad(batch["state"], cfg.max_state_dim),
            ids,
            features,
            feature_mask,
            images,
            visual,
            visual_keep,
            None if scene is None else self._pad(scene, scene_dim),
            None if scene is None else self._pad(batch["scene_mask"], scene_dim).bool(),
        )
        losses = {"lang": out.lang_loss, "fast": out.fast_loss, **action, **world}
        return {k: v for k, v in losses.items() if v is not None}

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of each learned expert, and of whatever else the policy holds, by name."""
        experts = {name: getattr(self, name) for name in EXPERT_DIRS}
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
            for name in EXPERT_DIRS:
                getattr(self, name).save_pretrained(tmp / name)
            config = {
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
        config = load_config(directory, CONFIG_NAME, "policy", fix)
        for expert in EXPERT_DIRS:  # not adapters/: a broken adapter leaves the base usable
            check_files(directory / expert, fix)
        try:
            policy = cls(
                vlm=HighLevelVLM.from_pretrained(directory / "vlm"),
                world_model=WorldModel.from_pretrained(directory / "world_model"),
                action_expert=ActionExpert.from_pretrained(directory / "action_expert"),
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
