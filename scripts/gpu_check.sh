#!/usr/bin/env bash
# One prepared GPU run (see scripts/gpu_check.py): correctness of every registered op on CUDA in
# float32 and bf16, then timings at the anchor shape (bf16, H=16, D=128, 65,536 tokens per call), one
# table with ratios to the anchors (docs/benchmarks.md), JSON + Markdown written to $OUT (or --out DIR, else runs/gpu_check).
# Installs nothing from the network: attnlab runs from src/ via PYTHONPATH; an fla-core wheel
# (fla_core-*.whl) placed beside this script is installed offline into a private folder.
#   bash scripts/gpu_check.sh                      # on the GPU machine
#   bash scripts/gpu_check.sh --device cpu --quick # the same code paths on a CPU, tiny sizes
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
shopt -s nullglob
wheels=("$HERE"/fla_core-*.whl "$HERE"/flash_linear_attention-*.whl)
if (( ${#wheels[@]} )); then
    target="${TMPDIR:-/tmp}/attnlab-gpu-check-wheels"
    if "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$target" "${wheels[@]}"; then
        export PYTHONPATH="$PYTHONPATH:$target"
        echo "installed offline: ${wheels[*]##*/}"
    else
        echo "could not install ${wheels[*]##*/}: the fla rows are left out"
    fi
fi
# 8 minutes at most: the script stops timing at its own budget (440 s); this is the hard stop.
exec timeout --signal=INT 475 "$PY" "$HERE/gpu_check.py" "$@"
