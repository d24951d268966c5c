"""The model YAMLs name only arguments the experts accept, so a typo fails here, not on a GPU."""

import inspect
from pathlib import Path

import pytest
import yaml

from experts.action import ActionExpert
from experts.fast import FastTokenizer
from experts.vlm import HighLevelVLM
from experts.world_model import WorldModel

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "model").glob("*.yaml"))
CLASSES = {
    "vlm": HighLevelVLM,
    "world_model": WorldModel,
    "action_expert": ActionExpert,
    "fast": FastTokenizer,
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_model_config_names_real_arguments(path):
    config = yaml.safe_load(path.read_text())["model"]["experts"]
    assert set(config) <= set(CLASSES), (
        f"{path.name}: unknown sections {set(config) - set(CLASSES)}"
    )
    for section, arguments in config.items():
        accepted = set(inspect.signature(CLASSES[section].__init__).parameters) - {"self"}
        unknown = set(arguments) - accepted
        assert not unknown, f"{path.name}: {section} does not take {sorted(unknown)}"


def test_the_tiny_config_is_the_default():
    config = yaml.safe_load((CONFIGS[0].parent / "tiny.yaml").read_text())["model"]["experts"]
    for section, arguments in config.items():
        defaults = inspect.signature(CLASSES[section].__init__).parameters
        for name, value in arguments.items():
            default = defaults[name].default
            assert list(default) == value if isinstance(default, tuple) else default == value, (
                f"tiny.yaml {section}.{name}={value} but the default is {default}"
            )


ROOT = Path(__file__).parents[1]
STACKS = [
    ["configs/quickstart.yaml"],
    ["configs/quickstart.yaml", "configs/experiment/mt10.yaml"],
    ["configs/quickstart.yaml", "configs/experiment/mt10.yaml", "configs/experiment/mt10_gpu.yaml"],
    ["configs/quickstart.yaml", "configs/experiment/gpu_smolvlm.yaml"],
    ["configs/quickstart.yaml", "configs/experiment/scene.yaml"],
    ["configs/quickstart.yaml", "configs/experiment/privileged_scene.yaml"],
    ["configs/quickstart.yaml", "configs/experiment/plan_lag.yaml"],
    ["configs/quickstart.yaml", "configs/formulation/hierarchical.yaml"],
    ["configs/quickstart.yaml", "configs/formulation/flat_vla.yaml"],
    ["configs/quickstart.yaml", "configs/formulation/inverse_dynamics.yaml"],
    ["configs/quickstart.yaml", "configs/formulation/representation.yaml"],
    ["configs/trainer/cpu.yaml", "configs/data/quickstart.yaml", "configs/model/tiny.yaml"],
    ["finetune", "configs/finetune/panda.yaml"],
]


@pytest.mark.parametrize("stack", STACKS, ids=lambda s: "+".join(Path(p).stem for p in s))
def test_config_stacks_parse(stack, print_config, monkeypatch):
    """Every documented way to combine the YAML files parses into a full configuration."""
    verb, paths = (stack[0], stack[1:]) if stack[0] == "finetune" else ("fit", stack)
    monkeypatch.chdir(ROOT)
    config = yaml.safe_load(print_config(verb, *(a for p in paths for a in ("--config", ROOT / p))))
    assert config["data"]["root"] and config["trainer"]["max_steps"] > 0
    if paths[0] == "configs/quickstart.yaml" and "gpu" not in paths[-1]:
        # an expert entry a later file gives replaces the quickstart's whole entry: a file that
        # changes one setting must restate the rest, or it silently measures more than one change
        base = yaml.safe_load((ROOT / paths[0]).read_text())["model"]["experts"]
        stacked = config["model"]["experts"]
        for name, entry in base.items():
            kept = stacked.get(name)
            assert kept is False or set(entry) <= set(kept or {}), f"{paths[-1]} drops {name}"
