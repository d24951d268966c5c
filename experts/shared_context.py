"""Cross-attention for K candidates that share one context: the world model's imagination.

`WorldModel.imagine` denoises K candidate futures of one observation as K rows of a batch. All K
rows read the same VLM context, so diffusers' PixArt would project that context (its caption
projection) and compute every block's cross-attention keys and values K times over. Inside
`shared_context(transformer, k)`, both are computed once per group of k consecutive rows, and the
k rows' queries attend to them in one product:

    queries (B k, N, D) -> (B, heads, k N, d);  keys, values (B, heads, L, d) from context row 0
    of each group;  out -> (B k, N, D)

The attention is the same as the plain path's, with fewer products (rows of a group must share
their context and its mask; `imagine` repeats them). Self-attention, the norms and the MLPs are
untouched. A transformer whose cross-attention this does not cover (query/key norms, a
residual or norm on the context) keeps diffusers' own processors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class GroupedProjection(nn.Module):
    """Applies `projection` to the first row of each group of `k` rows and repeats the result:
    (B k, L, D) -> (B k, L, D')."""

    def __init__(self, projection: nn.Module, k: int):
        super().__init__()
        self.projection, self.k = projection, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x[:: self.k]).repeat_interleave(self.k, dim=0)


class SharedContextAttnProcessor:
    """Diffusers attention processor for a cross-attention whose rows come in groups of `k` that
    share one context (module docstring). hidden_states (B k, N, D), encoder_hidden_states
    (B k, L, Dc), attention_mask: PixArt's context bias (B k, 1, L) or None -> (B k, N, D)."""

    def __init__(self, k: int):
        self.k = k

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        k, heads = self.k, attn.heads
        context = encoder_hidden_states[::k]
        query = rearrange(attn.to_q(hidden_states), "(b k) n (h d) -> b h (k n) d", k=k, h=heads)
        key = rearrange(attn.to_k(context), "b l (h d) -> b h l d", h=heads)
        value = rearrange(attn.to_v(context), "b l (h d) -> b h l d", h=heads)
        bias = None if attention_mask is None else attention_mask[::k, None].to(query.dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=attn.scale)
        out = rearrange(out, "b h (k n) d -> (b k) n (h d)", k=k)
        return attn.to_out[1](attn.to_out[0](out))


def _covered(attn) -> bool:
    """Whether this cross-attention is the plain one `SharedContextAttnProcessor` computes."""
    return (
        getattr(attn, "norm_q", None) is None
        and getattr(attn, "norm_k", None) is None
        and getattr(attn, "norm_cross", None) is None
        and getattr(attn, "spatial_norm", None) is None
        and getattr(attn, "group_norm", None) is None
        and not getattr(attn, "residual_connection", False)
        and getattr(attn, "rescale_output_factor", 1.0) == 1.0
    )


@contextmanager
def shared_context(transformer: nn.Module, k: int) -> Iterator[None]:
    """Within the block, `transformer` (a diffusers PixArtTransformer2DModel) computes its context
    projection and cross-attention keys and values once per group of `k` rows. Restores its own
    caption projection and processors on exit, also on error. k == 1, or a cross-attention it
    does not cover, leaves the transformer as it is."""
    blocks = getattr(transformer, "transformer_blocks", [])
    attns = [block.attn2 for block in blocks if getattr(block, "attn2", None) is not None]
    if k == 1 or not attns or not all(_covered(a) for a in attns):
        yield
        return
    projection = transformer.caption_projection
    processors = [a.processor for a in attns]
    try:
        if projection is not None:
            transformer.caption_projection = GroupedProjection(projection, k)
        for a in attns:
            a.processor = SharedContextAttnProcessor(k)
        yield
    finally:
        transformer.caption_projection = projection
        for a, processor in zip(attns, processors, strict=True):
            a.processor = processor
