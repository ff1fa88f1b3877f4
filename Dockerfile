# desmoe image: the same install script as the README (scripts/setup_env.sh), entrypoint `desmoe`.
#
# GPU (default):  docker build -t desmoe .
# CPU-only:       docker build -t desmoe:cpu --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
# Run:            docker run --gpus all --shm-size 8g -v $PWD/runs:/opt/desmoe/runs desmoe \
#                     train --config configs/demo.yaml --nproc 2
ARG BASE_IMAGE=nvidia/cuda:12.9.1-cudnn-devel-ubuntu24.04
FROM ${BASE_IMAGE}

# Where torch comes from: empty = the default index (a CUDA build on Linux); a CPU image
# passes PyTorch's CPU wheel index so no CUDA libraries are pulled in.
ARG TORCH_INDEX=""
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    DESMOE_VENV=/opt/venv \
    DESMOE_TORCH_INDEX=${TORCH_INDEX} \
    TORCH_EXTENSIONS_DIR=/opt/desmoe/.cache/torch_extensions \
    PATH=/opt/venv/bin:${PATH}

# g++ and the Python headers: DeepSpeed JIT-compiles its ops (DS_BUILD_OPS=0 at install).
# DL3008 (pin apt versions): BASE_IMAGE may be Ubuntu 24.04 (CUDA) or Debian bookworm (CPU), whose
# package versions differ; the base image tag and the Python stack (requirements.txt) are pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ make ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/desmoe
# Dependencies first, so code changes do not reinstall the stack.
COPY requirements.txt constraints.txt pyproject.toml README.md ./
COPY scripts/ scripts/
COPY desmoe/ desmoe/
RUN scripts/setup_env.sh
COPY . .

ENTRYPOINT ["desmoe"]
CMD ["--help"]
