#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before research/bench/gpu_check.sh: fetches, into .whl/, the
# wheels of what that machine's image lacks for Python 3.12 x86-64 (its image has jax, flax,
# optax, orbax, transformers and torch; /work/.library/device/KINDS.md lists it), and copies
# MiniLM's config.json (not its 87 MB of weights: the benchmarks start from random weights
# there) to .whl/minilm/; .whl/ is git-ignored. The device call then carries .whl (~15 MB; the limit is 64 MiB):
#   run(command="bash research/bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.whl
PY=${PY:-.venv/bin/python}
mkdir -p "$DEST/minilm"
# Versions as in this project's .venv; the rest of what they need is in the image.
wheels=(tensorflow-datasets==4.9.10 grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 immutabledict==4.3.1
  portpicker==1.6.0 toml==0.10.2 dm-tree==0.1.10 simple-parsing==0.1.9 docstring-parser==0.18.0
  termcolor==3.3.0 tensorboardX==2.6.5)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" "${wheels[@]}"
# These two ship no wheel: build their (pure-Python) ones here.
"$PY" -m pip wheel -q --no-deps -w "$DEST" promise==2.3 seqeval==1.2.2
# protobuf goes apart: gpu_check.sh installs it only where the image's is too old for the
# tensorflow-metadata protos (their gencode needs runtime >= 6.31.1); else the image's is kept.
pb=$("$PY" -c "import google.protobuf as p; print(p.__version__)")
mkdir -p "$DEST/protobuf"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST/protobuf" "protobuf==$pb"
"$PY" - "$DEST/minilm" <<'PY'
import shutil, sys
from research.transfer import hf
shutil.copy(hf.resolve(hf.MINILM) / "config.json", sys.argv[1])
PY
du -sh "$DEST"
