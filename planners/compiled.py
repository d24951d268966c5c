"""The policy's inference API compiled by `torch.compile`, for `HybridPlanner(compile=...)`.

Each method the planner calls (frames -> latents, subgoal generation, prefix features,
imagination and scoring, the action chunk, and the other formulations' planning steps) is
compiled whole; every other attribute is the policy's own. The shapes in and out are the
policy's, and so are the numbers up to float rounding (inductor's kernels sum in another order:
actions within about 1e-5 on the quickstart policy). Shapes are compiled dynamic
(`dynamic=True`): the prefix length changes with every subgoal, and a graph per length would
compile again and again. The first calls of each path compile it (minutes on a 2-core CPU: the
README's "Inference cost" gives the seconds and what each tier gains); PyTorch caches the
compiled kernels on disk (`TORCHINDUCTOR_CACHE_DIR`), so a second process compiles faster.
"""

from __future__ import annotations

import logging

import torch

from hybrid.policy import HybridPolicy

METHODS = (
    "encode_frames",
    "propose_subgoals",
    "prefix_features",
    "imagine",
    "imagine_and_act",
    "sample_plan",
    "world_features",
    "sample_actions",
)


class CompiledInference:
    """`policy` with `METHODS` compiled by `torch.compile(backend=backend, dynamic=True)`:
    "inductor" for speed, "eager" to trace without generating code (the policy's numbers)."""

    def __init__(self, policy: HybridPolicy, backend: str = "inductor"):
        self.policy = policy
        # a graph break at `Tensor.item()` (a check inside transformers) is expected: not news
        logging.getLogger("torch._dynamo.variables.tensor").setLevel(logging.ERROR)
        for name in METHODS:
            setattr(self, name, torch.compile(getattr(policy, name), backend=backend, dynamic=True))

    def __getattr__(self, name: str):
        return getattr(self.policy, name)
