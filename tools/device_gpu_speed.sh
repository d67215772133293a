#!/usr/bin/env bash
# The GPU measurements of "fast on a GPU", in one call on a lent GPU machine (its python3 has a CUDA
# torch; no Jupyter needed). Everything lands in $OUT (default build/device-out):
#
#   bash tools/device_gpu_speed.sh [TRANSLATION_MINUTES]
#
#   1. benchmarks/sync_check.py: a training step and cached decoding steps under
#      torch.cuda.set_sync_debug_mode("error")                             -> sync-check-cuda.json
#   2. benchmarks/run.py --profile gpu --compile: training at ~25k target tokens a step, ours vs
#      torch.nn.Transformer eager and compiled, MFU against the datasheet and the measured peak,
#      greedy decoding uncached / cached / CUDA graph at 64 and 256 tokens    -> benchmarks-gpu-cuda.json
#   3. the translation speed run (chapter 10, profile=full speedrun=True: 120 s of training), only when
#      the Multi30k copy and chapter 10's cell list were carried in .devcarry (see tools/device_full.sh)
#                                                                           -> translation-speedrun-cuda.json
# Each part has its own time limit so one failure still leaves the others' records.
set -u -o pipefail
OUT=${OUT:-build/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"

timeout 120 python3 benchmarks/sync_check.py --device cuda --out "$OUT/sync-check-cuda.json" 2>&1 | tee "$OUT/sync-check.log"
timeout "${BENCH_SECONDS:-300}" python3 benchmarks/run.py --profile gpu --device cuda --compile \
    --out "$OUT/benchmarks-gpu-cuda.json" 2>&1 | tee "$OUT/bench.log" | tail -20
if [ -d .devcarry/data/multi30k ]; then
    ANNOTATED_TRANSFORMER_SHARED_DATA="$PWD/.devcarry/data" FIGURES_DIR=/tmp/fig10 timeout "${SPEEDRUN_SECONDS:-280}" \
        python3 tools/run_plain.py .devcarry/cells/10_translation.json profile=full device=cuda speedrun=True \
        budget_minutes="${1:-2}" 2>&1 | tee "$OUT/ch10-speedrun.log" | grep -v '^\[run_plain\]' | tail -30
    cp results/translation-speedrun-cuda.json "$OUT/" 2>/dev/null
else
    echo "no .devcarry/data/multi30k: the translation speed run was skipped (see tools/device_full.sh)" | tee "$OUT/ch10-speedrun.log"
fi
ls -la "$OUT"
