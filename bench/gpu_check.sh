#!/usr/bin/env bash
# One GPU check, for an H100 or H200 machine lent for a few minutes: raydpo and TRL 1.16 side by side
# on a randomly initialised Qwen3-0.6B-shaped model (vocabulary 32k, bf16, sequence 1024, batch 8):
# tokens/s, peak GPU memory, and MFU against a bf16 matmul measured in the same run, per system. Installs nothing from the network:
# it needs an environment that already has torch (CUDA), ray, deepspeed, transformers, trl and raydpo
# (this repository on PYTHONPATH). Prints the table last; aim: under 8 minutes.
#
#     bash bench/gpu_check.sh [python]   # default: .venv/bin/python, else python3
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/raydpo/torch_extensions}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" -c "import torch, ray, deepspeed, transformers, trl; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
# TRL, then raydpo on 1 worker: ZeRO-0 and ZeRO-3, in-worker and precomputed reference, padded
# (-noshare: TRL's two-sequence layout), shared-prompt (the default) and padding-free, and with
# FlashAttention 2 where it is installed. Both systems bf16, gradient checkpointing off on both.
SYSTEMS=trl,raydpo-1,raydpo-1-z3,raydpo-1-pre,raydpo-1-noshare,raydpo-1-pf
if "$PY" -c "import flash_attn" 2>/dev/null; then SYSTEMS="$SYSTEMS,raydpo-1-noshare-fa"; fi
timeout 470 "$PY" bench/compare_trl.py --profile gpu --steps 6 --warmup 2 --systems "$SYSTEMS" \
    --work-dir "${RAYDPO_BENCH_DIR:-/tmp/raydpo-bench}"
