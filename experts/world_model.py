"""The world model: current image + language subgoal -> K candidate visual subgoals (future frames
in a VAE latent space), each scored by a learned progress head. The planner acts on the best one.

Parts, all diffusers building blocks:
    vae          AutoencoderKL: image (B, 3, S, S) in [0, 1] <-> latent (B, C, h, w)
    transformer  PixArtTransformer2DModel: velocity of the future latent at t + k, given the noisy
                 future latent and the current latent (concatenated on channels), the flow time,
                 and cross-attention to the subgoal context (the VLM prefix features, read through
                 a stop-gradient)
    value        ValueHead: latent + pooled context -> task progress in [0, 1]
Losses: `world` (flow matching on the future latent, `experts.flow_matching`), `value` (MSE on
the progress of the current latent, the true future latent and the future the transformer
imagines in the same step, so that the head also ranks imagined latents, which are what it scores
at planning time) and, for the tiny VAE trained here, `vae` (reconstruction + a small KL).
Latents used by `world` and `value` are detached: those losses never reshape the VAE. With a
pretrained VAE (`vae="<hub name or dir>"`) it is frozen and `vae` is None.
With `flow=False` there is no transformer: the world model is the latent space and the value head
only, for the `joint` formulation, whose action expert denoises the future latent together with
the actions (`experts.action`); there is then no `world` loss here, and `value` reads the current
and the true future latent.
With `action_frames=True` the world model is also the policy's only actor (the
`latent_frame_actions` formulation): the action chunk (B, H, A), normalised, is packed into extra
latent frames laid beside the future frame, one action step per patch (its A values in the
patch's C p p slots, zero-padded), and the transformer denoises the strip (B, C, h, w + n w)
under one flow time; the conditioning channels hold the current latent under the future frame
and the robot state (in every patch) under the action frames. The `action` loss is flow matching
on the unpacked actions, masked over padded steps and dims. No action-specific layer exists.
The world model sees one camera: the first of the images it is given. `imagine` and
`imagine_and_act` compute the context's projections once for their K candidates
(`experts.shared_context`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, PixArtTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange, repeat
from torch import nn

from experts.flow_matching import (
    TIMESTEP_SCALE,
    euler_sample,
    flow_loss,
    inpaint,
    interpolate,
    prefix_length,
    sample_time,
)
from experts.shared_context import shared_context

_NO_EXTRA_CONDITIONS = {"resolution": None, "aspect_ratio": None}


def masked_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D), (B, L) bool -> (B, D), the mean over real tokens."""
    weights = mask.to(features.dtype).unsqueeze(-1)
    return (features * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class ValueHead(ModelMixin, ConfigMixin):
    """Predicted task progress of a frame latent under an instruction context.
    latents (B, K, C, h, w), context (B, D) -> (B, K) in [0, 1]."""

    @register_to_config
    def __init__(self, latent_dim: int, context_dim: int, hidden: int = 256):
        super().__init__()
        self.latent_in = nn.Linear(latent_dim, hidden)
        self.context_in = nn.Linear(context_dim, hidden)
        self.mlp = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.latent_in(rearrange(latents, "b k c h w -> b k (c h w)"))
        h = h + self.context_in(context).unsqueeze(1)
        return torch.sigmoid(self.mlp(h).squeeze(-1))


class WorldModel(nn.Module, ConfigMixin):
    """See the module docstring. Config is this signature (`.config.x`), saved beside the parts'
    folders by `save_pretrained` as `world_model_config.json` (diffusers' `ConfigMixin`).

    Args:
        context_dim: width of the context features (the VLM's hidden size).
        vae: hub name or directory of a pretrained AutoencoderKL (frozen); None builds the tiny one.
        transformer: directory of a saved transformer; None builds one from the sizes below.
        image_size: side of the images the VAE sees.
        latent_channels, vae_channels: the tiny VAE (len(vae_channels) - 1 halvings of the side).
        hidden, num_layers, num_heads, patch_size: the transformer.
        kl_weight: weight of the tiny VAE's KL term inside the `vae` loss.
        vae_batch: how many of a batch's current images the `vae` loss reconstructs (the VAE's
            full-resolution convolutions dominate a CPU training step).
        train_vae: whether the VAE trains (`vae` loss); default: only the tiny one does.
        value: directory of a saved value head; None builds one.
        flow: whether the world model predicts the future itself (its transformer); False leaves
            that to a joint action expert (module docstring).
        action_frames: whether the transformer also denoises the action chunk, packed into latent
            frames beside the future (module docstring); chunk_size, max_action_dim and
            max_state_dim are then the chunk's length and the padded action and state widths
            (each at most latent_channels * patch_size^2).
    """

    # Modules a per-embodiment LoRA adapts by default (regex on names inside this expert): the
    # transformer's attention and MLPs and the value head. The VAE stays as the base trained it.
    LORA_TARGETS = (
        r"transformer\.transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)"
        r"|ff\.net\.(0\.proj|2))|value\.(latent_in|context_in|mlp\.[13])"
    )

    config_name = "world_model_config.json"

    @register_to_config
    def __init__(
        self,
        context_dim: int,
        vae: str | None = None,
        transformer: str | None = None,
        value: str | None = None,
        image_size: int = 64,
        latent_channels: int = 4,
        vae_channels: tuple[int, ...] = (16, 32, 32, 32),
        hidden: int = 128,
        num_layers: int = 3,
        num_heads: int = 4,
        patch_size: int = 2,
        value_hidden: int = 256,
        kl_weight: float = 1e-4,
        vae_batch: int = 8,
        train_vae: bool | None = None,
        flow: bool = True,
        action_frames: bool = False,
        chunk_size: int = 16,
        max_action_dim: int = 8,
        max_state_dim: int = 8,
    ):
        super().__init__()
        if vae is None:
            self.vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
                up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
                block_out_channels=tuple(vae_channels),
                layers_per_block=1,
                latent_channels=latent_channels,
                norm_num_groups=min(16, vae_channels[0]),
                sample_size=image_size,
                scaling_factor=1.0,
            )
        else:
            self.vae = AutoencoderKL.from_pretrained(vae)
        self.train_vae = vae is None if train_vae is None else train_vae
        self.register_to_config(train_vae=self.train_vae)  # a saved tiny VAE trains on when loaded
        self.vae.requires_grad_(self.train_vae)
        channels = self.vae.config.latent_channels
        latent_size = image_size // 2 ** (len(self.vae.config.block_out_channels) - 1)
        if not flow:
            self.transformer = None
        elif transformer is None:
            self.transformer = PixArtTransformer2DModel(
                sample_size=latent_size,
                patch_size=patch_size,
                in_channels=2 * channels,  # noisy future latent + current latent
                out_channels=channels,
                num_layers=num_layers,
                attention_head_dim=hidden // num_heads,
                num_attention_heads=num_heads,
                cross_attention_dim=hidden,
                caption_channels=context_dim,
                norm_type="ada_norm_single",
                use_additional_conditions=False,
                norm_num_groups=None,
                num_embeds_ada_norm=1000,
            )
        else:
            self.transformer = PixArtTransformer2DModel.from_pretrained(transformer)
        if value is None:
            self.value = ValueHead(channels * latent_size**2, context_dim, value_hidden)
        else:
            self.value = ValueHead.from_pretrained(value)
        self.latent_shape = (channels, latent_size, latent_size)
        self.num_action_frames = 0
        if action_frames:
            slots = channels * patch_size**2
            if not flow:
                raise ValueError("action_frames: the transformer denoises them; set flow: true")
            if max(max_action_dim, max_state_dim) > slots:
                raise ValueError(
                    f"action_frames: a patch holds {slots} values (latent_channels x patch_size^2)"
                    f", fewer than max_action_dim {max_action_dim} or max_state_dim "
                    f"{max_state_dim}"
                )
            self.num_action_frames = math.ceil(chunk_size / (latent_size // patch_size) ** 2)

    # 1. latent space --------------------------------------------------------------------------
    def _first_camera(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, S, S) or (B, 3, S, S) in [0, 1] -> (B, 3, size, size) in [-1, 1]."""
        x = images[:, 0] if images.dim() == 5 else images
        size = self.config.image_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="area")
        return x * 2 - 1

    def _to_latent(self, posterior_mean: torch.Tensor) -> torch.Tensor:
        shift = self.vae.config.shift_factor or 0.0
        return (posterior_mean - shift) * self.vae.config.scaling_factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, [N,] 3, S, S) in [0, 1] -> latents (B, C, h, w) (posterior means)."""
        return self._to_latent(self.vae.encode(self._first_camera(images)).latent_dist.mean)

    def freeze_vae(self) -> None:
        """Stop training the VAE (no `vae` loss, no gradients), in memory only: the saved config
        keeps `train_vae`. A frozen VAE's latents are fixed, so a trainer may encode each frame
        once (`hybrid.latent_cache`)."""
        self.train_vae = False
        self.vae.requires_grad_(False)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (..., C, h, w) -> images (..., 3, S, S) in [0, 1]."""
        lead = latents.shape[:-3]
        z = latents.reshape(-1, *latents.shape[-3:])
        z = z / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        images = (self.vae.decode(z).sample.clamp(-1, 1) + 1) / 2
        return images.reshape(*lead, *images.shape[1:])

    # 2. the future-frame flow -------------------------------------------------------------------
    def _flow(self) -> PixArtTransformer2DModel:
        if self.transformer is None:
            raise ValueError(
                "this world model predicts no future (flow: false, the joint formulation, where "
                "the action expert denoises the future with the actions)"
            )
        return self.transformer

    def velocity(self, noisy_future, t, current, context, context_mask):
        """Velocity (B, C, h, w) of the future latent at flow times t (B,)."""
        return self._flow()(
            torch.cat([noisy_future, current], dim=1),
            encoder_hidden_states=context,
            encoder_attention_mask=context_mask,
            timestep=t * TIMESTEP_SCALE,
            added_cond_kwargs=_NO_EXTRA_CONDITIONS,
        ).sample

    # 2b. actions as latent frames (`action_frames`) ----------------------------------------------
    def _strip(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows (B, T, F), F <= C p^2, one per patch of the action frames in raster order over
        their strip -> the frames side by side (B, C, h, n w), zero-padded."""
        channels, side, _ = self.latent_shape
        p, grid = self.config.patch_size, side // self.config.patch_size
        tokens = self.num_action_frames * grid**2
        rows = F.pad(rows, (0, channels * p * p - rows.shape[-1], 0, tokens - rows.shape[1]))
        return rearrange(
            rows, "b (gh gw) (c ph pw) -> b c (gh ph) (gw pw)", gh=grid, ph=p, pw=p
        ).contiguous()

    def _rows(self, strip: torch.Tensor) -> torch.Tensor:
        """`_strip`'s inverse: (B, C, h, n w) -> (B, chunk_size, max_action_dim)."""
        p = self.config.patch_size
        rows = rearrange(strip, "b c (gh ph) (gw pw) -> b (gh gw) (c ph pw)", ph=p, pw=p)
        return rows[:, : self.config.chunk_size, : self.config.max_action_dim]

    def _conditioning(self, current: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """What `velocity` reads beside the noisy strip (B, C, h, w + n w): the current latent
        (B, C, h, w) under the future, the state (B, max_state_dim), normalised, in every patch
        under the action frames."""
        tokens = self.num_action_frames * (self.latent_shape[1] // self.config.patch_size) ** 2
        return torch.cat([current, self._strip(repeat(state, "b s -> b t s", t=tokens))], -1)

    def _need_actions(self) -> None:
        if not self.num_action_frames:
            raise ValueError(
                "this world model denoises no actions (action_frames: false); the policy's "
                "action expert acts"
            )

    @torch.no_grad()
    def imagine_and_act(
        self,
        current: torch.Tensor,
        state: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        dim_mask: torch.Tensor,
        num_candidates: int = 8,
        steps: int = 4,
        generator: torch.Generator | None = None,
        prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`action_frames`: K = `num_candidates` action chunks (B K, H, max_action_dim),
        normalised, zero on the padded dims of `dim_mask` (B, max_action_dim), and the future
        latents (B K, C, h, w) they were denoised with, each pair from its own noise in one Euler
        loop (rows b K + k). current (B, C, h, w); state (B, max_state_dim), normalised; context
        (B, L, D) with mask (B, L). `prefix` (B, d, max_action_dim), normalised, fixes the
        chunk's first d actions (committed ones) by the action expert's inpainting rule: they
        follow their own straight path from the noise (velocity noise - prefix)."""
        self._need_actions()
        k, horizon = num_candidates, self.config.chunk_size
        current, state, context, context_mask, dim_mask = (
            x.repeat_interleave(k, 0) for x in (current, state, context, context_mask, dim_mask)
        )
        prefix_length(prefix, horizon)
        prefix = None if prefix is None else prefix.repeat_interleave(k, 0)
        dims = dim_mask[:, None, :].to(current.dtype)
        shape = (len(current), horizon, self.config.max_action_dim)
        action_noise = (
            torch.randn(shape, generator=generator, device=current.device, dtype=current.dtype)
            * dims
        )
        noise = torch.randn(
            current.shape, generator=generator, device=current.device, dtype=current.dtype
        )
        width = current.shape[-1]
        conditioning = self._conditioning(current, state)  # the same at every step

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v = self.velocity(x, t, conditioning, context, context_mask)
            v_actions = self._rows(v[..., width:]) * dims  # padding stays exactly zero
            v_actions = inpaint(v_actions, action_noise, prefix)
            return torch.cat([v[..., :width], self._strip(v_actions)], -1)

        with shared_context(self._flow(), k):
            strip = euler_sample(velocity, torch.cat([noise, self._strip(action_noise)], -1), steps)
        return self._rows(strip[..., width:]), strip[..., :width]

    def losses(
        self,
        images: torch.Tensor,
        current: torch.Tensor,
        future: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        progress: torch.Tensor,
        future_progress: torch.Tensor,
        actions: torch.Tensor | None = None,
        action_mask: torch.Tensor | None = None,
        dim_mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor | None], torch.Tensor | None]:
        """`world`, `value` and `vae` (None with a frozen VAE) for one batch, and the imagined
        future (B, C, h, w), detached: the one-step estimate of the future latent from the noisy
        one, x_t - t * v, whose quality runs from exact (t near 0) to a blurry mean (t near 1),
        like the futures the planner samples. Without `flow`: `value` and `vae`, and None.

        images (B, N, 3, S, S) in [0, 1], for the VAE's reconstruction; current and future
        (B, C, h, w), the latents of the frames at t and t + k from `encode` (the caller encodes
        once and reuses them); context (B, L, D), context_mask (B, L); progress and
        future_progress (B,). With `action_frames` also `action`, from actions (B, H,
        max_action_dim), normalised, action_mask (B, H), dim_mask (B, max_action_dim) and state
        (B, max_state_dim), normalised.
        """
        context, current, future = context.detach(), current.detach(), future.detach()
        batch = images.shape[0]
        if self.train_vae:
            targets = self._first_camera(images[: min(batch, self.config.vae_batch)])
            posterior = self.vae.encode(targets).latent_dist
            reconstruction = self.vae.decode(posterior.sample()).sample
            kl = posterior.kl().mean() / targets[0].numel()
            vae_loss = F.mse_loss(reconstruction, targets) + self.config.kl_weight * kl
        else:
            vae_loss = None
        pooled = masked_mean(context, context_mask)
        if self.transformer is None:  # joint: the action expert learns the future
            values = self.value(torch.stack([current, future], 1), pooled)  # (B, 2)
            targets = torch.stack([progress, future_progress], 1).to(values.dtype)
            return {"value": F.mse_loss(values, targets), "vae": vae_loss}, None
        noise = torch.randn_like(future)
        t = sample_time(batch, future.device)
        noisy = interpolate(future, noise, t)
        acting = {}
        if self.num_action_frames:
            if actions is None or action_mask is None or dim_mask is None or state is None:
                raise ValueError("action_frames: losses need actions, action_mask, dim_mask, state")
            mask = action_mask[:, :, None] & dim_mask[:, None, :]
            actions = actions * mask  # the model sees zeros on padded dims and steps
            action_noise = torch.randn_like(actions) * dim_mask[:, None, :]
            strip = self._strip(interpolate(actions, action_noise, t))
            conditioning = self._conditioning(current, state)
            v = self.velocity(torch.cat([noisy, strip], -1), t, conditioning, context, context_mask)
            width = future.shape[-1]
            acting = {"action": flow_loss(self._rows(v[..., width:]), actions, action_noise, mask)}
            v = v[..., :width]
        else:
            v = self.velocity(noisy, t, current, context, context_mask)
        imagined = (noisy - t[:, None, None, None] * v).detach()
        values = self.value(torch.stack([current, future, imagined], 1), pooled)  # (B, 3)
        targets = torch.stack([progress, future_progress, future_progress], 1).to(values.dtype)
        losses = {
            "world": flow_loss(v, future, noise),
            "value": F.mse_loss(values, targets),
            "vae": vae_loss,
            **acting,
        }
        return losses, imagined

    def features(
        self, current: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor
    ) -> torch.Tensor:
        """The transformer's last hidden states (B, P, hidden), P = (h / patch)^2 tokens, from
        one pass at flow time 1 with the noise's mean (zeros) as the future: what the world model
        expects from the current latent (B, C, h, w) and the context (B, L, D), read as a
        representation and never sampled or decoded (the `representation` formulation).
        Deterministic, so training and planning read the same thing."""
        captured = []
        hook = (
            self._flow()
            .transformer_blocks[-1]
            .register_forward_hook(lambda module, inputs, output: captured.append(output))
        )
        try:
            t = torch.ones(len(current), device=current.device, dtype=current.dtype)
            self.velocity(torch.zeros_like(current), t, current, context, context_mask)
        finally:
            hook.remove()
        return captured[0]

    @property
    def feature_dim(self) -> int:
        """Width of `features`' tokens."""
        return self._flow().inner_dim

    # 3. planning --------------------------------------------------------------------------------
    @torch.no_grad()
    def imagine(
        self,
        current: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        num_candidates: int = 8,
        steps: int = 4,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """K candidate future latents (B, K, C, h, w) from independent noise, in one batched call.
        current (B, C, h, w), the latent of the current frame (`encode`); context (B, L, D) with
        mask (B, L)."""
        if self.num_action_frames:
            raise ValueError(
                "this world model denoises its futures with the actions (action_frames): "
                "imagine_and_act"
            )
        k = num_candidates
        current = repeat(current, "b c h w -> (b k) c h w", k=k)
        context = repeat(context, "b l d -> (b k) l d", k=k)
        context_mask = repeat(context_mask, "b l -> (b k) l", k=k)
        noise = torch.randn(
            current.shape, generator=generator, device=current.device, dtype=current.dtype
        )
        with shared_context(self._flow(), k):  # the context's projections once, not k times
            futures = euler_sample(
                lambda x, t: self.velocity(x, t, current, context, context_mask), noise, steps
            )
        return rearrange(futures, "(b k) c h w -> b k c h w", k=k)

    @torch.no_grad()
    def score(
        self, latents: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor
    ) -> torch.Tensor:
        """Predicted progress (B, K) of candidate latents (B, K, C, h, w)."""
        return self.value(latents, masked_mean(context, context_mask))

    # 4. persistence ---------------------------------------------------------------------------
    PARTS = ("vae", "transformer", "value")

    def save_pretrained(self, directory: str | Path) -> None:
        """<directory>/{vae,transformer,value}/ (diffusers) and the config. The config keeps the
        parts' sources as first given (None: built here), so a loaded model's config equals the
        saved one; loading reads the parts' weights from these folders."""
        directory = Path(directory)
        for part in self.PARTS:
            if getattr(self, part) is not None:
                getattr(self, part).save_pretrained(directory / part)
        self.save_config(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> WorldModel:
        directory = Path(directory)
        config = cls.load_config(directory)
        parts = [p for p in cls.PARTS if p != "transformer" or config.get("flow", True)]
        model = cls.from_config(config, **{part: str(directory / part) for part in parts})
        model.register_to_config(**{part: config.get(part) for part in cls.PARTS})  # sources
        return model
