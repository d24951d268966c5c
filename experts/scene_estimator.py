"""The action expert's perception of the scene: camera frames -> where the objects and the goal
are, from a small CNN of its own, trained by the scene loss alone.

    images (B, N, 3, S, S) in [0, 1], embodiment_ids (B,)  ->  scene (B, scene_dim), normalised

The scene is the dataset's `observation.environment_state` (object and goal positions), a
training target only: at run time the estimate is all the policy has. Two stride-2 stages
(3x3 convolution, group norm, SiLU) give a stride-4 map (24 x 24 at 96 px); a 1x1 convolution
turns it into K heat maps per camera whose spatial-softmax expectations are K image points
(Levine et al. 2016); an MLP reads the N * K points, and a per-robot output layer the scene
(robots differ in what their scene vector holds).

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
    LORA_TARGETS = r"stem\.(?:0|3)|heatmaps|readout\.0"

    def __init__(
        self,
        scene_dim: int,
        num_cameras: int = 1,
        keypoints: int = 16,
        num_embodiments: int = 1,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 128,
        image_size: int | None = None,
    ):
        super().__init__()
        if scene_dim < 1 or keypoints < 1:
            raise ValueError(
                f"a scene estimator needs scene_dim >= 1 and keypoints >= 1, got {scene_dim} "
                f"and {keypoints}"
            )
        layers, width = strided_stages(channels)
        self.stem = nn.Sequential(*layers)
        self.heatmaps = nn.Conv2d(width, keypoints, 1)
        self.readout = nn.Sequential(nn.Linear(num_cameras * keypoints * 2, hidden), nn.SiLU())
        self.out = EmbodimentLinear(num_embodiments, hidden, scene_dim)
        self.num_cameras, self.image_size = num_cameras, image_size

    def points(self, images: torch.Tensor) -> torch.Tensor:
        """Each camera's K image points (B, N, K, 2) in [-1, 1] (x from the left, y from the
        top)."""
        if images.dim() != 5 or not 1 <= images.shape[1] <= self.num_cameras:
            raise ValueError(
                f"images must be (B, N, 3, S, S) with 1 <= N <= {self.num_cameras} cameras, "
                f"got {tuple(images.shape)}"
            )
        x = rearrange(images, "b n c h w -> (b n) c h w")
        size = self.image_size
        if size is not None and (x.shape[-1] != size or x.shape[-2] != size):
            x = F.interpolate(x, size=(size, size), mode="area")
        x = x * 2 - 1
        points = spatial_softmax(self.heatmaps(self.stem(x)))
        return rearrange(points, "(b n) k xy -> b n k xy", b=images.shape[0])

    def forward(self, images: torch.Tensor, embodiment_ids: torch.Tensor) -> torch.Tensor:
        flat = rearrange(self.points(images), "b n k xy -> b (n k xy)")
        flat = F.pad(flat, (0, self.readout[0].in_features - flat.shape[1]))
        return self.out(self.readout(flat), embodiment_ids)
