"""What the policy knows about a robot: its name, state and action sizes, action limits, cameras.

One spec per robot (YAML under `configs/embodiment/`); its index in the policy's list is the row of
the per-embodiment weights (`experts.embodiment_heads`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml


@dataclass(frozen=True)
class EmbodimentSpec:
    """A robot. Actions are clipped to [action_low, action_high] per dim before they are sent."""

    name: str
    state_dim: int
    action_dim: int
    action_low: list[float] = field(default_factory=list)
    action_high: list[float] = field(default_factory=list)
    cameras: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.state_dim < 1 or self.action_dim < 1:
            raise ValueError(
                f"embodiment {self.name!r}: state_dim ({self.state_dim}) and action_dim "
                f"({self.action_dim}) must be >= 1"
            )
        for label, limits in (("action_low", self.action_low), ("action_high", self.action_high)):
            if limits and len(limits) != self.action_dim:
                raise ValueError(
                    f"embodiment {self.name!r}: {label} has {len(limits)} values, "
                    f"action_dim is {self.action_dim}"
                )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path) -> EmbodimentSpec:
        """Read a spec file such as `configs/embodiment/panda.yaml`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"embodiment spec {path} does not exist (see configs/embodiment/)"
            )
        data = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{path}: unknown keys {unknown}; an embodiment spec has {sorted(known)}"
            )
        return cls(**data)
