#!/usr/bin/env bash
# The GPU benchmark as run on a lent GPU machine (see BENCHMARKS.md): installs the wheels carried in .whl/
# (the machine has torch but not diffusers, open_clip, langgraph, ...), builds the full-size random-weight
# kit ON the GPU with `imgrag models build-tiny --scale full` (once: it stays in $KIT while the machine is
# warm), then runs benchmarks/bench_gpu.py over the code of each pass, back to back on the same kit:
#
#   PASSES="before after"  (default) before = the tree in .before/ (the code before the model thread, commit 5934158), after = this tree
#
# Prepare .before/ here, then carry it and .whl/ to the machine (both git-ignored):
#   mkdir -p .before && git archive 5934158 imgrag agent tools prompts | tar -x -C .before
# Each pass takes about 3-5 minutes on an H100-class card; with the kit build (about 1 minute) both fit
# one 10-minute call, or run one pass per call: PASSES=before, then PASSES=after (the kit is reused).
# Results land in $OUT (or ./gpu-out): gpu.txt, build.json, bench-<pass>.json/.log, compare.md.
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
PASSES="${PASSES:-before after}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 ANONYMIZED_TELEMETRY=False
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
if [ ! -f "$KIT/kit.json" ]; then
  start=$(date +%s)
  PYTHONPATH="$PWD:${PYTHONPATH:-}" python3 -m agent.frontends.cli.app models build-tiny --scale full "$KIT" --json \
    > "$OUT/build.json" 2> "$OUT/build.err"
  echo "build rc=$? in $(( $(date +%s) - start )) s"; tail -3 "$OUT/build.err"
fi
[ "${OMNIGEN:-1}" = only ] && PASSES=""
for pass in $PASSES; do
  code=$PWD
  if [ "$pass" = before ]; then
    code=$PWD/.before
    [ -d "$code/imgrag" ] || { echo "no .before/ tree: see the top of this script"; continue; }
  fi
  start=$(date +%s)
  python3 benchmarks/bench_gpu.py --kit "$KIT" --code "$code" --label "$pass" --json "$OUT/bench-$pass.json" \
    ${BENCH_ARGS:-} 2>&1 | grep -v "Writing model shards" > "$OUT/bench-$pass.log"
  echo "$pass: rc=$? in $(( $(date +%s) - start )) s"; tail -20 "$OUT/bench-$pass.log"
done
# The repair backbones on the same kit (it holds OmniGen-v1 at full size): guided drawings at 1024x1024 with 0-3
# references on SDXL + IP-Adapter and on OmniGen, peak memory, one repair round on each (about 3-4 minutes).
# OMNIGEN=0 skips it; OMNIGEN=only runs it alone (PASSES is then ignored).
if [ "${OMNIGEN:-1}" != 0 ]; then
  start=$(date +%s)
  PYTHONPATH="$PWD:${PYTHONPATH:-}" python3 benchmarks/bench_omnigen.py --kit "$KIT" --repeats "${OMNIGEN_REPEATS:-2}" \
    --json "$OUT/bench-omnigen.json" > "$OUT/bench-omnigen.log" 2>&1
  echo "omnigen: rc=$? in $(( $(date +%s) - start )) s"; tail -12 "$OUT/bench-omnigen.log"
fi
if [ -f "$OUT/bench-before.json" ] && [ -f "$OUT/bench-after.json" ]; then
  python3 benchmarks/bench_gpu.py --compare "$OUT/bench-before.json" "$OUT/bench-after.json" | tee "$OUT/compare.md"
fi
