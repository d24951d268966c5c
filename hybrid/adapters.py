"""LoRA adapters per embodiment: one shared base policy, one small adapter per robot, switched in
place at run time.

    <policy>/adapters/<embodiment>/
        adapter_config.json, adapter_model.safetensors   peft's own format: the LoRA weights of
                                                         every adapted expert, so plain
                                                         `peft.PeftModel.from_pretrained(policy,
                                                         dir)` loads them onto the base
        embodiment_heads.safetensors                     the robot's row of each per-embodiment
                                                         layer (state encoder, action in/out)
        embodiment.json                                  its EmbodimentSpec, normalisation
                                                         statistics and the base's fingerprint

Each expert declares the modules LoRA adapts by default (`LORA_TARGETS`, a regex on its module
names); `LoraSpec` picks the experts, the rank and alpha, and may override the targets. An adapter
only loads onto the base it was trained from: the base's fingerprint (sha256 of its weights and
robots) is recorded and compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hybrid.embodiment import EmbodimentSpec
from hybrid.policy import ADAPTERS_DIR, CONFIG_NAME, HybridPolicy
from hybrid.robots import heads
from hybrid.saved_files import SavedFileError, atomic_directory, check_files, read_json

HEADS_FILE = "embodiment_heads.safetensors"
EMBODIMENT_FILE = "embodiment.json"
EXPERTS = ("vlm", "world_model", "action_expert")


@dataclass
class LoraSpec:
    """Which experts get LoRA and how. `targets` maps an expert to a regex over its own module
    names, replacing that expert's `LORA_TARGETS`."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    experts: list[str] = field(default_factory=lambda: list(EXPERTS))
    targets: dict[str, str] = field(default_factory=dict)

    def peft_config(self, policy: HybridPolicy):
        """peft's LoraConfig whose target regex addresses modules of `policy` by full name."""
        from peft import LoraConfig

        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        unknown = sorted(set(self.experts) - set(EXPERTS)) or sorted(
            set(self.targets) - set(EXPERTS)
        )
        if unknown or not self.experts:
            raise ValueError(
                f"lora.experts / lora.targets: unknown {unknown}; choose from {EXPERTS}"
            )
        parts = [
            rf"{name}\.(?:{self.targets.get(name) or type(getattr(policy, name)).LORA_TARGETS})"
            for name in self.experts
            if getattr(policy, name) is not None  # a flat VLA has no world model to adapt
        ]
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules="|".join(f"(?:{p})" for p in parts),
        )


def adapter_dir(policy_dir: str | Path, embodiment: str) -> Path:
    return Path(policy_dir) / ADAPTERS_DIR / embodiment


def available_embodiments(policy_dir: str | Path) -> list[str]:
    """The base's robots, then those with an adapter, without loading any weights."""
    policy_dir = Path(policy_dir)
    config = read_json(policy_dir, CONFIG_NAME, "policy")
    if not isinstance(config, dict) or not isinstance(config.get("embodiments"), list):
        raise SavedFileError(
            f"{policy_dir / CONFIG_NAME} lists no embodiments: not a policy's config; re-export "
            "the policy (`hybrid fit` or `hybrid export`)"
        )
    base = [s["name"] for s in config["embodiments"]]
    root = policy_dir / ADAPTERS_DIR
    extra = (
        sorted(p.name for p in root.iterdir() if (p / EMBODIMENT_FILE).is_file())
        if root.is_dir()
        else []
    )
    return base + [n for n in extra if n not in base]


class EmbodimentAdapters:
    """A base policy and its per-robot LoRA adapters. The LoRA layers live inside `policy` (peft
    injects them in place), so code holding the policy sees whichever robot is active.

    Args:
        policy: the base policy, as loaded (nothing attached yet).
        directory: the policy directory whose `adapters/` are read by `load`; None for none.
    """

    def __init__(self, policy: HybridPolicy, directory: str | Path | None = None):
        self.policy = policy
        self.directory = Path(directory) if directory is not None else None
        self.base_embodiments = list(policy.embodiments)
        self._fingerprint = policy.fingerprint  # None for a policy not (yet) saved: hashed on use
        self.peft = None  # peft.PeftModel wrapping `policy`, made on the first adapter
        self.active: str = self.base_embodiments[0]

    @property
    def base_fingerprint(self) -> str:
        if self._fingerprint is None:
            if self.adapters:
                raise ValueError("the base's fingerprint must be taken before adapters attach")
            self._fingerprint = self.policy.compute_fingerprint()
        return self._fingerprint

    @property
    def adapters(self) -> list[str]:
        return [n for n in self.policy.embodiments if n not in self.base_embodiments]

    # 1. a new adapter, to train ---------------------------------------------------------------
    def attach(self, spec: EmbodimentSpec, norm_stats: dict, lora: LoraSpec) -> None:
        """Add a robot with fresh LoRA weights and make it active. Only the LoRA weights and the
        robot's own head rows train (see `trainable_parameters`)."""
        _ = self.base_fingerprint  # taken while the policy is still the bare base
        self.policy.add_embodiment(spec, norm_stats)
        self._inject(spec.name, lora.peft_config(self.policy))
        self.activate(spec.name)

    def _inject(self, name: str, config) -> None:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel(self.policy, config, adapter_name=name)
        else:
            self.peft.add_adapter(name, config)

    def trainable_parameters(
        self, name: str
    ) -> tuple[dict[str, torch.nn.Parameter], dict[str, torch.nn.Parameter]]:
        """(LoRA parameters of adapter `name`, head parameters), each by name in the policy, with
        requires_grad set: every other
        parameter is frozen, and a gradient hook keeps the other robots' head rows at exactly
        zero gradient (give the heads no weight decay, so their rows stay bit-identical)."""
        self.policy.requires_grad_(False)
        lora = {
            n: p for n, p in self.policy.named_parameters() if f".{name}." in n and "lora_" in n
        }
        (row,) = self.policy.embodiment_ids([name]).tolist()
        rows = {}
        for path, head in heads(self.policy.action_expert).items():
            for kind in ("weight", "bias"):
                param = getattr(head, kind)
                param.requires_grad_(True)
                mask = torch.zeros(param.shape[0], *[1] * (param.dim() - 1))
                mask[row] = 1
                # called before Lightning moves the model to its device: follow the gradient's
                param.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device, grad.dtype))
                rows[f"action_expert.{path}.{kind}"] = param
        for param in lora.values():
            param.requires_grad_(True)
        return lora, rows

    # 2. registry on disk ----------------------------------------------------------------------
    def save(self, name: str, directory: str | Path) -> None:
        """Write adapter `name` to `directory` (see the module docstring), atomically."""
        from peft import get_peft_model_state_dict

        with atomic_directory(directory) as tmp:
            self.peft.peft_config[name].save_pretrained(tmp)
            state = get_peft_model_state_dict(self.peft, adapter_name=name)
            state = {k: v.contiguous() for k, v in state.items()}
            save_file(state, tmp / "adapter_model.safetensors")
            save_file(self.policy.embodiment_rows(name), tmp / HEADS_FILE)
            record = {
                "embodiment": self.policy.embodiments[name].to_dict(),
                "norm_stats": self.policy.norm_stats[name],
                "base_fingerprint": self.base_fingerprint,
                "base_embodiments": self.base_embodiments,
            }
            (tmp / EMBODIMENT_FILE).write_text(json.dumps(record, indent=2))

    def load(self, name: str, directory: str | Path | None = None) -> None:
        """Load adapter `name` (from `<policy>/adapters/<name>` unless `directory` is given)."""
        from peft import LoraConfig, set_peft_model_state_dict

        if name in self.policy.embodiments:
            return
        if directory is None:
            if self.directory is None:
                raise ValueError(f"no adapter directory to load embodiment {name!r} from")
            directory = adapter_dir(self.directory, name)
        directory = Path(directory)
        record_path = directory / EMBODIMENT_FILE
        if not record_path.is_file():
            offered = (
                available_embodiments(self.directory) if self.directory else self.base_embodiments
            )
            raise ValueError(
                f"no adapter for embodiment {name!r}: {record_path} is missing; this policy offers "
                f"{offered} (`hybrid finetune` writes adapters)"
            )
        check_files(directory, f"fine-tune {name!r} again (`hybrid finetune`)")
        record = json.loads(record_path.read_text())
        if record["base_fingerprint"] != self.base_fingerprint:
            raise ValueError(
                f"adapter {directory} was trained on a base with fingerprint "
                f"{record['base_fingerprint'][:12]}…, but this base's is "
                f"{self.base_fingerprint[:12]}…; fine-tune again from this base, or load the base "
                "it was trained from"
            )
        spec = EmbodimentSpec(**record["embodiment"])
        if spec.name != name:
            raise ValueError(f"{record_path} describes embodiment {spec.name!r}, not {name!r}")
        self.policy.add_embodiment(spec, record["norm_stats"])
        self.policy.set_embodiment_rows(name, load_file(directory / HEADS_FILE))
        self._inject(name, LoraConfig.from_pretrained(directory))
        state = load_file(directory / "adapter_model.safetensors")
        result = set_peft_model_state_dict(self.peft, state, adapter_name=name)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"adapter {directory} does not fit this base: unexpected "
                f"{result.unexpected_keys[:3]}, missing {missing[:3]}"
            )
        self.policy.eval()

    # 3. switching -----------------------------------------------------------------------------
    def activate(self, name: str) -> None:
        """Make `name` the active robot: a base robot runs with every adapter disabled, a robot
        with an adapter runs with that adapter only. Loads the adapter on first use."""
        if name not in self.policy.embodiments:
            self.load(name)
        if self.peft is not None:
            if name in self.base_embodiments:
                self.peft.base_model.disable_adapter_layers()
            else:
                self.peft.base_model.enable_adapter_layers()
                self.peft.set_adapter(name)
        self.active = name

    # 4. export --------------------------------------------------------------------------------
    def merged(self, name: str) -> HybridPolicy:
        """A standalone policy for robot `name` alone: its LoRA folded into the weights, only its
        head rows kept. Consumes the adapters: use this object no further."""
        self.activate(name)
        if name in self.base_embodiments:
            policy = self.policy
        else:
            for other in self.adapters:
                if other != name:
                    self.peft.delete_adapter(other)
            policy = self.peft.merge_and_unload()
        policy.keep_embodiments([name])
        policy.fingerprint = None
        return policy
