"""research.bench.attention and research.bench.mfu run end to end in their tiny modes on CPU.

On the GPU machine research/bench/gpu_check.sh runs them at full size; here they only have to
run and keep their output contract (the last ``key=value`` line scripts read). Without a GPU the
attention benchmark times XLA's kernel alone and the MFU has no peak to divide by.
"""

from __future__ import annotations

from research.bench import attention as attention_bench
from research.bench import mfu


def test_dot_product_attention_bench_tiny(capsys):
  assert (
    attention_bench.main(["--batch=2", "--seq=16", "--heads=2", "--rounds=1", "--steps=1"]) == 0
  )
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[-1] == "cudnn_speedup=n/a"
  assert any(line.startswith("xla ") and "ms/call" in line for line in lines)


def test_mfu_bench_tiny(capsys, minilm_dir):
  args = ["--size=tiny", "--batch=8", "--seq=16", "--rounds=1", "--steps=1", "--attention=auto"]
  assert mfu.main([*args, f"--model={minilm_dir}", "--peak_tflops=1"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[-1].startswith("mfu_pct=")
  assert float(lines[-1].split("=")[1]) > 0  # --peak_tflops=1 gives the CPU a peak.
  assert any(line.startswith("auto ") for line in lines)
