# The two commands a newcomer needs: `make quickstart` and `make test`. Both set up first.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hybrid-installed
export MUJOCO_GL ?= egl
export HF_HUB_OFFLINE := 1
QUICKSTART_DATA ?= data/quickstart
QUICKSTART_SCENE_DATA ?= data/quickstart_scene
QUICKSTART_TASKS ?= reach-v3 push-v3 pick-place-v3 drawer-open-v3 button-press-topdown-v3

PANDA_DATA ?= data/panda

.PHONY: setup quickstart finetune test lint

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

quickstart: setup
	$(BIN)/hybrid collect metaworld --tasks $(QUICKSTART_TASKS) --episodes-per-task 20 --out $(QUICKSTART_DATA)
	@# frames where the arm wanders, for the scene estimator alone (data.scene_root); 150 steps
	@# at most each: a failed attempt would run to the simulator's 500
	$(BIN)/hybrid collect metaworld --tasks $(QUICKSTART_TASKS) --episodes-per-task 10 --action-noise 0.5 --keep-failures --seed 1 --max-steps 150 --out $(QUICKSTART_SCENE_DATA)
	$(BIN)/hybrid fit --config configs/quickstart.yaml --data.root $(QUICKSTART_DATA) --data.scene_root $(QUICKSTART_SCENE_DATA) --ckpt_path last
	$(BIN)/hybrid eval --policy outputs/quickstart/policy --tasks $(QUICKSTART_TASKS) --episodes 5 --out outputs/quickstart/eval --video
	@echo "quickstart policy: outputs/quickstart/policy (HybridPlanner.from_pretrained); results and videos: outputs/quickstart/eval"

# After quickstart: adapt its policy to the panda-gym Franka Panda with a LoRA adapter.
finetune: setup
	$(BIN)/hybrid collect panda --tasks all --episodes-per-task 20 --out $(PANDA_DATA)
	$(BIN)/hybrid finetune --config configs/finetune/panda.yaml --data.root $(PANDA_DATA) --ckpt_path last
	$(BIN)/hybrid eval --policy outputs/quickstart/policy --embodiment panda --tasks all --episodes 10 --max-steps 100 --out outputs/finetune_panda/eval --video

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
