#!/usr/bin/env bash
# The GPU benchmark as run on a lent GPU machine (see BENCHMARKS.md): installs the wheels carried in
# .whl/ (the machine has torch but not diffusers, open_clip, langgraph, ...), builds the full-size
# random-weight kit ON the GPU with `imgrag models build-tiny --scale full`, then times it.
# Results land in $OUT (or ./gpu-out): build.json, bench_gpu.json, bench_gpu.log.
# .whl/ (git-ignored) held cp312 manylinux wheels of: diffusers open_clip_torch ftfy wcwidth qwen-vl-utils
# transformers regex timm langgraph langgraph-checkpoint langgraph-checkpoint-sqlite langgraph-prebuilt
# langgraph-sdk langchain-core langchain-protocol langsmith pydantic pydantic-core typing-inspection
# annotated-types typing-extensions jsonpatch jsonpointer tenacity uuid-utils orjson ormsgpack zstandard
# requests-toolbelt sniffio distro truststore websockets httpx2 httpcore2 importlib-metadata lazy-importer
# aiosqlite sqlite-vec xxhash, the versions of .venv (`pip download --no-deps --only-binary=:all:
# --python-version 3.12 --platform manylinux2014_x86_64 ... -d .whl NAME==VERSION`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
KIT="${KIT:-/tmp/imgrag-full-kit}"
mkdir -p "$OUT"
t0=$(date +%s)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 ANONYMIZED_TELEMETRY=False
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, diffusers, open_clip, langgraph; print('torch', torch.__version__,
'transformers', transformers.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
df -h /tmp | tee -a "$OUT/gpu.txt"
start=$(date +%s)
python3 -m agent.cli models build-tiny --scale full "$KIT" --json > "$OUT/build.json" 2> "$OUT/build.err"
echo "build rc=$? in $(( $(date +%s) - start )) s"; tail -3 "$OUT/build.err"; du -sh "$KIT"
# Optional stages (the LLM call, the agent round) are skipped when a 10-minute call would run out;
# the swap stages after them keep ~2 minutes.
deadline=${DEADLINE:-$(( 560 - ($(date +%s) - t0) - 150 ))}
python3 benchmarks/bench_gpu.py --kit "$KIT" --json "$OUT/bench_gpu.json" --deadline "$deadline" ${BENCH_ARGS:-} 2>&1 \
  | grep -v "Writing model shards" | tee "$OUT/bench_gpu.log"
