#!/usr/bin/env bash
# Real-scale benchmark on one GPU: LLaVA-1.5-7B and -13B shapes, random bf16 weights, the real
# LLaVA-1.5 vocabulary (tests/data/llama2-tokenizer, built by yollava.checkpoints; --tokenizer DIR).
#   bash bench/gpu/run.sh                 # full run (sized for < 8 minutes on one H100)
#   bash bench/gpu/run.sh --small         # CPU-sized shapes (what the test suite runs)
# Results: a table on stdout and JSON at ${OUT:-bench/gpu}/results.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
exec "$PY" -m bench.gpu.bench --out "${OUT:-bench/gpu}/results.json" "$@"
