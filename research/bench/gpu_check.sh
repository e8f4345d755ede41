#!/usr/bin/env bash
# The device checks of issues 4 and 8, for a session lent the GPU machine (run from the repo
# root): the tests marked `gpu`; the train-step benchmark with a BERT-base-sized encoder in bf16
# at 128 tokens (seq/s and MFU against the peak table in research/bench/train_step.py); the MAML
# meta-step benchmark against torch.func (the peer on the GPU when torch has CUDA).
# Needs a CUDA jax in $PY's environment. Each part is bounded so the whole fits a 10-minute call.
set -euo pipefail
PY=${PY:-.venv/bin/python}
"$PY" -c "import jax; print(jax.devices())"
status=0
timeout 150 "$PY" -m pytest -q -m gpu tests || status=$?
[ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"  # 5: no test marked gpu
for batch in 64 256; do
  timeout 120 "$PY" -m research.bench.train_step --size=bert-base --dtype=bfloat16 \
    --peer=none --batch="$batch" --seq=128 --rounds=5 --steps=20
done
peer=torch_func
"$PY" -c "import torch" 2>/dev/null || peer=none
timeout 180 "$PY" -m research.bench.maml --rounds=5 --variants=second,hvp,first \
  --episode_loop=scan --peer="$peer"
