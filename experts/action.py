"""The action expert: a flow-matching transformer that turns state, the current camera frames, the
chosen visual subgoal and the VLM's features into an action chunk.

Tokens, in the order they are attended:
    context  [VLM prefix features (B, L, D_vlm), current-frame tokens (B, I, hidden) from its own
              CNN (`experts.image_encoder`; 6 x 6 per camera at 96 px, + 1 keypoint token per
              camera; with `shared_stem` its first two stages are the scene estimator's), with
              `scene_input` its own scene estimate (B, 1, hidden), visual-subgoal
              latent patches (B, P, ...)]
                                                                    (B, L + I [+ 1] + P, hidden)
    suffix   [state token, H noisy action tokens]                       (B, 1 + H, hidden)
Without a world model (`latent_channels` 0, the flat VLA) there are no visual-subgoal patches;
with `read_vlm` False (inverse dynamics) no VLM features; with `eyes` False no current-frame
tokens (the frames reach the expert through its scene estimate alone).
With `joint` (the joint formulation, as in UVA and DreamZero) the future latent's patches are not
context but noisy suffix tokens after the actions, (B, 1 + H + P, hidden): one transformer
denoises the future and the action chunk together, under one flow time per sample, and returns
the velocity of both. One time, not one per modality: planning integrates the two in one Euler
loop from noise to (future, chunk), which visits equal times only; separate times would also
teach pairs of noise levels (a clean future with noisy actions: inverse dynamics; the reverse:
prediction from actions) that this planner never asks for.
The suffix attends to the context and to itself (bidirectionally); the context attends to nothing
here, so its keys and values are computed once per sample and reused at every flow step.
Knowledge insulation: the VLM features pass through a stop-gradient here, so the action loss never
reaches the VLM (it learns from its language and FAST losses only). The flow time conditions every
block through adaptive layer norm. Actions are zero-padded to `max_action_dim`; the loss is masked
over padded steps (episode end) and padded dims (robots with fewer action dims).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange, repeat
from torch import nn

from experts.embodiment_heads import EmbodimentLinear, StateEncoder
from experts.flow_matching import (
    TIME_DISTRIBUTIONS,
    TIMESTEP_SCALE,
    euler_sample,
    flow_loss,
    inpaint,
    interpolate,
    prefix_length,
    sample_time,
)
from experts.image_encoder import ImageEncoder, random_shift
from experts.scene_estimator import SceneEstimator


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive layer norm: x (B, T, hidden), shift and scale (B, hidden)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """One attention over [context; suffix] with queries from the suffix only, then an MLP; both
    residual branches modulated and gated by the flow time (adaLN-zero, as in DiT). Context tokens
    never attend to the suffix: their keys and values are computed once per sample
    (`context_kv`) and reused at every integration step, like a prefix KV cache."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.context_kv_proj = nn.Linear(hidden, 2 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 4 * hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * hidden, hidden),
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=self.num_heads)  # (B, nh, T, hs)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, L, hidden) -> keys, values (B, nh, L, hs)."""
        k, v = self.context_kv_proj(context).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x, context_kv, attn_mask, modulation):
        """x (B, T, hidden); attn_mask (B, 1, 1, L + T) bool; modulation (B, 6, hidden)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.unbind(1)
        q, k, v = self.qkv(_modulate(self.norm(x), shift1, scale1)).chunk(3, dim=-1)
        k = torch.cat([context_kv[0], self._heads(k)], dim=2)
        v = torch.cat([context_kv[1], self._heads(v)], dim=2)
        h = F.scaled_dot_product_attention(self._heads(q), k, v, attn_mask=attn_mask)
        x = x + gate1[:, None] * self.attn_out(rearrange(h, "b h n d -> b n (h d)"))
        return x + gate2[:, None] * self.mlp(_modulate(self.norm(x), shift2, scale2))


class ActionExpert(ModelMixin, ConfigMixin):
    """See the module docstring. Config is this signature; `save_pretrained` / `from_pretrained`
    (diffusers) write and read config.json + safetensors."""

    # Modules a per-embodiment LoRA adapts by default (regex on names inside this expert): the
    # blocks, the inputs, the eyes and the scene estimator's (a new robot's cameras see another
    # scene) and the keypoints' path into every block's adaptive norm (keypoint_cond,
    # modulation).
    LORA_TARGETS = (
        r"blocks\.\d+\.(qkv|context_kv_proj|attn_out|mlp\.0|mlp\.2)"
        r"|vlm_in|visual_in|future_out|state_in\.out\.1|keypoint_cond\.[02]|modulation\.1"
        rf"|image_in\.(?:{ImageEncoder.LORA_TARGETS})"
        rf"|estimator\.(?:{SceneEstimator.LORA_TARGETS})"
    )

    @register_to_config
    def __init__(
        self,
        vlm_dim: int,
        latent_channels: int = 4,
        latent_size: int = 8,
        latent_patch: int = 2,
        chunk_size: int = 16,
        max_state_dim: int = 8,
        max_action_dim: int = 8,
        num_embodiments: int = 1,
        hidden: int = 128,
        num_layers: int = 3,
        num_heads: int = 4,
        image_size: int | None = 96,
        num_cameras: int = 1,
        image_channels: tuple[int, ...] = (32, 64, 128, 128),
        image_shift: int = 4,
        flow_samples: int = 2,
        time_distribution: str = "logit_normal",
        state_dropout: float = 0.0,
        keypoints: int = 0,
        scene_dim: int = 0,
        scene_input: bool = False,
        scene_teacher: float = 0.5,
        keypoint_conditioning: bool = False,
        keypoint_temperature: float | None = None,
        read_vlm: bool = True,
        world_features: int = 0,
        scene_conditioning: bool = False,
        scene_estimator: int = 0,
        scene_context: bool = False,
        shared_stem: bool = False,
        joint: bool = False,
        eyes: bool = True,
        plan_lag: int = 0,
    ):
        """`latent_channels` 0 makes an expert that reads no visual subgoal (a policy without a
        world model: the flat VLA); `read_vlm` False one that reads no VLM features, only the
        frames, the visual subgoal and the state (inverse dynamics: the actions that lead from
        what it sees to the imagined future); `world_features` > 0 one that reads, in place of
        the visual subgoal's latent patches, the world model's transformer features of that
        width, one token per latent patch (`WorldModel.features`: the representation
        formulation, where nothing is sampled or decoded). `image_size` is the side at which
        the expert sees the current frames (None: it sees them only through the VLM's
        features); `image_shift` the random-shift augmentation of those frames in training, in
        pixels of the frames as given. `flow_samples` is how many (noise, time) draws the loss
        averages per example: the context is encoded once and shared, so more draws cost only
        the small suffix pass and steady the gradient.
        `time_distribution` is how training draws flow times (`experts.flow_matching`).
        `state_dropout` is the share of training samples whose state token is replaced by a
        learned "no state" token; at 1 the expert never reads the robot's state, and acts from
        what it sees. Where every episode starts from one pose, the state alone tells how far
        along its straight path the arm is, and so its direction: an expert that may read it
        learns to continue the motion (a copycat) instead of finding the target in the frames.
        `keypoint_conditioning` feeds the keypoints (as numbers) into every block's adaptive
        layer norm beside the flow time, as Diffusion Policy conditions on its observation
        features (FiLM): a path from what the expert sees to each block that no attention
        weight has to learn first. `keypoint_temperature` is the initial temperature of the
        keypoints' spatial softmax, learned per point from there (None: 1, not learned;
        `experts.image_encoder`).
        `keypoints` K > 0 adds K spatial-softmax points per camera to what the expert sees
        (`experts.image_encoder`); `scene_dim` > 0 (with keypoints) adds a head that regresses
        the scene, the dataset's `observation.environment_state` (object and goal positions,
        padded to `scene_dim`), from those points: an auxiliary loss in training only. The scene
        is never an input, so planning needs nothing but the cameras and the robot's state.
        `scene_input` makes the expert also read its own scene estimate, as one more context
        token behind a stop-gradient (the head learns from the scene loss alone): object and goal
        positions as numbers the transformer can act on. In training a `scene_teacher` share of
        samples reads the true scene there instead, so the token is worth attending to from the
        first steps, while the head still learns. `scene_conditioning` (with `scene_input`)
        feeds the scene read there into every block's adaptive layer norm as well, the path
        `keypoint_conditioning` opened for the keypoints: a single context token can draw
        almost no attention. `scene_estimator` K > 0 gives the scene head eyes of its own
        (`experts.scene_estimator`: a small CNN and K keypoints per camera, trained by the scene
        loss alone, on the current and the future frames of every sample) in place of the
        shared eyes' keypoints, which the action loss also shapes; `scene_context` gives that
        CNN a coarser stage whose view is added to the map its keypoints read
        (`SceneEstimator`'s `context`). `shared_stem` (with a `scene_estimator` and eyes) makes
        the eyes read the estimator's two stages' map behind a stop-gradient in place of two
        stages of their own, which `image_channels`' first two entries must then match: the
        frames pass those stages once for both, and the eyes' keypoints read that map.
        `joint` makes the expert denoise the future latent (B, latent_channels, latent_size,
        latent_size) with the actions instead of reading it (module docstring): `loss` takes the
        true future as `visual_latent` and adds a `world` loss; `sample_joint` draws both.
        `eyes` False builds no CNN of the expert's own on the frames (no current-frame tokens,
        no keypoints): with a `scene_estimator` the frames reach the actions only as the scene
        estimate, and `image_size` is the side the estimator reads.
        `plan_lag` m > 0 tells the expert, in every block's adaptive layer norm beside the flow
        time, how many steps (0..m) have passed since the frame its plan (the VLM's features and
        the visual subgoal) was made from: training draws the lag (the data's `plan_lag`), and
        the planner passes the age of the plan it reuses (`RefreshSchedule` "subgoal")."""
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by num_heads ({num_heads})")
        if scene_dim and not (image_size and (keypoints or scene_estimator)):
            raise ValueError(
                f"scene_dim {scene_dim} needs an image_size and keypoints > 0 or a "
                "scene_estimator > 0: the scene is regressed from keypoints of the expert's frames"
            )
        if scene_estimator and not scene_dim:
            raise ValueError(f"scene_estimator {scene_estimator} needs a scene_dim > 0")
        if shared_stem and not (scene_estimator and eyes and image_size):
            raise ValueError(
                "shared_stem: the eyes read the scene estimator's stem, so it needs a "
                "scene_estimator > 0, eyes: true and an image_size"
            )
        if shared_stem and tuple(image_channels[:2]) != SceneEstimator.CHANNELS:
            raise ValueError(
                f"shared_stem: image_channels' first two entries are the scene estimator's stages "
                f"{list(SceneEstimator.CHANNELS)}, got {list(image_channels)}"
            )
        if shared_stem and len(image_channels) < 3:
            raise ValueError(
                f"shared_stem: image_channels {list(image_channels)} needs a stage of the eyes' "
                "own after the estimator's two"
            )
        if scene_context and not scene_estimator:
            raise ValueError(
                "scene_context widens the scene estimator's view: it needs a scene_estimator > 0"
            )
        if time_distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(
                f"time_distribution {time_distribution!r}: expected one of {TIME_DISTRIBUTIONS}"
            )
        if not 0.0 <= state_dropout <= 1.0:
            raise ValueError(f"state_dropout must be in [0, 1], got {state_dropout}")
        if not eyes and (keypoints or not scene_estimator):
            raise ValueError(
                f"eyes false: the expert has no CNN of its own, so keypoints must be 0 (got "
                f"{keypoints}) and a scene_estimator > 0 must read the frames (got "
                f"{scene_estimator}); for an expert that sees no frames at all, set image_size null"
            )
        if keypoint_conditioning and not (keypoints and image_size):
            raise ValueError("keypoint_conditioning needs keypoints > 0 and an image_size")
        if scene_input and not scene_dim:
            raise ValueError(
                "scene_input needs a scene head: set scene_dim (and keypoints or "
                "scene_estimator) > 0"
            )
        if scene_conditioning and not scene_input:
            raise ValueError("scene_conditioning needs scene_input: true")
        if not 0.0 <= scene_teacher <= 1.0:
            raise ValueError(f"scene_teacher must be in [0, 1], got {scene_teacher}")
        if not (read_vlm or image_size or latent_channels):
            raise ValueError(
                "read_vlm False needs something else to read: an image_size or latent_channels"
            )
        if joint and (not latent_channels or world_features):
            raise ValueError(
                "joint denoises the future latent with the actions: it needs latent_channels > 0 "
                "(a world model's latent space) and no world_features"
            )
        if plan_lag < 0:
            raise ValueError(f"plan_lag must be >= 0, got {plan_lag}")
        if plan_lag and joint:
            raise ValueError(
                f"plan_lag {plan_lag} needs joint: false (a joint expert draws the future with its "
                "actions, so no plan of an earlier frame is reused); set plan_lag: 0"
            )
        if latent_channels and latent_size % latent_patch:
            raise ValueError(f"latent_size {latent_size} not divisible by patch {latent_patch}")
        num_patches = (latent_size // latent_patch) ** 2 if latent_channels else 0
        self.state_in = StateEncoder(num_embodiments, max_state_dim, hidden)
        self.action_in = EmbodimentLinear(num_embodiments, max_action_dim, hidden)
        self.action_out = EmbodimentLinear(num_embodiments, hidden, max_action_dim)
        self.suffix_pos = nn.Parameter(torch.zeros(1, 1 + chunk_size, hidden))
        self.no_state = nn.Parameter(torch.zeros(1, 1, hidden)) if state_dropout else None
        self.vlm_in = nn.Linear(vlm_dim, hidden) if read_vlm else None
        # latent_channels 0: a policy without a world model, so no visual subgoal to read
        width = world_features or latent_channels * latent_patch**2
        self.visual_in = nn.Linear(width, hidden) if latent_channels else None
        self.visual_pos = nn.Parameter(torch.zeros(1, num_patches, hidden))
        self.future_out = nn.Linear(hidden, width) if joint else None
        self.image_in = (
            None
            if image_size is None or not eyes
            else ImageEncoder(  # on the estimator's stride-4 map (its stem), its keypoints too
                hidden,
                image_size // 4,
                num_cameras,
                tuple(image_channels[2:]),
                keypoints,
                keypoint_temperature,
                in_channels=image_channels[1],
                keypoint_stage=0,
            )
            if shared_stem
            else ImageEncoder(
                hidden,
                image_size,
                num_cameras,
                tuple(image_channels),
                keypoints,
                keypoint_temperature,
            )
        )
        # robots differ in what their scene vector holds, so its readout is per robot
        shared_head = scene_dim and not scene_estimator
        self.scene_in = (
            nn.Sequential(nn.Linear(num_cameras * keypoints * 2, hidden), nn.SiLU())
            if shared_head
            else None
        )
        self.scene_out = (
            EmbodimentLinear(num_embodiments, hidden, scene_dim) if shared_head else None
        )
        self.estimator = (
            SceneEstimator(
                scene_dim,
                num_cameras,
                scene_estimator,
                num_embodiments,
                hidden=hidden,
                image_size=image_size,
                context=scene_context,
            )
            if scene_estimator
            else None
        )
        self.scene_token = (
            EmbodimentLinear(num_embodiments, scene_dim, hidden) if scene_input else None
        )
        self.scene_cond = (
            nn.Sequential(nn.Linear(scene_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            if scene_conditioning
            else None
        )
        self.keypoint_cond = (
            nn.Sequential(
                nn.Linear(num_cameras * keypoints * 2, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
            )
            if keypoint_conditioning
            else None
        )
        self.time_proj = Timesteps(hidden, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(hidden, hidden)
        self.lag_embed = nn.Embedding(plan_lag + 1, hidden) if plan_lag else None
        self.blocks = nn.ModuleList(Block(hidden, num_heads) for _ in range(num_layers))
        # One projection gives every block's 6 modulation vectors and the output's 2 per step.
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, (6 * num_layers + 2) * hidden))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        nn.init.zeros_(self.modulation[1].weight)  # adaLN-zero: every block starts as identity
        nn.init.zeros_(self.modulation[1].bias)
        nn.init.normal_(self.suffix_pos, std=0.02)
        nn.init.normal_(self.visual_pos, std=0.02)

    def _context(
        self,
        vlm_features,
        vlm_mask,
        images,
        visual_latent,
        embodiment_ids,
        visual_keep=None,
        true_scene=None,
        estimate=None,
        lag=None,
        stem_maps=None,
    ):
        """Per block, the context keys and values, the attention mask over [context; suffix]
        (B, 1, 1, L [+ I + S] [+ P] + 1 + H), and the scene estimate (B, scene_dim) or None;
        `visual_keep` (B,) bool hides the visual subgoal from the samples where it is False;
        `true_scene` (B, scene_dim) with NaN rows where a sample has none replaces the estimate
        in the scene token of the rows that have one; `estimate` (B, scene_dim) is the scene
        estimate when the caller has it already (else it is made here); `lag` (B,) int64 the
        plan's age in steps, read with `plan_lag` (None: 0); `stem_maps` (B * N, C, S / 4, S /
        4) the scene estimator's stem maps of `images` with `shared_stem`, when the caller has
        them. The stop-gradients of knowledge insulation, of the scene token and of the shared
        stem live here."""
        tokens, masks = [], []
        if self.vlm_in is not None:
            tokens.append(self.vlm_in(vlm_features.detach()))
            masks.append(vlm_mask)
        cond, points = None, None
        if self.config.shared_stem and images is not None and stem_maps is None:
            stem_maps = self.estimator.stem_maps(images)  # once, for the eyes and the estimate
        if self.image_in is not None:
            if images is None:
                raise ValueError("this action expert sees the current frames: pass `images`")
            image_tokens, points = self.image_in(self.eye_input(images, stem_maps))
            tokens.append(image_tokens)
            masks.append(vlm_mask.new_ones(image_tokens.shape[:2]))
            if self.keypoint_cond is not None:
                cond = self.keypoint_cond(self._flat_points(points))
        # read by the scene token, or (the shared eyes' head) a loss; the estimator's own loss
        # comes with its estimate from `loss`; without eyes the estimator alone reads the frames
        if estimate is None and (self.scene_token is not None or self.scene_out is not None):
            if images is None:
                raise ValueError("this action expert estimates the scene: pass `images`")
            estimate = self.estimate_scene(images, embodiment_ids, points, stem_maps)
        if self.scene_token is not None:
            read = estimate.detach()
            if true_scene is not None:
                read = torch.where(true_scene.isnan(), read, true_scene)
            tokens.append(self.scene_token(read, embodiment_ids)[:, None])
            if self.scene_cond is not None:
                cond = self.scene_cond(read) if cond is None else cond + self.scene_cond(read)
            masks.append(vlm_mask.new_ones(read.shape[0], 1))
        if visual_latent is not None:
            if self.visual_in is None:
                raise ValueError(
                    "visual_latent: this action expert reads no visual subgoal (latent_channels "
                    "0: its policy has no world model)"
                )
            if self.config.world_features:  # already tokens (B, P, world_features)
                patches = visual_latent
            else:
                patches = self._patches(visual_latent)
            tokens.append(self.visual_in(patches) + self.visual_pos)
            keep = vlm_mask.new_ones(patches.shape[:2])
            masks.append(keep if visual_keep is None else keep & visual_keep[:, None])
        if self.lag_embed is not None:
            if lag is None:
                lag = torch.zeros(len(vlm_mask), dtype=torch.long, device=vlm_mask.device)
            cond = self.lag_embed(lag) if cond is None else cond + self.lag_embed(lag)
        context = torch.cat(tokens, 1)
        kv = [block.context_kv(context) for block in self.blocks]
        masks.append(vlm_mask.new_ones(vlm_mask.shape[0], self._suffix_length))
        return kv, torch.cat(masks, 1)[:, None, None, :], estimate, cond

    def eye_input(
        self, images: torch.Tensor, stem_maps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What the eyes (`image_in`) read of the frames (B, N, 3, S, S): the frames, or with
        `shared_stem` the scene estimator's stem maps of them (B, N, C, S / 4, S / 4) behind a
        stop-gradient (the estimator learns from the scene loss alone); `stem_maps` (B * N, C,
        S / 4, S / 4) where the caller has them."""
        if not self.config.shared_stem:
            return images
        if stem_maps is None:
            stem_maps = self.estimator.stem_maps(images)
        return rearrange(stem_maps.detach(), "(b n) c h w -> b n c h w", b=len(images))

    @property
    def _suffix_length(self) -> int:
        """State + H actions [+ P future patches with `joint`]."""
        patches = self.visual_pos.shape[1] if self.future_out is not None else 0
        return 1 + self.config.chunk_size + patches

    def _patches(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, h, w) -> patch rows (B, P, C p p)."""
        p = self.config.latent_patch
        return rearrange(latent, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)

    def _unpatch(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch rows (B, P, C p p) -> latent (B, C, h, w)."""
        p, side = self.config.latent_patch, self.config.latent_size // self.config.latent_patch
        return rearrange(patches, "b (h w) (c p q) -> b c (h p) (w q)", h=side, p=p, q=p)

    def _flat_points(self, points: torch.Tensor) -> torch.Tensor:
        """Keypoints (B, N, K, 2) -> (B, num_cameras * K * 2); a robot with fewer cameras than
        the expert has rows reads zeros for the missing ones."""
        flat = rearrange(points, "b n k xy -> b (n k xy)")
        width = self.config.num_cameras * self.config.keypoints * 2
        return F.pad(flat, (0, width - flat.shape[1]))

    def estimate_scene(
        self,
        images: torch.Tensor,
        embodiment_ids: torch.Tensor,
        points: torch.Tensor | None = None,
        stem_maps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The scene estimate (B, scene_dim), normalised, from the frames (B, N, 3, S, S): by the
        scene estimator where there is one (`stem_maps`: its stem's maps of them, when the
        caller has them), else from the shared eyes' keypoints (B, N, K, 2), `points` when the
        caller has them."""
        if not self.config.scene_dim:
            raise ValueError("this action expert has no scene head (scene_dim 0)")
        if self.estimator is not None:
            return self.estimator(images, embodiment_ids, stem_maps)
        if points is None:
            _, points = self.image_in(images)
        return self.scene_out(self.scene_in(self._flat_points(points)), embodiment_ids)

    def velocity(
        self,
        noisy_actions,
        t,
        state,
        embodiment_ids,
        context_kv,
        context_mask,
        state_keep=None,
        cond=None,
        noisy_future=None,
    ):
        """Predicted velocities at flow times t (B,): of the noisy actions (B, H,
        max_action_dim), and with `joint` of the `noisy_future` latent (B, C, h, w), else None.
        `state_keep` (B,) bool puts the "no state" token where it is False; `cond` (B, hidden)
        joins the flow time in every block's modulation."""
        # 1. suffix tokens: state, then the noisy actions
        state_token = self.state_in(state, embodiment_ids)
        if state_keep is not None:
            state_token = torch.where(state_keep[:, None, None], state_token, self.no_state)
        x = torch.cat([state_token, self.action_in(noisy_actions, embodiment_ids)], 1)
        x = x + self.suffix_pos
        if self.future_out is not None:  # joint: the noisy future's patches join the suffix
            if noisy_future is None:
                raise ValueError("a joint expert denoises the future too: pass noisy_future")
            x = torch.cat([x, self.visual_in(self._patches(noisy_future)) + self.visual_pos], 1)
        # 2. time -> every block's modulation
        t_emb = self.time_embed(self.time_proj(t * TIMESTEP_SCALE).to(x.dtype))
        if cond is not None:
            t_emb = t_emb + cond
        modulation = rearrange(self.modulation(t_emb), "b (n d) -> b n d", d=x.shape[-1])
        # 3. blocks
        for i, block in enumerate(self.blocks):
            x = block(x, context_kv[i], context_mask, modulation[:, 6 * i : 6 * i + 6])
        # 4. modulated output norm, per-robot decoder over the action tokens
        shift, scale = modulation[:, -2], modulation[:, -1]
        out = _modulate(self.norm_out(x[:, 1:]), shift, scale)
        horizon = self.config.chunk_size
        actions = self.action_out(out[:, :horizon], embodiment_ids)
        if self.future_out is None:
            return actions, None
        return actions, self._unpatch(self.future_out(out[:, horizon:]))

    def loss(
        self,
        actions: torch.Tensor,
        action_mask: torch.Tensor,
        dim_mask: torch.Tensor,
        state: torch.Tensor,
        embodiment_ids: torch.Tensor,
        vlm_features: torch.Tensor,
        vlm_mask: torch.Tensor,
        images: torch.Tensor | None,
        visual_latent: torch.Tensor | None,
        visual_keep: torch.Tensor | None = None,
        scene: torch.Tensor | None = None,
        scene_mask: torch.Tensor | None = None,
        extra_images: torch.Tensor | None = None,
        extra_scene: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
        extra_ids: torch.Tensor | None = None,
        lag: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """{"action": flow-matching loss on normalised actions (B, H, max_action_dim), masked over
        padded steps `action_mask` (B, H) and padded dims `dim_mask` (B, max_action_dim);
        "scene": mean squared error of the scene estimate against `scene` (B, scene_dim),
        normalised, over the dims `scene_mask` (B, scene_dim) marks real, when this expert has a
        scene head and the batch a scene}. `images` (B, N, 3, S, S) in [0, 1] are the current
        frames, randomly shifted here. `visual_keep` (B,) bool drops the visual subgoal for some
        samples (condition dropout), so the expert also learns to act without it.
        `extra_images` (B', N, 3, S, S), `extra_scene` (B', scene_dim), `extra_mask` (B',
        scene_dim) and their robots' `extra_ids` (B',) are more examples for the scene estimator
        alone, which reads nothing else: the frames of a later step of the same samples, frames
        of other rollouts (the policy's `losses`). A `joint` expert takes the true future latent
        (B, C, h, w) as `visual_latent`, denoises it with the actions under the same flow time
        and adds {"world": flow-matching loss on it}; nothing drops it (`visual_keep` is not
        read): the future is what it generates. `lag` (B,) int64: each sample's plan age in
        steps, 0..`plan_lag` (None: 0; read with `plan_lag` only)."""
        if self.lag_embed is not None and lag is not None:
            if ((lag < 0) | (lag > self.config.plan_lag)).any():  # one host sync, this path only
                low, high = (int(x) for x in lag.aminmax())
                raise ValueError(
                    f"lag: expected steps in [0, {self.config.plan_lag}] (plan_lag), got "
                    f"{low}..{high}: set data.plan_lag to the expert's"
                )
        joint = self.future_out is not None
        future = visual_latent if joint else None
        if joint:
            if future is None:
                raise ValueError("a joint expert learns the future: pass it as visual_latent")
            visual_latent, visual_keep = None, None
        if images is not None:
            images = random_shift(images, self.config.image_shift)
        has_scene = bool(self.config.scene_dim) and scene is not None and bool(scene_mask.any())
        estimate, losses, stem_maps = None, {}, None
        if has_scene and self.estimator is not None:
            if images is None:
                raise ValueError("this action expert sees the current frames: pass `images`")
            frames, ids, targets, masks = images, embodiment_ids, scene, scene_mask
            if extra_images is not None:
                extras = (extra_images, extra_scene, extra_mask, extra_ids)
                if any(x is None for x in extras) or len({len(x) for x in extras}) > 1:
                    raise ValueError(
                        "extra_images, extra_scene, extra_mask and extra_ids go together, one row "
                        "each"
                    )
                extra = random_shift(extra_images, self.config.image_shift)
                frames = torch.cat([images, extra])
                ids = torch.cat([embodiment_ids, extra_ids])
                targets = torch.cat([scene, extra_scene])
                masks = torch.cat([scene_mask, extra_mask.bool()])
            if self.config.shared_stem:  # one pass of the stem serves the estimator and the eyes
                maps = self.estimator.stem_maps(frames)
                estimates = self.estimator(frames, ids, maps)
                stem_maps = maps[: len(images) * images.shape[1]]  # rows (b n): the current frames
            else:
                estimates = self.estimator(frames, ids)
            estimate = estimates[: len(images)]  # the current frames' estimate, read below
            losses["scene"] = ((estimates - targets).square() * masks).sum() / masks.sum()
        true_scene = None
        if self.scene_token is not None and has_scene:
            teach = torch.rand(len(scene), device=scene.device) < self.config.scene_teacher
            teach = teach & scene_mask.any(1)  # rows without a scene read their estimate
            true_scene = torch.where(teach[:, None], scene * scene_mask, torch.nan)
        context_kv, context_mask, estimate, cond = self._context(
            vlm_features,
            vlm_mask,
            images,
            visual_latent,
            embodiment_ids,
            visual_keep,
            true_scene,
            estimate,
            lag,
            stem_maps,
        )
        if has_scene and "scene" not in losses:  # the shared eyes' head
            error = (estimate - scene).square() * scene_mask
            losses["scene"] = error.sum() / scene_mask.sum()
        state_keep = None
        if self.no_state is not None:
            state_keep = torch.rand(len(state), device=state.device) >= self.config.state_dropout
        # n flow draws per example: everything per example repeats n times, (B, ...) -> (B n, ...)
        n = self.config.flow_samples
        context_kv = [tuple(repeat(x, "b ... -> (b n) ...", n=n) for x in kv) for kv in context_kv]
        context_mask, state, embodiment_ids, actions, action_mask, dim_mask = (
            repeat(x, "b ... -> (b n) ...", n=n)
            for x in (context_mask, state, embodiment_ids, actions, action_mask, dim_mask)
        )
        if joint:
            future = repeat(future, "b ... -> (b n) ...", n=n)
        if state_keep is not None:
            state_keep = repeat(state_keep, "b -> (b n)", n=n)
        if cond is not None:
            cond = repeat(cond, "b d -> (b n) d", n=n)
        mask = action_mask[:, :, None] & dim_mask[:, None, :]
        # Whatever padding holds, the model sees zeros on padded dims and steps.
        actions = actions * mask
        noise = torch.randn_like(actions) * dim_mask[:, None, :]
        t = sample_time(
            actions.shape[0], actions.device, distribution=self.config.time_distribution
        )
        future_noise = torch.randn_like(future) if joint else None
        v, v_future = self.velocity(
            interpolate(actions, noise, t),
            t,
            state,
            embodiment_ids,
            context_kv,
            context_mask,
            state_keep,
            cond,
            interpolate(future, future_noise, t) if joint else None,
        )
        if joint:
            losses["world"] = flow_loss(v_future, future, future_noise)
        return {"action": flow_loss(v, actions, noise, mask), **losses}

    @torch.no_grad()
    def sample(
        self,
        state: torch.Tensor,
        embodiment_ids: torch.Tensor,
        vlm_features: torch.Tensor,
        vlm_mask: torch.Tensor,
        images: torch.Tensor | None,
        visual_latent: torch.Tensor | None,
        dim_mask: torch.Tensor | None = None,
        steps: int = 10,
        generator: torch.Generator | None = None,
        prefix: torch.Tensor | None = None,
        scene: torch.Tensor | None = None,
        lag: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """An action chunk (B, H, max_action_dim), normalised, by Euler integration of the flow;
        zeros on the dims `dim_mask` (B, max_action_dim) marks as padding. The context keys and
        values are computed once and reused by every step. `scene` (B, scene_dim), normalised,
        is the true scene for the scene token (`scene_input`) in place of the expert's own
        estimate: privileged, for measuring what perfect perception would give. `lag` (B,)
        int64: the age in steps of the plan read (`plan_lag`).

        `prefix` (B, d, max_action_dim), normalised, fixes the chunk's first d actions (actions
        already committed, for asynchronous execution): they follow their own straight path from
        the noise to themselves (velocity noise - prefix), so at every step the model reads them
        at the noise level of the rest, and the rest is denoised to continue them (inpainting)."""
        if self.future_out is not None:
            raise ValueError("a joint expert samples the future with the actions: sample_joint")
        return self._sample(
            state, embodiment_ids, vlm_features, vlm_mask, images, visual_latent, dim_mask,
            steps, generator, prefix, scene, lag=lag,
        )[0]  # fmt: skip

    @torch.no_grad()
    def sample_joint(
        self,
        state: torch.Tensor,
        embodiment_ids: torch.Tensor,
        vlm_features: torch.Tensor,
        vlm_mask: torch.Tensor,
        images: torch.Tensor | None,
        dim_mask: torch.Tensor | None = None,
        steps: int = 10,
        generator: torch.Generator | None = None,
        prefix: torch.Tensor | None = None,
        scene: torch.Tensor | None = None,
        num_candidates: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`joint`: K = `num_candidates` action chunks (B K, H, max_action_dim), normalised,
        and the future latents (B K, C, h, w) they lead to, each pair integrated together from
        its own noise in one Euler loop (rows b K + k). The context (the VLM's features, the
        frames through the expert's eyes, the scene) is read once per sample and shared by its K
        pairs. The other arguments as in `sample`, one row per sample."""
        if self.future_out is None:
            raise ValueError("this expert reads its visual subgoal (joint: false): sample")
        return self._sample(
            state, embodiment_ids, vlm_features, vlm_mask, images, None, dim_mask, steps,
            generator, prefix, scene, num_candidates,
        )  # fmt: skip

    def _sample(
        self, state, embodiment_ids, vlm_features, vlm_mask, images, visual_latent, dim_mask,
        steps, generator, prefix, scene, num_candidates=1, lag=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        if scene is not None and self.scene_token is None:
            raise ValueError(
                "scene: this action expert reads no scene (train it with scene_input: true)"
            )
        context_kv, context_mask, _, cond = self._context(
            vlm_features, vlm_mask, images, visual_latent, embodiment_ids, true_scene=scene, lag=lag
        )
        k = num_candidates
        if k > 1:  # every sample's context serves its K draws: (B, ...) -> (B K, ...)
            context_kv = [tuple(x.repeat_interleave(k, 0) for x in kv) for kv in context_kv]
            context_mask, state, embodiment_ids = (
                x.repeat_interleave(k, 0) for x in (context_mask, state, embodiment_ids)
            )
            cond = None if cond is None else cond.repeat_interleave(k, 0)
            dim_mask = None if dim_mask is None else dim_mask.repeat_interleave(k, 0)
            prefix = None if prefix is None else prefix.repeat_interleave(k, 0)
        shape = (state.shape[0], self.config.chunk_size, self.config.max_action_dim)
        noise = torch.randn(shape, generator=generator, device=state.device, dtype=state.dtype)
        dims = torch.ones_like(noise[:, :1]) if dim_mask is None else dim_mask[:, None, :]
        # the state is read whenever training read it at all
        state_keep = None
        if self.no_state is not None:
            reads = self.config.state_dropout < 1.0
            state_keep = torch.full((len(state),), reads, device=state.device)
        prefix_length(prefix, self.config.chunk_size)

        # the flow's state, one flat row per sample: the actions, then (joint) the future latent
        parts = [(noise * dims).flatten(1)]
        if self.future_out is not None:
            side = self.config.latent_size
            future_shape = (len(state), self.config.latent_channels, side, side)
            parts.append(
                torch.randn(
                    future_shape, generator=generator, device=state.device, dtype=state.dtype
                ).flatten(1)
            )
        size = parts[0].shape[1]

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            future = x[:, size:].reshape(future_shape) if len(parts) > 1 else None
            v, v_future = self.velocity(
                x[:, :size].reshape(shape), t, state, embodiment_ids, context_kv, context_mask,
                state_keep, cond, future,
            )  # fmt: skip
            v = (inpaint(v, noise, prefix) * dims).flatten(
                1
            )  # padded dims stay exactly zero, as in training
            return v if future is None else torch.cat([v, v_future.flatten(1)], 1)

        out = euler_sample(velocity, torch.cat(parts, 1), steps)
        future = out[:, size:].reshape(future_shape) if len(parts) > 1 else None
        return out[:, :size].reshape(shape), future
