#!/usr/bin/env bash
# The device check of issue 4, for a session lent the GPU machine (run from the repo root):
# the tests marked `gpu`, then the train-step benchmark with a BERT-base-sized encoder in bf16
# at 128 tokens (seq/s and MFU against the peak table in research/bench/train_step.py).
# Needs a CUDA jax in $PY's environment. Each part is bounded so the whole fits a 10-minute call.
set -euo pipefail
PY=${PY:-.venv/bin/python}
"$PY" -c "import jax; print(jax.devices())"
status=0
timeout 240 "$PY" -m pytest -q -m gpu tests || status=$?
[ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"  # 5: no test marked gpu
for batch in 64 256; do
  timeout 240 "$PY" -m research.bench.train_step --size=bert-base --dtype=bfloat16 \
    --peer=none --batch="$batch" --seq=128 --rounds=5 --steps=20
done
