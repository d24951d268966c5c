"""When each tier of the hierarchy runs again; everything not rerun is reused from the cache.

The action expert runs every chunk. The language subgoal is kept until it looks done: the value
head rates the current frame at least as high as the visual subgoal that was chosen for it (the
imagined future has been reached), or `max_chunks_per_subgoal` chunks have passed. The visual
subgoal is imagined again with each new language subgoal (`visual="subgoal"`) or every chunk
(`visual="chunk"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RefreshSchedule:
    max_chunks_per_subgoal: int = 4
    visual: Literal["subgoal", "chunk"] = "subgoal"
    reached_margin: float = 0.02

    def __post_init__(self):
        if self.max_chunks_per_subgoal < 1:
            raise ValueError(
                f"max_chunks_per_subgoal must be >= 1, got {self.max_chunks_per_subgoal}"
            )
        if self.visual not in ("subgoal", "chunk"):
            raise ValueError(f"visual must be 'subgoal' or 'chunk', got {self.visual!r}")

    def subgoal_due(
        self, chunks_since: int | None, current_value: float | None, target_value: float | None
    ) -> bool:
        """chunks_since is None before the first plan; values are None without a world model."""
        if chunks_since is None or chunks_since >= self.max_chunks_per_subgoal:
            return True
        if current_value is None or target_value is None:
            return False
        return current_value >= target_value - self.reached_margin

    def visual_due(self, subgoal_refreshed: bool) -> bool:
        return subgoal_refreshed or self.visual == "chunk"
