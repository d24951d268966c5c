"""`hybrid export`: a standalone policy directory for one robot of a base policy and its adapters.

With `merge`, the robot's LoRA weights are folded into the base weights and only its head rows are
kept: one ordinary policy, loaded with `HybridPolicy.from_pretrained`, no peft at run time. Without
it, the base is copied with only that robot's adapter (a smaller registry to ship to one robot).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from hybrid.adapters import ADAPTERS_DIR, EmbodimentAdapters, adapter_dir, available_embodiments
from hybrid.policy import CONFIG_NAME, HybridPolicy
from hybrid.saved_files import atomic_directory


def export(
    policy: str | Path,
    embodiment: str,
    out: str | Path,
    merge: bool = False,
    console: Console | None = None,
) -> Path:
    console = console or Console()
    policy, out = Path(policy), Path(out)
    if not (policy / CONFIG_NAME).is_file():
        raise ValueError(f"--policy {policy}: not a policy directory (no {CONFIG_NAME})")
    if out.resolve() == policy.resolve():
        raise ValueError(f"--out {out} is the --policy directory; export to another directory")
    robots = available_embodiments(policy)
    if embodiment not in robots:
        raise ValueError(
            f"--embodiment {embodiment!r}: {policy} offers {robots} (`hybrid finetune` adds one)"
        )
    if merge:
        adapters = EmbodimentAdapters(HybridPolicy.from_pretrained(policy), policy)
        adapters.merged(embodiment).save_pretrained(out)
        console.print(f"wrote the merged {embodiment!r} policy to {out}")
        return out
    with atomic_directory(out) as tmp:
        shutil.copytree(
            policy, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(ADAPTERS_DIR)
        )
        if (policy / ADAPTERS_DIR / embodiment).is_dir():
            shutil.copytree(adapter_dir(policy, embodiment), adapter_dir(tmp, embodiment))
    console.print(f"wrote {out}: the base policy with the {embodiment!r} adapter")
    return out
