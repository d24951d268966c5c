"""Latent plans (the `latent_plan` formulation, after Being-H0.7): a few plan tokens that say
where the next window goes, learned from trajectories and read by the action expert in place of
an imagined future. Nothing is decoded to pixels.

    posterior  future latent (B, C, h, w) + action chunk (B, H, A)           -> plan (B, P, d)
               (training: it sees where the window went)
    prior      current latent (B, C, h, w) + state (B, S) + VLM context (B, L, D) -> plan
               (planning: it sees only what the robot sees and is told)

Each is a diagonal Gaussian over the plan, read out from P learned query tokens of a small
transformer encoder (torch's) over the inputs' tokens: latent patches, action steps, the state,
the context. The action expert learns on plans drawn from the posterior (reparameterised), so
the action loss shapes what the plan carries; the `plan` loss, KL(posterior || prior) per plan
value, pulls the prior towards the plans the posterior infers and keeps those plans few-bit. At
planning the prior draws the plan. The VLM context enters behind a stop-gradient (knowledge
insulation), and the latents are the world model's, detached: the plan never reshapes the VAE.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange, repeat
from torch import nn


def _encoder(hidden: int, num_layers: int, num_heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        hidden, num_heads, 4 * hidden, dropout=0.0, batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)


class LatentPlan(ModelMixin, ConfigMixin):
    """See the module docstring. Config is this signature (`.config.x`).

    Args:
        latent_channels, latent_size, patch_size: the world model's latent and its patching.
        chunk_size, max_action_dim, max_state_dim: the action chunk and the padded widths.
        context_dim: width of the VLM's features.
        plan_tokens: P, a square (the action expert reads them as a side x side grid).
        plan_dim: d, the width of each plan token.
        hidden, num_layers, num_heads: each of the two encoders.
    """

    @register_to_config
    def __init__(
        self,
        latent_channels: int,
        latent_size: int,
        chunk_size: int,
        max_action_dim: int,
        max_state_dim: int,
        context_dim: int,
        plan_tokens: int = 4,
        plan_dim: int = 16,
        patch_size: int = 2,
        hidden: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
    ):
        super().__init__()
        if round(plan_tokens**0.5) ** 2 != plan_tokens:
            raise ValueError(f"plan_tokens must be a square (4, 9, 16, ...), got {plan_tokens}")
        if latent_size % patch_size:
            raise ValueError(f"latent_size {latent_size} not divisible by patch {patch_size}")
        patches = (latent_size // patch_size) ** 2
        self.patch_in = nn.Linear(latent_channels * patch_size**2, hidden)
        self.patch_pos = nn.Parameter(torch.zeros(1, patches, hidden))
        self.action_in = nn.Linear(max_action_dim, hidden)
        self.step_pos = nn.Parameter(torch.zeros(1, chunk_size, hidden))
        self.state_in = nn.Linear(max_state_dim, hidden)
        self.context_in = nn.Linear(context_dim, hidden)
        self.posterior_queries = nn.Parameter(torch.randn(1, plan_tokens, hidden) * 0.02)
        self.prior_queries = nn.Parameter(torch.randn(1, plan_tokens, hidden) * 0.02)
        self.posterior_net = _encoder(hidden, num_layers, num_heads)
        self.prior_net = _encoder(hidden, num_layers, num_heads)
        self.posterior_out = nn.Linear(hidden, 2 * plan_dim)
        self.prior_out = nn.Linear(hidden, 2 * plan_dim)

    def _patches(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, N, hidden), with positions."""
        p = self.config.patch_size
        patches = rearrange(latent, "b c (gh ph) (gw pw) -> b (gh gw) (c ph pw)", ph=p, pw=p)
        return self.patch_in(patches) + self.patch_pos

    def _read(self, net, queries, out, tokens, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The P query outputs of `net` over [queries; tokens] -> mean, log-variance (B, P, d)."""
        queries = repeat(queries, "1 p d -> b p d", b=tokens.shape[0])
        keep = torch.cat([mask.new_ones(queries.shape[:2]), mask], 1)
        h = net(torch.cat([queries, tokens], 1), src_key_padding_mask=~keep)
        mean, log_var = out(h[:, : queries.shape[1]]).chunk(2, -1)
        return mean, log_var.clamp(-8.0, 4.0)

    def posterior(
        self, future: torch.Tensor, actions: torch.Tensor, action_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The plan of a window that went to `future` (B, C, h, w) by `actions` (B, H,
        max_action_dim), normalised, over the real steps `action_mask` (B, H): mean and
        log-variance (B, P, d)."""
        steps = self.action_in(actions) + self.step_pos
        tokens = torch.cat([self._patches(future.detach()), steps], 1)
        ones = torch.ones(len(tokens), self.patch_pos.shape[1], dtype=torch.bool)
        mask = torch.cat([ones.to(tokens.device), action_mask.bool()], 1)
        return self._read(
            self.posterior_net, self.posterior_queries, self.posterior_out, tokens, mask
        )

    def prior(
        self,
        current: torch.Tensor,
        state: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The plan expected from the current latent (B, C, h, w), the state (B, max_state_dim),
        normalised, and the VLM context (B, L, D) with mask (B, L), read through a
        stop-gradient: mean and log-variance (B, P, d)."""
        tokens = torch.cat(
            [
                self._patches(current.detach()),
                self.state_in(state)[:, None],
                self.context_in(context.detach()),
            ],
            1,
        )
        ones = torch.ones(len(tokens), self.patch_pos.shape[1] + 1, dtype=torch.bool)
        mask = torch.cat([ones.to(tokens.device), context_mask.bool()], 1)
        return self._read(self.prior_net, self.prior_queries, self.prior_out, tokens, mask)

    def loss(
        self,
        current: torch.Tensor,
        future: torch.Tensor,
        actions: torch.Tensor,
        action_mask: torch.Tensor,
        state: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A plan (B, P, d) drawn from the posterior (reparameterised, so that the action loss
        reaches the posterior through it), and {"plan": KL(posterior || prior), the mean per
        plan value}. Shapes as in `posterior` and `prior`."""
        q_mean, q_log_var = self.posterior(future, actions * action_mask[..., None], action_mask)
        p_mean, p_log_var = self.prior(current, state, context, context_mask)
        plan = q_mean + (0.5 * q_log_var).exp() * torch.randn_like(q_mean)
        kl = 0.5 * (
            p_log_var
            - q_log_var
            + (q_log_var.exp() + (q_mean - p_mean).square()) / p_log_var.exp()
            - 1
        )
        return plan, {"plan": kl.mean()}

    @torch.no_grad()
    def sample(
        self,
        current: torch.Tensor,
        state: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """A plan (B, P, d) drawn from the prior; the arguments are `prior`'s."""
        mean, log_var = self.prior(current, state, context, context_mask)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + (0.5 * log_var).exp() * noise
