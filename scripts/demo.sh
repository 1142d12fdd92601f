#!/usr/bin/env bash
# The offline demo: builds the tiny kit, indexes the sample photos, runs the agent on one prompt.
# The tiny models have random weights: the pictures are noise and the verdicts junk. The demo shows
# that every part works end to end on any machine, not what the real models draw.
set -euo pipefail
cd "$(dirname "$0")/.."
IMGRAG=.venv/bin/imgrag
export IMGRAG_HOME="${IMGRAG_HOME:-$PWD/.imgrag}"

echo "== 1/4 build the tiny model kit (random weights, real architectures) =="
$IMGRAG models build-tiny

echo "== 2/4 index the sample photographs =="
$IMGRAG index datasets/sample --profile tiny

echo "== 3/4 run the agent: draw, judge, retrieve, redraw (2 rounds) =="
$IMGRAG run "a beautiful retriever and a cradle" --profile tiny --max-rounds 2 --json > "$IMGRAG_HOME/demo-result.json"
run_dir=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['run_dir'])" "$IMGRAG_HOME/demo-result.json")

echo "== 4/4 the run's report =="
$IMGRAG report "$run_dir" -o "$run_dir/report.html"

echo
echo "Done. Everything is under $IMGRAG_HOME:"
echo "  run folder : $run_dir   (candidates/, trace.jsonl, result.json, report.html)"
echo "  result     : $IMGRAG_HOME/demo-result.json"
echo "The tiny LLM's output is junk, so the fixed policy drove the steps; the pictures are noise."
echo "Point a profile at real checkpoints for real pictures (README: Real use)."
