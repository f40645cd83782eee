# The poe service image: API (`poe serve`) and worker (`poe worker`) from one image.
#   CPU (default):  docker build -t poe .
#   GPU workers:    docker build -t poe:gpu --build-arg GPU=true .
# The GPU build installs CUDA wheels of torch (TORCH_CUDA_INDEX) and onnxruntime-gpu in
# place of onnxruntime; run it with `--gpus all` (NVIDIA Container Toolkit) and the worker
# trains on CUDA with AMP (device auto).
FROM python:3.11-slim

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

COPY pyproject.toml README.md ./
COPY poe_core poe_core
COPY app app
COPY migrations migrations
RUN pip install . \
 && if [ "$GPU" = "true" ]; then pip uninstall -y onnxruntime && pip install "onnxruntime-gpu>=1.18"; fi

RUN useradd --system --uid 10001 --home-dir /var/lib/poe poe \
 && mkdir -p /var/lib/poe /data \
 && chown poe /var/lib/poe
USER poe
VOLUME ["/var/lib/poe"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"POE_PORT\"]}/health', timeout=4)"

# The embedded default: API and one worker, SQLite and blobs in /var/lib/poe.
CMD ["poe", "serve"]
