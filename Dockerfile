# The poe service image: API (`poe serve`) and worker (`poe worker`) from one image.
#   CPU (default):  docker build -t poe .
#   GPU workers:    docker build -t poe:gpu --build-arg GPU=true .
# The GPU build installs CUDA wheels of torch (TORCH_CUDA_INDEX) and onnxruntime-gpu in
# place of onnxruntime; run it with `--gpus all` (NVIDIA Container Toolkit) and the worker
# trains on CUDA with AMP (device auto).
# docker/ holds the rest of the deployment: nginx in front of API replicas and the
# worker's entrypoint (see docker-compose.yml).
ARG PYTHON=3.11

# The page's and the API docs' browser code (onnxruntime-web, Swagger UI, ReDoc) from
# app/web/package-lock.json, so that neither needs the internet (see app/web).
FROM node:22-slim AS web
WORKDIR /web
COPY app/web/package.json app/web/package-lock.json ./
RUN npm ci --no-audit --no-fund

FROM python:${PYTHON}-slim
ARG PYTHON

ARG GPU=false
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu124

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    POE_DATA_DIR=/var/lib/poe \
    POE_DATA_ROOTS=/data \
    POE_HOST=0.0.0.0 \
    POE_PORT=8000

WORKDIR /srv/poe

# torch first, from the index that matches the build, so `pip install .` keeps it.
RUN if [ "$GPU" = "true" ]; then index="$TORCH_CUDA_INDEX"; else index="$TORCH_CPU_INDEX"; fi \
 && pip install --index-url "$index" "torch>=2.4" "torchvision>=0.19"

COPY pyproject.toml setup.py README.md ./
COPY poe_core poe_core
COPY app app
COPY migrations migrations
# gcc for the native lane's C extension (app/_lane.c), removed once it is built.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && pip install . \
 && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* \
 && if [ "$GPU" = "true" ]; then pip uninstall -y onnxruntime && pip install "onnxruntime-gpu>=1.18"; fi
# Where app.web looks for them: node_modules beside the installed package (the build
# fails here if that is not where the package went; run from / so that Python imports
# the installed package, not the sources in the working directory).
COPY --from=web /web/node_modules /usr/local/lib/python${PYTHON}/site-packages/app/web/node_modules
RUN cd / && python -c "from app.web import ORT_DIST, REDOC_DIST, SWAGGER_DIST; \
assert (ORT_DIST / 'ort.wasm.min.mjs').is_file() and (SWAGGER_DIST / 'swagger-ui-bundle.js').is_file() \
and (REDOC_DIST / 'redoc.standalone.js').is_file(), 'npm packages not where app.web looks'; \
from app.serving import native; assert native.available(), 'the native lane (app/_lane.c) was not built'"
COPY docker/worker-entrypoint.sh /usr/local/bin/poe-worker-entrypoint

RUN useradd --system --uid 10001 --home-dir /var/lib/poe poe \
 && mkdir -p /var/lib/poe /data \
 && chown poe /var/lib/poe
USER poe
# Out of the source tree: `python -m` (torchrun's workers) must import the installed package.
WORKDIR /var/lib/poe
VOLUME ["/var/lib/poe"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"POE_PORT\"]}/health', timeout=4)"

# The embedded default: API and one worker, SQLite and blobs in /var/lib/poe.
CMD ["poe", "serve"]
