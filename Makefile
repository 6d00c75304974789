# Two entry points: `make run` (set up + start the server with the real model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU installs pin this torch; set TORCH_SPEC (and PIP_TORCH_ARGS for another index) for CUDA builds.
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
# e.g. --keep (keep the built images) or --base python:3.11-slim-bookworm (skip debootstrap)
IMAGE_TEST_ARGS ?=
ARGS ?=

.PHONY: run test setup lint typecheck bench clean chromium promtool image-tools image-test image-test-cuda

# The server alone: what `make run` needs.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -e .
	touch $@

# Test and lint tools on top. The official client is installed without its dependencies: its
# `kestrel` dependency only serves in-process GPU inference and would pull a CUDA torch.
$(VENV)/.dev-installed: $(VENV)/.installed
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps "moondream==2.6.1"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/moondream-server $(ARGS)

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/mypy

# The playground's browser test drives Debian's chromium (Playwright never downloads one). Install it
# where we may: as root with apt-get (CI). Elsewhere, without it, that test skips and says why.
chromium:
	@command -v chromium >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "could not install chromium: the playground's browser test will skip"

# promtool (Debian's prometheus package, ~19 MB) checks /metrics in a test; without it that check skips.
promtool:
	@command -v promtool >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || \
	  echo "could not install prometheus: the promtool check of /metrics will skip"

test: $(VENV)/.dev-installed lint chromium promtool
	$(PY) -m pytest

# Build Dockerfile.cpu (or Dockerfile) with buildah on a local Debian base and serve the tiny golden
# model from the image: Linux, root, buildah + podman + debootstrap; no daemon (see DEVELOPERS.md).
image-tools:
	@command -v buildah >/dev/null && command -v podman >/dev/null && command -v debootstrap >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman debootstrap >/dev/null; }

image-test: image-tools
	$(PYTHON) -m scripts.image_test $(IMAGE_TEST_ARGS)

image-test-cuda: image-tools
	$(PYTHON) -m scripts.image_test --cuda $(IMAGE_TEST_ARGS)

bench: $(VENV)/.dev-installed
	$(PY) benchmarks/model_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
