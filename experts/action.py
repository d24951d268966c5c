"""The action expert: a flow-matching transformer that turns state, the chosen visual subgoal and
the VLM's features into an action chunk.

Tokens it runs over, with bidirectional attention among them:
    [state token, H noisy action tokens]                                  (B, 1 + H, hidden)
and cross-attention to the context:
    [VLM prefix features (B, L, D_vlm), visual-subgoal latent patches]    (B, L + P, hidden)
Knowledge insulation: the VLM features pass through a stop-gradient here, so the action loss never
reaches the VLM (it learns from its language and FAST losses only). The flow time conditions every
block through adaptive layer norm. Actions are zero-padded to `max_action_dim`; the loss is masked
over padded steps (episode end) and padded dims (robots with fewer action dims).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle
from einops import rearrange
from torch import nn

from experts.embodiment_heads import EmbodimentLinear, StateEncoder
from experts.flow_matching import TIMESTEP_SCALE, euler_sample, flow_loss, interpolate, sample_time

_NO_EXTRA_CONDITIONS = {"resolution": None, "aspect_ratio": None}


class ActionExpert(ModelMixin, ConfigMixin):
    """See the module docstring. Config is this signature; `save_pretrained` / `from_pretrained`
    (diffusers) write and read config.json + safetensors."""

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
        num_layers: int = 4,
        num_heads: int = 4,
    ):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by num_heads ({num_heads})")
        if latent_size % latent_patch:
            raise ValueError(f"latent_size {latent_size} not divisible by patch {latent_patch}")
        num_patches = (latent_size // latent_patch) ** 2
        self.state_in = StateEncoder(num_embodiments, max_state_dim, hidden)
        self.action_in = EmbodimentLinear(num_embodiments, max_action_dim, hidden)
        self.action_out = EmbodimentLinear(num_embodiments, hidden, max_action_dim)
        self.suffix_pos = nn.Parameter(torch.zeros(1, 1 + chunk_size, hidden))
        self.vlm_in = nn.Linear(vlm_dim, hidden)
        self.visual_in = nn.Linear(latent_channels * latent_patch**2, hidden)
        self.visual_pos = nn.Parameter(torch.zeros(1, num_patches, hidden))
        self.time = AdaLayerNormSingle(hidden)
        self.blocks = nn.ModuleList(
            BasicTransformerBlock(
                hidden,
                num_heads,
                hidden // num_heads,
                cross_attention_dim=hidden,
                norm_type="ada_norm_single",
            )
            for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False)
        self.out_modulation = nn.Linear(hidden, 2 * hidden)
        nn.init.normal_(self.suffix_pos, std=0.02)
        nn.init.normal_(self.visual_pos, std=0.02)

    def _context(self, vlm_features, vlm_mask, visual_latent):
        """Context tokens (B, L [+ P], hidden) and their mask; the stop-gradient lives here."""
        tokens = [self.vlm_in(vlm_features.detach())]  # knowledge insulation
        masks = [vlm_mask]
        if visual_latent is not None:
            p = self.config.latent_patch
            patches = rearrange(visual_latent, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)
            tokens.append(self.visual_in(patches) + self.visual_pos)
            masks.append(vlm_mask.new_ones(patches.shape[:2]))
        return torch.cat(tokens, 1), torch.cat(masks, 1)

    def velocity(self, noisy_actions, t, state, embodiment_ids, context, context_mask):
        """Predicted velocity (B, H, max_action_dim) for noisy actions at flow times t (B,)."""
        batch = noisy_actions.shape[0]
        # 1. suffix tokens: state, then the noisy actions
        x = torch.cat(
            [self.state_in(state, embodiment_ids), self.action_in(noisy_actions, embodiment_ids)], 1
        )
        x = x + self.suffix_pos
        # 2. time conditioning (adaLN), shared by every block
        t_mod, t_emb = self.time(
            t * TIMESTEP_SCALE, _NO_EXTRA_CONDITIONS, batch_size=batch, hidden_dtype=x.dtype
        )
        # 3. blocks: self-attention over the suffix, cross-attention to the context
        for block in self.blocks:
            x = block(
                x,
                encoder_hidden_states=context,
                encoder_attention_mask=context_mask,
                timestep=t_mod,
            )
        # 4. modulated output norm, per-robot decoder over the action tokens
        shift, scale = self.out_modulation(t_emb).unsqueeze(1).chunk(2, dim=-1)
        x = self.norm_out(x[:, 1:]) * (1 + scale) + shift
        return self.action_out(x, embodiment_ids)

    def loss(
        self,
        actions: torch.Tensor,
        action_mask: torch.Tensor,
        dim_mask: torch.Tensor,
        state: torch.Tensor,
        embodiment_ids: torch.Tensor,
        vlm_features: torch.Tensor,
        vlm_mask: torch.Tensor,
        visual_latent: torch.Tensor | None,
    ) -> torch.Tensor:
        """Flow-matching loss on normalised actions (B, H, max_action_dim), masked over padded
        steps `action_mask` (B, H) and padded dims `dim_mask` (B, max_action_dim)."""
        context, context_mask = self._context(vlm_features, vlm_mask, visual_latent)
        mask = action_mask[:, :, None] & dim_mask[:, None, :]
        # Whatever padding holds, the model sees zeros on padded dims and steps.
        actions = actions * mask
        noise = torch.randn_like(actions) * dim_mask[:, None, :]
        t = sample_time(actions.shape[0], actions.device)
        v = self.velocity(
            interpolate(actions, noise, t), t, state, embodiment_ids, context, context_mask
        )
        return flow_loss(v, actions, noise, mask)

    @torch.no_grad()
    def sample(
        self,
        state: torch.Tensor,
        embodiment_ids: torch.Tensor,
        vlm_features: torch.Tensor,
        vlm_mask: torch.Tensor,
        visual_latent: torch.Tensor | None,
        dim_mask: torch.Tensor | None = None,
        steps: int = 10,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """An action chunk (B, H, max_action_dim), normalised, by Euler integration of the flow;
        zeros on the dims `dim_mask` (B, max_action_dim) marks as padding. The context is
        projected once and reused by every step."""
        context, context_mask = self._context(vlm_features, vlm_mask, visual_latent)
        shape = (state.shape[0], self.config.chunk_size, self.config.max_action_dim)
        noise = torch.randn(shape, generator=generator, device=state.device, dtype=state.dtype)
        dims = torch.ones_like(noise[:, :1]) if dim_mask is None else dim_mask[:, None, :]
        # Padded dims stay exactly zero along the whole path, as in training.
        return euler_sample(
            lambda x, t: self.velocity(x, t, state, embodiment_ids, context, context_mask) * dims,
            noise * dims,
            steps,
        )
