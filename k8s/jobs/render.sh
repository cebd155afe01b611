#!/usr/bin/env bash
# The seed jobs' manifests in this folder, written by `dsum k8s render` (tests/test_k8s.py renders each
# line again and fails if a file here differs: a manifest never drifts from its job). After editing a
# job, run this from the repository root. For your own registry, change --image (or use kustomize).
set -euo pipefail
GPU=ghcr.io/your-org/dsum:0.1.0-gpu
CPU=ghcr.io/your-org/dsum:0.1.0-cpu
dsum k8s render jobs/mistral-7b-samsum-lora.yaml --image $GPU --out k8s/jobs/mistral-7b-samsum-lora.yaml
dsum k8s render jobs/mistral-7b-samsum-lora.yaml --sweep --image $GPU --out k8s/jobs/mistral-7b-samsum-lora.sweep.yaml
dsum k8s render jobs/flan-t5-base-dialogsum-lora.yaml --schedule "0 3 * * *" --image $GPU --out k8s/jobs/flan-t5-base-dialogsum-lora.nightly.yaml
dsum k8s render jobs/flan-t5-base-dialogsum-lora.yaml --schedule "0 3 * * *" --via raycronjob --image $GPU --out k8s/jobs/flan-t5-base-dialogsum-lora.nightly-raycronjob.yaml
dsum k8s render jobs/tiny-dialogsum.yaml --image $CPU --out k8s/jobs/tiny-dialogsum.yaml
dsum k8s render jobs/tiny-dialogsum.yaml train.eval_steps=50 --sweep --image $CPU --out k8s/jobs/tiny-dialogsum.sweep.yaml
