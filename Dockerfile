# GPU image: torch 2.13.0 from PyPI, whose Linux x86_64 wheel is the CUDA 13.0 build; the CUDA runtime
# libraries come inside it (the nvidia-* and cuda-toolkit wheels), so the base image is plain Python and
# the host needs only an NVIDIA driver (580 or newer for CUDA 13) and the NVIDIA Container Toolkit.
# Why PyPI and not the PyTorch wheel index: PyPI is the index every pip and every mirror reaches, and the
# only one the machine that built and tested this image could reach (download.pytorch.org could not be
# resolved there; see "Docker" in README.md). Drivers older than 580: the CUDA 12.8 build,
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   (driver 570+, or 525+ usually).
#
#   docker build -t moondream-server:cuda .
#   docker run --gpus all -p 8001:8001 -v hf-cache:/var/cache/huggingface moondream-server:cuda
#
# The install steps are the Makefile's (what `make run` in the README does): `pip install torch==2.13.0`
# from the wanted wheel index, then the package; tests/deploy/test_docker.py keeps them in step.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
# A pip configuration for this stage only (a mirror, local wheel folders): the builder mounts the file
# and names it here; the runtime stage copies nothing but the venv, so it never reaches the image.
# scripts/image_test.py passes the building machine's configuration this way.
ARG PIP_CONFIG_FILE
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# 1. torch alone: the largest layer, rebuilt only when the pin or the index changes.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
# 2. the other dependencies, read from pyproject.toml alone, so a source change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
# 3. the package itself (its dependencies are all satisfied by now).
COPY src ./src
RUN pip install --no-cache-dir . \
    && moondream-server --help > /dev/null \
    && python -c "import moondream_server.model, torch; print('moondream_server imports; torch', torch.__version__)"

FROM ${PYTHON_IMAGE} AS runtime
# --build-arg BAKE_MODEL=true downloads the model into the image's Hugging Face cache (air-gapped sites:
# then run with HF_HUB_OFFLINE=1). MOONDREAM_MODEL / MOONDREAM_REVISION pick what is baked.
ARG BAKE_MODEL=false
ARG MOONDREAM_MODEL=vikhyatk/moondream2
ARG MOONDREAM_REVISION=2025-06-21
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/var/cache/huggingface \
    MOONDREAM_HOST=0.0.0.0 \
    MOONDREAM_PORT=8001 \
    MOONDREAM_DEVICE=cuda \
    MOONDREAM_MODEL=${MOONDREAM_MODEL} \
    MOONDREAM_REVISION=${MOONDREAM_REVISION}
RUN useradd --create-home --uid 10001 --user-group moondream \
    && mkdir -p /var/cache/huggingface \
    && chown moondream:moondream /var/cache/huggingface
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/moondream
RUN if [ "${BAKE_MODEL}" = "true" ]; then python -m moondream_server.deploy.prefetch; fi
EXPOSE 8001
# Healthy = the readiness route answers 200 (model loaded); the first start may download ~4 GB.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD ["python", "-m", "moondream_server.deploy.healthcheck"]
ENTRYPOINT ["moondream-server"]
