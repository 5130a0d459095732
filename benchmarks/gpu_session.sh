#!/usr/bin/env bash
# Everything this project measures on a lent GPU, in one call of a few minutes (see
# benchmarks/README.md). Each part fails soft: a failure is logged and the next part runs.
#
#   OUT=/some/folder bash benchmarks/gpu_session.sh            # on the GPU machine
#
# 1. the Triton kernels' compiled-GPU tests (the cases CI skips for want of a GPU; the
#    interpreter cases are CI's and need the CI's triton/numpy);
# 2. benchmarks/gpu_scan.py: scan and layers vs cuDNN nn.GRU / nn.LSTM and fla's HGRN kernels;
# 3. the Shakespeare "paper" preset (nanoGPT's setting, ~10.65M parameters), minGRU and
#    Llama trained by `minrnn compare` on the GPU in bf16, each capped at RUN_BUDGET_S seconds.
# Optional wheels (fla-core) are installed from .whl/ when that folder is there.
set -u
OUT=${OUT:?set OUT to the folder for the results}
STEPS=${STEPS:-2500}
RUN_BUDGET_S=${RUN_BUDGET_S:-130}
SCAN_BUDGET_S=${SCAN_BUDGET_S:-80}
PARTS=${PARTS:-123}         # which parts to run
DEVICE=${DEVICE:-cuda}      # DEVICE=cpu PARTS=3 STEPS=3 checks part 3 without a GPU
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"  # before the image's own packages
fi
export MINRNN_DATA_DIR=${MINRNN_DATA_DIR:-$PWD/.gpudata}
log() { echo "== $(date -u +%H:%M:%S) $*"; }

log "machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

if [[ $PARTS == *1* ]]; then
log "1. Triton tests on the GPU"
timeout 110 "$PY" -m pytest -q -x -p no:cacheprovider tests/ops/test_triton.py -k 'not interpreted' 2>&1 | tail -15 > "$OUT/triton_tests.txt"
cat "$OUT/triton_tests.txt"
fi

if [[ $PARTS == *2* ]]; then
log "2. gpu_scan.py"
timeout $((SCAN_BUDGET_S + 90)) "$PY" benchmarks/gpu_scan.py --budget-s "$SCAN_BUDGET_S" --out "$OUT/gpu_scan.json" \
    > "$OUT/gpu_scan.md" 2>&1 || echo "gpu_scan exited with $?"
tail -40 "$OUT/gpu_scan.md"
fi

if [[ $PARTS == *3* ]]; then
log "3. Shakespeare paper preset: minGRU and Llama, bf16, $STEPS steps, $RUN_BUDGET_S s each at most"
CMP=/tmp/compare
for model in mingru llama; do
    timeout $((RUN_BUDGET_S + 60)) "$PY" -m minrnn compare shakespeare_char --preset paper --models "$model" \
        --device "$DEVICE" --dtype bfloat16 --steps "$STEPS" --eval-every 250 --budget-s "$RUN_BUDGET_S" \
        --out "$CMP" --no-progress 2>&1 | grep -v "^|" | grep -v "^$" | tail -40 || echo "$model exited with $?"
done
if [ -f "$CMP/shakespeare_char-paper/runs/mingru/result.json" ] && [ -f "$CMP/shakespeare_char-paper/runs/llama/result.json" ]; then
    "$PY" -m minrnn compare shakespeare_char --preset paper --models mingru,llama --device "$DEVICE" --dtype bfloat16 \
        --steps "$STEPS" --eval-every 250 --budget-s "$RUN_BUDGET_S" --out "$CMP" --no-progress > /dev/null
fi
mkdir -p "$OUT/shakespeare_char-paper"
cp "$CMP"/shakespeare_char-paper/results.* "$CMP"/shakespeare_char-paper/*.png "$OUT/shakespeare_char-paper/" 2>/dev/null
cat "$OUT/shakespeare_char-paper/results.md" 2>/dev/null
fi
log "done"
