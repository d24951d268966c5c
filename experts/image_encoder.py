"""The action expert's own eyes: camera frames -> spatial tokens, from a small strided CNN trained
by the action loss alone (the VLM's features are insulated, so they cannot learn where the
gripper and the object are for the actions' sake).

    images (B, N, 3, S, S) in [0, 1]  ->  tokens (B, N * g * g [+ N], hidden)
                                          keypoints (B, N, K, 2) in [-1, 1], or None
    g = S / 2**len(channels)

With `keypoints` K > 0 the encoder also finds K points per camera by a spatial softmax over the
feature map of its second stage (stride 4: 24 x 24 at 96 px), the expected image position of
each of K learned heat maps (Levine et al. 2016, "End-to-end training of deep visuomotor
policies"). Each camera's K points become one more token, so the transformer reads positions as
numbers, at sub-cell precision, not only as which grid cell lights up. The action expert can also
regress the scene from them (`ActionExpert`), which teaches them to follow the objects and goal.
`keypoint_temperature` divides each heat map by a learned temperature (one per point, from the
value given) before the softmax. The 1x1 convolution's logits start small (std 0.28 across the
24 x 24 map, on quickstart frames), so at temperature 1 a softmax spreads over ~550 of its 576
cells (0.1: ~21): its point sits near the image centre and its gradient is spread over the map.

With `in_channels` other than 3 the encoder reads another CNN's feature map (B, N, in_channels, S,
S), S = `image_size`, as it is, in place of frames: its stages continue that CNN's, and
`keypoint_stage` 0 puts its keypoints on that map itself (the action expert's `shared_stem`,
whose first two stages are the scene estimator's).

`random_shift` is the augmentation that keeps such an encoder from memorising pixel positions on
a few demonstrations (pad by replication, crop back at a random offset; Kostrikov et al. 2020).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator | None = None):
    """Each image of (B, N, 3, S, S) shifted by its own random offset in [-pad, pad] pixels per
    axis; borders repeat the edge pixels. pad 0 returns the images unchanged."""
    if pad <= 0:
        return images
    b, n, c, h, w = images.shape
    x = F.pad(rearrange(images, "b n c h w -> (b n) c h w"), (pad,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b * n), generator=generator).tolist()
    crops = [x[i, :, y : y + h, z : z + w] for i, (y, z) in enumerate(zip(dy, dx, strict=True))]
    return rearrange(torch.stack(crops), "(b n) c h w -> b n c h w", b=b)


class ImageEncoder(nn.Module):
    """See the module docstring. Each stage halves the side (3x3 convolution, stride 2, group
    norm, SiLU); a learned position embedding per camera and grid cell follows the projection.
    A robot with fewer cameras than `num_cameras` (one added by `hybrid finetune`) uses the
    first ones' embeddings."""

    # What a per-robot LoRA adapts in these eyes (regex on names inside this encoder): a new robot
    # brings new cameras. The stem's convolutions are every third module (conv, norm, SiLU): the
    # indices listed cover up to six stages (a 64-pixel grid cell); a seventh stage's would not be
    # adapted.
    LORA_TARGETS = r"stem\.(?:0|3|6|9|12|15|18)|proj|heatmaps|keypoint_proj"

    def __init__(
        self,
        hidden: int,
        image_size: int,
        num_cameras: int = 1,
        channels: tuple[int, ...] = (32, 64, 128),
        keypoints: int = 0,
        keypoint_temperature: float | None = None,
        in_channels: int = 3,
        keypoint_stage: int = 2,
    ):
        """`keypoint_stage`: how many of the stages run before the map the keypoints read (0:
        the input map, for `in_channels` other than 3)."""
        super().__init__()
        if keypoint_temperature is not None and not keypoint_temperature > 0:
            raise ValueError(
                f"keypoint_temperature must be > 0 or None, got {keypoint_temperature}"
            )
        if image_size % 2 ** len(channels):
            raise ValueError(
                f"image_size {image_size} must be divisible by 2**{len(channels)} "
                f"(one halving per entry of channels {list(channels)})"
            )
        reads_map = keypoint_stage == 0 and in_channels != 3
        if keypoints and not (0 < keypoint_stage <= len(channels) or reads_map):
            raise ValueError(
                f"keypoint_stage {keypoint_stage}: keypoints read the output of one of the "
                f"{len(channels)} stages (1..{len(channels)}), or 0, the input map, where the "
                f"input is another CNN's map (in_channels {in_channels}, not 3)"
            )
        layers, width = strided_stages(channels, in_channels)
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Linear(width, hidden)
        self.image_size, self.num_cameras, self.keypoints = image_size, num_cameras, keypoints
        self.in_channels = in_channels
        grid = image_size // 2 ** len(channels)
        self.pos = nn.Parameter(torch.randn(1, num_cameras * grid * grid, hidden) * 0.02)
        if keypoints:
            fine_width = channels[keypoint_stage - 1] if keypoint_stage else in_channels
            self.heatmaps = nn.Conv2d(fine_width, keypoints, 1)
            self.keypoint_proj = nn.Linear(2 * keypoints, hidden)
            self.keypoint_pos = nn.Parameter(torch.randn(1, num_cameras, hidden) * 0.02)
        # per point, in log space so that it stays positive; None: temperature 1, not learned
        self.log_temperature = (
            nn.Parameter(torch.full((keypoints,), math.log(keypoint_temperature)))
            if keypoints and keypoint_temperature is not None
            else None
        )
        # The keypoints' map is by default the second stage's output (3 modules per stage; -1:
        # the input). Measured on the quickstart tasks (60 demonstrations each, the encoder
        # trained on the scene alone, 1,000 steps): the puck's held-out error is 1.8-1.9 cm from
        # this map, 2.5-2.6 cm from the next, coarser one.
        self._fine_layer = 3 * keypoint_stage - 1 if keypoints else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens, maps = self._stem(images)
        if maps is None:
            return tokens, None
        b = images.shape[0]
        points = rearrange(spatial_softmax(maps), "(b n) k xy -> b n k xy", b=b)
        point_tokens = self.keypoint_proj(rearrange(points, "b n k xy -> b n (k xy)"))
        point_tokens = point_tokens + self.keypoint_pos[:, : points.shape[1]]
        return torch.cat([tokens, point_tokens], 1), points

    def heatmaps_softmax(self, images: torch.Tensor) -> torch.Tensor:
        """Each keypoint's softmax over its map, (B, N, K, h * w): where it looks, for diagnosis."""
        _, maps = self._stem(images)
        weights = rearrange(maps, "(b n) k h w -> b n k (h w)", b=images.shape[0])
        return weights.softmax(-1)

    def _stem(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Grid tokens (B, N * g * g, hidden) and the keypoints' heat-map logits (B * N, K, h,
        w) of the map they read, divided by their temperature (None without keypoints)."""
        c = self.in_channels
        cameras = images.shape[1] if images.dim() == 5 else 0
        if images.dim() != 5 or not 1 <= cameras <= self.num_cameras or images.shape[2] != c:
            what = "images" if c == 3 else "feature maps"
            raise ValueError(
                f"{what} must be (B, N, {c}, S, S) with 1 <= N <= {self.num_cameras} cameras, "
                f"got {tuple(images.shape)}"
            )
        b = images.shape[0]
        x = rearrange(images, "b n c h w -> (b n) c h w")
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="area")
        if c == 3:  # frames in [0, 1]; another CNN's map is read as it is
            x = x * 2 - 1
        fine = x
        for i, layer in enumerate(self.stem):
            x = layer(x)
            if i == self._fine_layer:
                fine = x  # (B * N, C', h, w)
        tokens = rearrange(x, "(b n) c h w -> b (n h w) c", b=b)  # x: (B * N, C, g, g)
        tokens = self.proj(tokens) + self.pos[:, : tokens.shape[1]]  # a robot may have fewer
        if not self.keypoints:
            return tokens, None
        maps = self.heatmaps(fine)  # (B * N, K, h, w)
        if self.log_temperature is not None:
            maps = maps / self.log_temperature.exp()[:, None, None]
        return tokens, maps


def strided_stages(channels: tuple[int, ...], in_channels: int = 3) -> tuple[list[nn.Module], int]:
    """One stage per entry of `channels`, each halving the side of its input (RGB by default;
    3x3 convolution, stride 2, group norm, SiLU; the convolutions are modules 0, 3, 6, ...), and
    the last width."""
    layers, width = [], in_channels
    for c in channels:
        layers += [nn.Conv2d(width, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
        width = c
    return layers, width


def spatial_softmax(maps: torch.Tensor) -> torch.Tensor:
    """Heat maps (B, K, h, w) -> the expected (x, y) of each under its softmax, (B, K, 2), with
    x and y in [-1, 1] from the left and the top edge."""
    _, _, h, w = maps.shape
    weights = rearrange(maps, "b k h w -> b k (h w)").softmax(-1)
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, h, device=maps.device, dtype=maps.dtype),
        torch.linspace(-1, 1, w, device=maps.device, dtype=maps.dtype),
        indexing="ij",
    )
    grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)  # (h w, 2)
    return weights @ grid
