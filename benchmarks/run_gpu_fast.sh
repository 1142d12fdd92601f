#!/usr/bin/env bash
# Few-step drawing on a lent GPU (BENCHMARKS.md, "Few-step drawing"): builds the full-size random-weight kit
# (SDXL, IP-Adapter, judge, LLM, CLIP and the 197 M-parameter random LCM-LoRA) ON the GPU, then times a
# 1024x1024 drawing at 30 steps against 4 (LCM-LoRA) and one fixed-policy run of 2 rounds in each mode.
# Wheels: as benchmarks/run_gpu.sh (.whl/, git-ignored), plus peft's (`pip download --no-deps peft==VERSION`).
# Results land in $OUT (or ./gpu-out): gpu.txt, build.json, bench_fast.json, bench_fast.log. About 5 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
KIT="${KIT:-/tmp/imgrag-full-kit}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 ANONYMIZED_TELEMETRY=False
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'peft', peft.__version__)" | tee -a "$OUT/gpu.txt" || exit 1
start=$(date +%s)
python3 -m agent.frontends.cli.app models build-tiny --scale full "$KIT" --json > "$OUT/build.json" 2> "$OUT/build.err"
echo "build rc=$? in $(( $(date +%s) - start )) s"; tail -3 "$OUT/build.err"
python3 benchmarks/bench_fast.py --kit "$KIT" --repeat "${REPEAT:-3}" --json "$OUT/bench_fast.json" 2>&1 \
  | grep -v "Writing model shards" | tee "$OUT/bench_fast.log"
