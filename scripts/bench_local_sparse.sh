#!/usr/bin/env bash
# The CPU benchmark of the local, sparse and biased mechanisms (docs/local_sparse.md; float32, B=1,
# H=4, D=64, causal, one run), preceded by a short CUDA check of the five ops and of the bf16 ALiBi
# factors when a GPU is present. Installs nothing: attnlab runs from src/ via PYTHONPATH.
#   bash scripts/bench_local_sparse.sh [OUT_DIR] [N_LOCAL] [N_BIAS] [THREADS]
# Defaults: OUT_DIR=$OUT or runs/local_sparse, N_LOCAL=16384, N_BIAS=4096, THREADS=all cores.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PY="${PYTHON:-python3}"
OUT_DIR="${1:-${OUT:-$ROOT/runs/local_sparse}}"
N_LOCAL="${2:-16384}"
N_BIAS="${3:-4096}"
THREADS="${4:-$(nproc)}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d)"
common=(--preset cpu --device cpu --threads "$THREADS" --batch 1 --heads 4 --dim 64 --dtype float32
        --memory subprocess --max-cell-seconds 600 --memory-limit-gb 100 --externals none --no-resume)
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "== CUDA check"
    "$PY" "$HERE/check_local_sparse_cuda.py" | tee "$OUT_DIR/cuda_check.md"
fi
echo "== neighborhood (kernel 127) and sliding window (128), gather vs dense masked reference, N=$N_LOCAL"
"$PY" -m attnlab.cli bench speed "${common[@]}" --mechanisms neighborhood,sliding_window --lengths "$N_LOCAL" \
    --mode fwdbwd --impls gather,reference --out "$WORK/local"
cp "$WORK/local/speed.md" "$OUT_DIR/local_speed.md"; cp "$WORK/local/speed.jsonl" "$OUT_DIR/local_speed.jsonl"
echo "== flashbias (rank-2 ALiBi factors) vs its dense-bias reference, N=$N_BIAS"
"$PY" -m attnlab.cli bench speed "${common[@]}" --mechanisms flashbias --lengths "$N_BIAS" \
    --mode fwd,fwdbwd --impls sdpa,reference --out "$WORK/bias"
cp "$WORK/bias/speed.md" "$OUT_DIR/flashbias_speed.md"; cp "$WORK/bias/speed.jsonl" "$OUT_DIR/flashbias_speed.jsonl"
echo "== flashbias vs SDPA with a dense float bias, N=$N_BIAS"
"$PY" "$HERE/bench_flashbias_dense_bias.py" --length "$N_BIAS" --threads "$THREADS" | tee "$OUT_DIR/flashbias_vs_dense_sdpa.md"
