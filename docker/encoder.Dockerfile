# The clipsearch encoder service (CLIP on CUDA when the container has a GPU).
#
#   docker build -f docker/encoder.Dockerfile -t clipsearch-encoder:0.1.0-cuda .
#   docker build -f docker/encoder.Dockerfile -t clipsearch-encoder:0.1.0-cpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# TORCH_INDEX_URL picks the torch build (compose passes CLIPSEARCH_TORCH_INDEX_URL). Left
# empty, pip's default index is used, whose Linux x86_64 torch 2.14.1 wheel is the CUDA 13.0
# build and brings its own CUDA runtime (so a slim base runs on a GPU handed in by the NVIDIA
# Container Toolkit): it needs an NVIDIA driver >= 580 and a Turing or newer GPU. For an
# older driver or GPU pick another CUDA build, e.g. https://download.pytorch.org/whl/cu126;
# the CPU index gives a much smaller image for machines without a GPU.
# Weights are not baked in: they live in a volume at /models (see docs/deployment.md).

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG TORCH_INDEX_URL=
# Kept equal to the pins in pyproject.toml (tests/test_deploy_config.py checks it).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY --from=build /wheels /wheels
# The encoder tier only (`clipsearch[encoder]`: clip and its needs; torch is already here).
RUN pip install "$(ls /wheels/clipsearch-*.whl)[encoder]" && rm -rf /wheels

RUN useradd --create-home --uid 10001 --user-group clipsearch \
    && mkdir -p /models \
    && chown clipsearch:clipsearch /models
USER clipsearch
WORKDIR /home/clipsearch

# Every flag is also a CLIPSEARCH_ENCODER_* variable (`clipsearch serve encoder --help`).
ENV CLIPSEARCH_ENCODER_HOST=0.0.0.0 \
    CLIPSEARCH_ENCODER_PORT=50051 \
    CLIPSEARCH_ENCODER_WEIGHTS_DIR=/models \
    CLIPSEARCH_ENCODER_METRICS_PORT=9100
VOLUME ["/models"]
EXPOSE 50051 9100

# grpc.health.v1: NOT_SERVING until the model is loaded and warmed, so the first start
# (which may download ~340 MB of ViT-B/32 weights) gets a long start period.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD clipsearch health --address "127.0.0.1:${CLIPSEARCH_ENCODER_PORT}" || exit 1

ENTRYPOINT ["clipsearch", "serve", "encoder"]
