#!/usr/bin/env bash
# The device checks of issues 4 and 8, for a session lent the GPU machine (run from the repo
# root): the tests marked `gpu` (tests/test_gpu.py); the train-step benchmark with a
# BERT-base-sized encoder in bf16 at 128 tokens (seq/s and MFU against the peak table in
# research/bench/train_step.py); the MAML meta-step benchmark against torch.func (the peer on the
# GPU when torch has CUDA); issue 24: cuDNN's fused attention against XLA's at 512 tokens in bf16
# (research/bench/attention.py: max abs difference and time) and the MFU of the BERT-base bf16
# train step per attention kernel (research/bench/mfu.py; goal >= 45% of the 989 TFLOP/s peak).
#
# That machine's python3 has CUDA jax, flax, optax, orbax, transformers and torch but not the
# rest of our dependencies, nor MiniLM's weights: first run research/bench/device_wheels.sh here,
# then carry its .whl/ (wheels + MiniLM's config.json; the benchmarks start from random weights):
#   run(command="bash research/bench/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log",
#       carry=[".whl"], timeout_s=540)
# Parts can be named (tests train_step maml attention mfu; default all). Each part is bounded:
# tests + train_step + maml fit one 10-minute call, attention + mfu another:
#   run(command="bash research/bench/gpu_check.sh attention mfu 2>&1 | tee $OUT/gpu_attn.log",
#       carry=[".whl"], timeout_s=420)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
MODEL=sentence-transformers/all-MiniLM-L6-v2
INIT=pretrained
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  if ! "$PY" -c "import tensorflow_metadata.proto.v0.schema_pb2" 2>/dev/null; then
    echo "image's protobuf too old for tensorflow-metadata: installing .whl/protobuf"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site-pb .whl/protobuf/*.whl
    export PYTHONPATH=/tmp/site-pb:$PYTHONPATH
  fi
  MODEL=.whl/minilm
  INIT=random
fi
export PYTHONPATH=.:${PYTHONPATH:-} XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
"$PY" -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

PARTS=" ${*:-tests train_step maml attention mfu} "
want() { [[ "$PARTS" == *" $1 "* ]]; }

status=0
if want tests; then
  JAX_PLATFORMS=cuda,cpu timeout 150 "$PY" -m pytest -q -m gpu tests/test_gpu.py || status=$?
  [ "$status" -eq 0 ] || echo "gpu tests: exit $status"
fi

if want train_step; then
  for batch in 64 256; do
    timeout 120 "$PY" -m research.bench.train_step --model="$MODEL" --size=bert-base \
      --dtype=bfloat16 --peer=none --batch="$batch" --seq=128 --rounds=5 --steps=20 || status=$?
  done
fi
if want maml; then
  peer=torch_func
  "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || peer=none
  timeout 180 "$PY" -m research.bench.maml --model="$MODEL" --init="$INIT" --rounds=5 \
    --variants=second,hvp,first --episode_loop=scan --peer="$peer" || status=$?
fi

# Issue 24: attention kernels (last line cudnn_speedup=) and MFU per kernel (mfu_pct=).
if want attention; then
  timeout 90 "$PY" -m research.bench.attention --batch=8 --seq=512 --dtype=bfloat16 \
    --rounds=5 --steps=20 || status=$?
fi
if want mfu; then
  timeout 300 "$PY" -m research.bench.mfu --model="$MODEL" --size=bert-base --dtype=bfloat16 \
    --batch=64 --seq=512 --attention=auto,xla --rounds=3 --steps=10 || status=$?
fi
exit "$status"
