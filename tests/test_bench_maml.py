"""research.bench.maml at a tiny shape: every side computes the same first meta-loss; and
research.bench.maml_memory's ``--tiny`` mode.

The benchmark's correctness check (ours, second order by reverse-over-reverse and by forward
HVPs, against ``torch.func`` on transformers' BertModel, all from all-MiniLM-L6-v2 on the same
batch) and its output contract (``speedup_vs_torch_func=`` last); also from a random checkpoint
when only a config.json is at hand (``--init=random``); and the same with the LoRA inner loop
(``--inner=lora``) on both sides.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from research.subprocess_env import child_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("init", ["pretrained", "random"])
def test_maml_bench_sides_agree_on_the_first_meta_loss(minilm_dir, tmp_path, init):
  """``random``: from a directory holding only MiniLM's config.json, as on the GPU machine."""
  pytest.importorskip("torch")
  cmd = [sys.executable, "-m", "research.bench.maml", "--episodes=1", "--shot=1", "--query=1"]
  cmd += ["--inner_steps=1", "--seq=8", "--rounds=1", "--variants=second,hvp", f"--init={init}"]
  if init == "random":
    shutil.copy(minilm_dir / "config.json", tmp_path / "config.json")
    cmd.append(f"--model={tmp_path}")
  # One device, as users run it.
  out = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert re.fullmatch(r"speedup_vs_torch_func=\d+\.\d\d", lines[-1]), lines[-1]
  first = next(line for line in lines if line.startswith("first meta-loss"))
  losses = [float(x) for x in re.findall(r" (\d+\.\d+)", first)]
  assert len(losses) == 3, first
  assert max(losses) - min(losses) < 1e-4, first


@pytest.mark.slow
def test_maml_bench_lora_inner_loop_sides_agree_on_the_first_meta_loss():
  """``--inner=lora``: ours (the meta trainer's LoRA inner loop) and torch.func over a
  LoRA-wrapped BertModel from the same LoRA values compute the same first meta-loss.

  Two inner steps at a large inner lr, so the LoRA matrices reach the loss: with the zero head
  the first inner step moves only the head (the LoRA gradient is zero), so at one step A never
  touches the query loss; at the bench's lr 0.01 a different A moves it by < 1e-6, at 2 steps
  and lr 0.5 by ~3e-3 (measured with a redrawn A), well above the tolerance.
  """
  pytest.importorskip("torch")
  cmd = [sys.executable, "-m", "research.bench.maml", "--episodes=1", "--shot=1", "--query=1"]
  cmd += ["--inner_steps=2", "--inner_lr=0.5", "--seq=8", "--rounds=1", "--variants=second,hvp"]
  cmd += ["--inner=lora"]
  out = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert re.fullmatch(r"speedup_vs_torch_func=\d+\.\d\d", lines[-1]), lines[-1]
  assert any(line.startswith("inner loop: LoRA rank 8 on query/value") for line in lines)
  first = next(line for line in lines if line.startswith("first meta-loss"))
  assert "torch.func (transformers + LoRA)" in first, first
  losses = [float(x) for x in re.findall(r" (\d+\.\d+)", first)]
  assert len(losses) == 3, first
  assert max(losses) - min(losses) < 1e-4, first


def test_maml_memory_bench_tiny_lora_inner_loop_is_smaller():
  """``research.bench.maml_memory --tiny``: each configuration in its own subprocess; the LoRA
  inner loop meta-learns a fraction of the parameters in a smaller compiled step."""
  cmd = [sys.executable, "-m", "research.bench.maml_memory", "--tiny", "--orders=first"]
  out = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  by_inner = {r["inner"]: r for r in rows}
  assert set(by_inner) == {"full", "lora"}
  full, lora = by_inner["full"], by_inner["lora"]
  assert lora["meta_learned"] < full["meta_learned"] / 100
  assert lora["compiled_gb"] < full["compiled_gb"]
  for r in rows:
    assert r["peak_rss_gb"] > 0 and r["s_per_step"] > 0 and np.isfinite(r["loss"])
  assert "| tiny | lora | first |" in out.stdout and out.stdout.startswith("uptime:")
