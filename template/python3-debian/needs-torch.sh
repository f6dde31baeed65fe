#!/bin/sh
# Usage: needs-torch.sh function/requirements.txt
# Exits 0 when the function's requirements name PyTorch (torch, torchvision or torchaudio; a function
# that uses a library built on torch names torch too). The Dockerfile then installs torch and torchvision
# from PyTorch's own wheel index (TORCH_INDEX_URL: CPU by default, a CUDA index for GPU builds)
# *before* the requirements, so pip finds them satisfied and never pulls PyPI's CUDA build.
# A function that needs no torch gets none: its image stays small.
[ -f "$1" ] || exit 1
grep -Eiq '^[[:space:]]*(torch|torchvision|torchaudio)([^a-z0-9_.-]|$)' "$1"
