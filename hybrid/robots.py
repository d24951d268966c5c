"""The robots a policy serves, and the policy's fingerprint.

`Robots` is the registry: each robot's spec (`hybrid.embodiment`), its normalisation statistics
and normaliser, and its row in the per-embodiment weights (`experts.embodiment_heads`), which is
its index here. `head_rows` / `set_head_rows` read and write one robot's rows of every
per-embodiment layer of a module. `fingerprint` names a policy's weights, so that an adapter can
say which base it was trained on.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from torch import nn

from experts.embodiment_heads import EmbodimentLinear
from hybrid.data.normalize import Normalizer
from hybrid.data.windows import ACTION_KEY, SCENE_KEY, STATE_KEY
from hybrid.embodiment import EmbodimentSpec


class Robots:
    """Specs, statistics (`norm_stats[robot][feature]` holds mean/std/min/max lists) and
    normalisers, in the order of the per-embodiment rows."""

    def __init__(self, norm_modes: dict[str, str] | None = None):
        self.specs: dict[str, EmbodimentSpec] = {}
        self.norm_stats: dict[str, dict] = {}
        self.norm_modes = norm_modes or {STATE_KEY: "mean_std", ACTION_KEY: "mean_std"}
        self.normalizers: dict[str, Normalizer] = {}

    def add(self, spec: EmbodimentSpec, stats: dict, max_state: int, max_action: int, fast: int):
        """Register a robot; `max_state` / `max_action` are the dims the action expert takes,
        `fast` those the FAST tokenizer was fit on."""
        if spec.state_dim > max_state or spec.action_dim > max_action:
            raise ValueError(
                f"embodiment {spec.name!r} has state/action dims {spec.state_dim}/"
                f"{spec.action_dim}; the action expert takes at most {max_state}/{max_action} (a "
                "base policy made with larger `action_expert.max_state_dim` / `max_action_dim` "
                "leaves room)"
            )
        if spec.action_dim > fast:
            raise ValueError(
                f"embodiment {spec.name!r} has {spec.action_dim} action dims; the FAST tokenizer "
                f"of this policy was fit on {fast}"
            )
        self.specs[spec.name] = spec
        self.norm_stats[spec.name] = stats
        modes = dict(self.norm_modes)
        if SCENE_KEY in stats:  # the scene's statistics, where the robot's data records one
            modes.setdefault(SCENE_KEY, "mean_std")
        self.normalizers[spec.name] = Normalizer(
            {k: {s: np.asarray(v) for s, v in d.items()} for k, d in stats.items()}, modes
        )

    def keep(self, names: list[str]) -> None:
        """Drop every robot not named; the named ones take rows in this order."""
        self.specs = {n: self.specs[n] for n in names}
        self.norm_stats = {n: self.norm_stats[n] for n in names}
        self.normalizers = {n: self.normalizers[n] for n in names}

    def rows(self, names: list[str]) -> list[int]:
        """Row of each robot in the per-embodiment weights."""
        order = list(self.specs)
        unknown = sorted(set(names) - set(order))
        if unknown:
            raise ValueError(f"unknown embodiment(s) {unknown}; this policy knows {order}")
        return [order.index(n) for n in names]

    def dim_mask(self, names: list[str], max_action_dim: int) -> torch.Tensor:
        """(B, max_action_dim) bool: True on each robot's real action dims."""
        dims = torch.tensor([self.specs[n].action_dim for n in names])
        return torch.arange(max_action_dim)[None] < dims[:, None]


def heads(module: nn.Module | None) -> dict[str, EmbodimentLinear]:
    """Every per-embodiment layer inside `module` (none in None), by name."""
    if module is None:
        return {}
    return {name: m for name, m in module.named_modules() if isinstance(m, EmbodimentLinear)}


def head_rows(module: nn.Module, row: int) -> dict[str, torch.Tensor]:
    """One robot's row of each per-embodiment parameter in `module`, by parameter name."""
    return {
        f"{path}.{kind}": getattr(head, kind).data[row].clone()
        for path, head in heads(module).items()
        for kind in ("weight", "bias")
    }


def set_head_rows(module: nn.Module, row: int, values: dict[str, torch.Tensor], name: str) -> None:
    """Write `head_rows`' output back into row `row`; `name` is the robot, for the message."""
    for path, head in heads(module).items():
        for kind in ("weight", "bias"):
            param = getattr(head, kind)
            value = values[f"{path}.{kind}"]
            if value.shape != param.shape[1:]:
                raise ValueError(
                    f"embodiment {name!r}: head {path}.{kind} has shape {tuple(value.shape)}, "
                    f"this policy's rows are {tuple(param.shape[1:])}"
                )
            param.data[row] = value.to(param.dtype)


def fingerprint(module: nn.Module, specs: list[EmbodimentSpec]) -> str:
    """sha256 of every weight of `module` (names, dtypes, shapes, bytes) and the robots' specs."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps([s.to_dict() for s in specs]).encode())
    return digest.hexdigest()
