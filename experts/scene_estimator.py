"""The action expert's perception of the scene: camera frames -> where the objects and the goal
are, from a small CNN of its own, trained by the scene loss alone.

    images (B, N, 3, S, S) in [0, 1], embodiment_ids (B,)  ->  scene (B, scene_dim), normalised

The scene is the dataset's `observation.environment_state` (object and goal positions), a
training target only: at run time the estimate is all the policy has. Two stride-2 stages
(3x3 convolution, group norm, SiLU) give a stride-4 map (24 x 24 at 96 px); a 1x1 convolution
turns it into K heat maps per camera whose spatial-softmax expectations are K image points
(Levine et al. 2016); an MLP reads the N * K points, and a per-robot output layer the scene
(robots differ in what their scene vector holds). With `context`, a stride-8 stage (two 3x3
convolutions, 12 x 12 at 96 px), upsampled, is added to the stride-4 map before the heat maps:
each heat map then reads 31 x 31 pixels around its cell, not 7 x 7, at the stride-4 map's
precision.

Why eyes of its own, apart from the action expert's (`experts.image_encoder`): measured on the
quickstart's data (`data/qs_fresh`, 2 cameras at 96 px, 2 held-out episodes per task), this CNN
trained on the scene alone for 2,000 steps of batch 32 places the puck within 1.1 cm (push) and
1.8 cm (pick-place) of where it is, the goal within 0.8-1.8 cm; the scene head on the shared
eyes, whose keypoints also serve the action loss, within 3.5 cm after the quickstart's fit.
Half the channels (16, 32) at twice the batch placed the puck 2.2-3.1 cm off: capacity, not
only samples, sets the error. Trained inside a fit (configs/experiment/scene_estimator.yaml,
1,000 steps) at the policy's learning rate, it places objects 2.5 cm and goals 1.7 cm off
(`benchmarks/diagnose.py`), its validation loss still falling; at three times that rate
(`model.lr_scale`), 1.8-2.3 cm and 1.3-1.4 cm over two seeds; at ten times (as that config now
sets), 1.6-1.8 cm and 1.1-1.3 cm on two seeds, 2.3 and 1.3 cm on a third run.

Why `context`: objects that a 7-pixel patch does not tell from the table (sweep-into's brown
block, the mug half hidden by the coffee machine) are where the estimate fails. Trained alone on
five tasks outside MT10 (20 demonstrations and 10 noisy episodes each, 1,000 steps of 32 + 32
frames) and tested on the first frames of 30 new placements per task, the object's error fell
from 5.0 to 2.9 cm on average (the mug 6.7 to 3.0, the block 8.4 to 6.6) and the goal's from
1.0 to 0.6 cm, for 19% more of the estimator's training time; on the quickstart's five tasks it
was 2.6 against 2.8 cm (one seed each; README, "Measured").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from experts.embodiment_heads import EmbodimentLinear
from experts.image_encoder import spatial_softmax, strided_stages


class SceneEstimator(nn.Module):
    """See the module docstring. Frames of another side are resized to `image_size` (area), the
    side it trains at; None keeps every frame's own. A robot with fewer cameras than
    `num_cameras` reads zeros for the missing cameras' points."""

    # what a per-robot LoRA adapts here (regex on names inside this module): a new robot's
    # cameras see another scene; its own output row is added by `add_row`
    LORA_TARGETS = r"stem\.(?:0|3)|context\.(?:0|3)|heatmaps|readout\.0"
    CHANNELS = (32, 64)  # the two stages' widths

    def __init__(
        self,
        scene_dim: int,
        num_cameras: int = 1,
        keypoints: int = 16,
        num_embodiments: int = 1,
        channels: tuple[int, int] = CHANNELS,
        hidden: int = 128,
        image_size: int | None = None,
        context: bool = False,
    ):
        super().__init__()
        if scene_dim < 1 or keypoints < 1:
            raise ValueError(
                f"a scene estimator needs scene_dim >= 1 and keypoints >= 1, got {scene_dim} "
                f"and {keypoints}"
            )
        layers, width = strided_stages(channels)
        self.stem = nn.Sequential(*layers)
        self.context = (
            nn.Sequential(
                *strided_stages((width,), in_channels=width)[0],
                nn.Conv2d(width, width, 3, padding=1),
                nn.GroupNorm(8, width),
                nn.SiLU(),
            )
            if context
            else None
        )
        self.heatmaps = nn.Conv2d(width, keypoints, 1)
        self.readout = nn.Sequential(nn.Linear(num_cameras * keypoints * 2, hidden), nn.SiLU())
        self.out = EmbodimentLinear(num_embodiments, hidden, scene_dim)
        self.num_cameras, self.image_size = num_cameras, image_size

    def points(self, images: torch.Tensor, maps: torch.Tensor | None = None) -> torch.Tensor:
        """Each camera's K image points (B, N, K, 2) in [-1, 1] (x from the left, y from the
        top); `maps` as in `heatmap_logits`."""
        points = spatial_softmax(self.heatmap_logits(images, maps))
        return rearrange(points, "(b n) k xy -> b n k xy", b=images.shape[0])

    def heatmap_logits(
        self, images: torch.Tensor, maps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The K heat maps' logits (B * N, K, h, w) of images (B, N, 3, S, S), h = w = S / 4 at
        the estimator's side: what each point's spatial softmax reads. `maps`: the images'
        `stem_maps` where the caller has them."""
        maps = self.stem_maps(images) if maps is None else maps
        if self.context is not None:  # the coarser stage's view, at the finer map's cells
            coarse = self.context(maps)
            maps = maps + F.interpolate(coarse, size=maps.shape[-2:], mode="nearest")
        return self.heatmaps(maps)

    def stem_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The two stages' map (B * N, C, S / 4, S / 4) of images (B, N, 3, S, S) at the
        estimator's side, rows (b n): what its heat maps read, and the action expert's eyes
        with a `shared_stem`."""
        if images.dim() != 5 or not 1 <= images.shape[1] <= self.num_cameras:
            raise ValueError(
                f"images must be (B, N, 3, S, S) with 1 <= N <= {self.num_cameras} cameras, "
                f"got {tuple(images.shape)}"
            )
        x = rearrange(images, "b n c h w -> (b n) c h w")
        size = self.image_size
        if size is not None and (x.shape[-1] != size or x.shape[-2] != size):
            x = F.interpolate(x, size=(size, size), mode="area")
        return self.stem(x * 2 - 1)

    def forward(
        self,
        images: torch.Tensor,
        embodiment_ids: torch.Tensor,
        maps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The scene (B, scene_dim); `maps` as in `heatmap_logits`."""
        flat = rearrange(self.points(images, maps), "b n k xy -> b (n k xy)")
        flat = F.pad(flat, (0, self.readout[0].in_features - flat.shape[1]))
        return self.out(self.readout(flat), embodiment_ids)
