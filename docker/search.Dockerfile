# The clipsearch search service (no model: it calls the encoder and Milvus).
#
#   docker build -f docker/search.Dockerfile -t clipsearch-search:0.1.0 .
#
# Only the search tier is installed (`clipsearch[search]`: pymilvus, Milvus Lite): no torch,
# torchvision or clip; the model lives in the encoder image.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
RUN pip install "$(ls /wheels/clipsearch-*.whl)[search]" && rm -rf /wheels

RUN useradd --create-home --uid 10001 --user-group clipsearch \
    && mkdir -p /data \
    && chown clipsearch:clipsearch /data
USER clipsearch
WORKDIR /home/clipsearch

# Every flag is also a CLIPSEARCH_SEARCH_* variable (`clipsearch serve search --help`).
# The Milvus default here is Milvus Lite in /data (mount a volume there to keep it);
# compose points it at a Milvus server instead.
ENV CLIPSEARCH_SEARCH_HOST=0.0.0.0 \
    CLIPSEARCH_SEARCH_PORT=50052 \
    CLIPSEARCH_SEARCH_MILVUS=/data/milvus.db \
    CLIPSEARCH_SEARCH_METRICS_PORT=9101
EXPOSE 50052 9101

# SERVING once the encoder answered and the collection is open.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD clipsearch health --address "127.0.0.1:${CLIPSEARCH_SEARCH_PORT}" || exit 1

ENTRYPOINT ["clipsearch", "serve", "search"]
