# One image for the API, the Ray head and the Ray workers: advorch on torch, every version pinned
# by requirements.lock, the same lock the venv installs with (deploy/lock.py).
#   docker build -t advorch:latest .                          CUDA torch from PyPI (GPU hosts)
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t advorch .
#                                                             the CPU build of torch (CPU hosts)
#   docker build --build-arg BASE_IMAGE=mirror.example/python:3.11-slim ...   behind a mirror
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*

WORKDIR /build
COPY requirements.lock ./
# Empty: torch comes from PyPI, where it is the CUDA build (it runs on CPU too, in a ~6 GB image).
# An index with CPU builds (its 2.13.0+cpu outranks PyPI's 2.13.0) makes a much smaller image.
ARG TORCH_INDEX_URL=
# torch first, alone, so that changing advorch's code does not download it again.
RUN pip install -c requirements.lock ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} torch
COPY pyproject.toml README.md ./
COPY api ./api
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
# Not editable, and the sources removed after: the image runs the installed package, whose
# package data (the web page, the migrations) tests/test_deploy.py checks in the built wheel.
RUN pip install -c requirements.lock '.[s3]' && rm -rf /build
WORKDIR /

EXPOSE 8000
CMD ["advorch", "serve"]
