"""Benchmark: peak memory of one LoRA training step over a bf16 base vs an NF4 base (QLoRA).

  python -m research.bench.qlora_memory            # ~0.49B Llama, 8 x 256, LoRA r=16 everywhere
  python -m research.bench.qlora_memory --tiny     # a 2-layer model, seconds (the test's mode)

The model is a random Llama-shaped classifier (hidden 1024, 24 layers, 16 heads, intermediate
4864, vocabulary 32000, no LM head: about 0.49B parameters) with LoRA rank 16 on q/k/v/o and
gate/up/down and a last-token 2-label head, trained by exactly the trainer's step
(research.train.steps, optax freeze labels from research.transfer.peft, state donated), layers
rematerialised. On CPU, whose XLA keeps every layer's activations live despite remat, the
step's batch goes through in micro-batches of one row (``--grad_accum``: the same step, by the
trainer's gradient accumulation). The two runs differ only in how the frozen base projections
are stored: bf16, or NF4 with double-quantised scales (``peft.quantize='nf4'``); embeddings and
norms are bf16 in both, LoRA and the head fp32. Each run is its own subprocess, so one's
allocations cannot inflate the other's peak, and builds its parameters leaf by leaf directly
in the stored dtype and format (random codes for NF4): the full-precision tree never exists,
so the peak is the step's, not the init's. Compute is fp32 on CPU (XLA's CPU bf16 matmuls are
slow) and bf16 on an accelerator.

Measured per run: the peak resident set (``ru_maxrss``: imports, compilation and the step all
included) and the resident set after imports; on an accelerator the device's
``peak_bytes_in_use``; and XLA's own account of the compiled step (arguments + temporaries +
outputs not aliased to the donated arguments); and the peak resident set during the step
alone (the kernel's count restarted after compiling, through ``/proc/self/clear_refs``). The last
line is ``nf4_over_bf16_peak=<NF4 peak / bf16 peak>`` from the device peak on an accelerator,
else from the step's peak resident set minus the resident set after imports (what the run
added: the interpreter and libraries are the same in both, and XLA's compiler, whose
transient memory dwarfs a tiny model's, is not what QLoRA saves).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from research.subprocess_env import child_env

SIZES = dict(
  vocab_size=32000,
  hidden_size=1024,
  num_layers=24,
  num_heads=16,
  num_kv_heads=16,
  head_dim=64,
  intermediate_size=4864,
  max_position_embeddings=512,
  lm_head=False,
)
TINY = dict(
  vocab_size=512,
  hidden_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=4,
  head_dim=16,
  intermediate_size=128,
  max_position_embeddings=64,
  lm_head=False,
)
TARGETS = (
  r"encoder/layer_\d+/attention/(query|key|value|output)",
  r"encoder/layer_\d+/ffn/(gate|up|down)",
)
STORAGE = ("bf16", "nf4")
GIB = 2**30


def rss_bytes() -> int:
  """The resident set now (``/proc/self/statm``; 0 where there is none)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return 0


def reset_peak() -> bool:
  """Restarts the kernel's count of this process's peak resident set (``VmHWM``), so the next
  :func:`peak_since_reset` covers what follows only; False where the kernel does not allow it."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_since_reset() -> int:
  """``VmHWM`` of ``/proc/self/status``: the peak resident set since :func:`reset_peak`."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise OSError("no VmHWM in /proc/self/status")


def build_params(abstract: Any, trainable: Any, base_dtype: Any, seed: int = 0) -> Any:
  """Random params of ``abstract``'s tree, made leaf by leaf in their stored form.

  Trainable leaves (``trainable`` labels them) are fp32 (``lora_b`` zero, as LoRA starts); NF4
  codes and absmaxes are random bytes, their scales small constants; every other float leaf of
  the frozen base is ``base_dtype`` (norm scales 1). Nothing is ever held at full precision.
  """
  from research import optim, paths

  labels = paths.flatten(trainable)
  key = jax.random.key(seed)

  def one(path: str, leaf: Any) -> jax.Array:
    k = jax.random.fold_in(key, zlib.crc32(path.encode()))  # hash() varies between runs.
    name = path.rsplit("/", 1)[-1]
    if leaf.dtype == jnp.uint8:
      return jax.random.randint(k, leaf.shape, 0, 256, jnp.int32).astype(jnp.uint8)
    if "/kernel_nf4/" in path:  # The double quantisation's fp32 scale and offset.
      return jnp.full(leaf.shape, 0.05 if name == "offset" else 0.01, jnp.float32)
    if labels[path] != optim.FROZEN:
      if name == "lora_b":
        return jnp.zeros(leaf.shape, jnp.float32)
      return 0.02 * jax.random.normal(k, leaf.shape, jnp.float32)
    if name == "scale":
      return jnp.ones(leaf.shape, base_dtype)
    return (0.02 * jax.random.normal(k, leaf.shape, jnp.float32)).astype(base_dtype)

  return paths.map_with_path(one, abstract)


def worker(
  storage: str, tiny: bool, batch: int, seq: int, rank: int, grad_accum: int, layers: int = 0
) -> dict[str, Any]:
  """One training step of ``storage``'s run in this process; its memory figures."""
  from research import optim, paths
  from research.models.config import PeftConfig
  from research.models.decoder_only.llama import LlamaConfig
  from research.models.heads import HeadConfig
  from research.models.task_model import init_params, make_task_model
  from research.train.state import TrainState
  from research.train.steps import make_train_step
  from research.transfer import peft

  after_imports = rss_bytes()
  accelerator = jax.default_backend() != "cpu"
  compute = jnp.bfloat16 if accelerator else jnp.float32
  quantize = "nf4" if storage == "nf4" else "none"
  lora = PeftConfig("lora", rank, 2.0 * rank, lora_targets=TARGETS, quantize=quantize)
  sizes = dict(TINY if tiny else SIZES, **({"num_layers": layers} if layers else {}))
  cfg = LlamaConfig(**sizes, peft=lora)
  heads = {"cls": HeadConfig(num_labels=2, pooling="last", dropout=0.0)}
  model = make_task_model(cfg, heads, dtype=compute, remat=True)
  abstract = jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))
  opt_cfg = optim.default_config()
  opt_cfg.update(trainable=peft.trainable_rules(lora, ["cls"]), lr=2e-4, weight_decay=0.0)
  labels = optim.freeze_labels(opt_cfg, abstract)
  params = build_params(abstract, labels, jnp.bfloat16)
  counts = optim.count_params(abstract, labels)
  stored = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  tx, _ = optim.build(opt_cfg, params, 10)
  state = TrainState.create(params, tx, jax.random.key_data(jax.random.key(1)))
  del params
  rng = np.random.default_rng(0)
  data = {
    "input_ids": jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, seq)), jnp.int32),
    "attention_mask": jnp.ones((batch, seq), jnp.int32),
    "token_type_ids": jnp.zeros((batch, seq), jnp.int32),
    "labels": jnp.asarray(rng.integers(0, 2, batch), jnp.int32),
    "example_mask": jnp.ones(batch, jnp.float32),
  }
  trained = frozenset(p for p, label in paths.flatten(labels).items() if label != optim.FROZEN)
  train_step = make_train_step(
    model, "cls", "classification", grad_accum=grad_accum, trainable=trained
  )
  step = jax.jit(train_step, donate_argnums=0)
  compiled = step.lower(state, data).compile()
  xla = compiled.memory_analysis()
  xla_bytes = None
  if xla is not None:
    xla_bytes = (
      xla.argument_size_in_bytes
      + xla.temp_size_in_bytes
      + xla.output_size_in_bytes
      - xla.alias_size_in_bytes
    )
  step_peak = None
  if reset_peak():  # From here on: the state, the step's buffers, the compiled program.
    state, metrics = compiled(state, data)
    loss = float(metrics["loss"])
    step_peak = peak_since_reset()
  else:
    state, metrics = compiled(state, data)
    loss = float(metrics["loss"])
  device_peak = None
  if accelerator:
    stats = jax.devices()[0].memory_stats() or {}
    device_peak = stats.get("peak_bytes_in_use")
  return {
    "storage": storage,
    "params": counts["total"],
    "trainable": counts["trainable"],
    "stored_param_bytes": stored,
    "rss_after_imports": after_imports,
    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "step_peak_rss": step_peak,
    "xla_step_bytes": xla_bytes,
    "device_peak": device_peak,
    "loss": loss,
    "backend": jax.default_backend(),
    "grad_accum": grad_accum,
  }


def run_both(
  tiny: bool, batch: int, seq: int, rank: int, grad_accum: int, layers: int = 0
) -> dict[str, dict[str, Any]]:
  """Each storage's :func:`worker` in a fresh subprocess; ``{storage: its figures}``.

  Raises:
    RuntimeError: a worker failed (its stderr's tail in the message).
  """
  out = {}
  for storage in STORAGE:
    cmd = [sys.executable, "-m", "research.bench.qlora_memory", f"--worker={storage}"]
    cmd += [f"--batch={batch}", f"--seq={seq}", f"--rank={rank}", f"--grad_accum={grad_accum}"]
    cmd += (["--tiny"] if tiny else []) + ([f"--layers={layers}"] if layers else [])
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"{storage} worker: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    out[storage] = json.loads(proc.stdout.strip().splitlines()[-1])
  return out


def ratio(runs: dict[str, dict[str, Any]]) -> float:
  """NF4 peak over bf16 peak: the device peak on an accelerator, else what each process added
  to its resident set after imports at its peak during the step (the process peak, compilation
  included, where the kernel cannot restart the count)."""
  if all(r["device_peak"] for r in runs.values()):
    return runs["nf4"]["device_peak"] / runs["bf16"]["device_peak"]
  key = "step_peak_rss" if all(r["step_peak_rss"] for r in runs.values()) else "peak_rss"
  added = {k: r[key] - r["rss_after_imports"] for k, r in runs.items()}
  return added["nf4"] / added["bf16"]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tiny", action="store_true", help="a 2-layer model (for tests)")
  parser.add_argument("--batch", type=int, help="rows (default 8; --tiny: 2)")
  parser.add_argument("--seq", type=int, help="tokens a row (default 256; --tiny: 32)")
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument(
    "--grad_accum",
    type=int,
    help="micro-batches of the one step (default: the batch size on CPU, whose XLA does not "
    "honour remat, so every layer's activations stay live; 1 on an accelerator)",
  )
  parser.add_argument("--layers", type=int, default=0, help="override the layer count")
  parser.add_argument("--worker", choices=STORAGE, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.batch = args.batch or (2 if args.tiny else 8)
  args.seq = args.seq or (32 if args.tiny else 256)
  if args.grad_accum is None:
    args.grad_accum = 1 if args.tiny or jax.default_backend() != "cpu" else args.batch
  if args.worker:
    figures = worker(
      args.worker, args.tiny, args.batch, args.seq, args.rank, args.grad_accum, args.layers
    )
    print(json.dumps(figures))
    return
  load = os.getloadavg()
  runs = run_both(args.tiny, args.batch, args.seq, args.rank, args.grad_accum, args.layers)
  size = "tiny" if args.tiny else "0.5B-shaped"
  size += f", {args.layers} layers" if args.layers else ""
  print(
    f"llama {size}, batch {args.batch} x {args.seq} in {args.grad_accum} micro-batches, "
    f"LoRA r={args.rank} on q/k/v/o/gate/up/down"
  )
  print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  for name, r in runs.items():
    xla = f"{r['xla_step_bytes'] / GIB:.3f}" if r["xla_step_bytes"] is not None else "-"
    dev = f"{r['device_peak'] / GIB:.3f}" if r["device_peak"] else "-"
    step = f"{r['step_peak_rss'] / GIB:.3f}" if r["step_peak_rss"] else "-"
    print(
      f"{name}: params {r['params']:,} (trainable {r['trainable']:,}), stored "
      f"{r['stored_param_bytes'] / GIB:.3f} GiB; peak RSS {r['peak_rss'] / GIB:.3f} GiB, in "
      f"the step {step} GiB (after imports {r['rss_after_imports'] / GIB:.3f}); XLA step "
      f"{xla} GiB; device peak "
      f"{dev} GiB; loss {r['loss']:.4f} [{r['backend']}]"
    )
  if all(r["xla_step_bytes"] for r in runs.values()):
    xla_ratio = runs["nf4"]["xla_step_bytes"] / runs["bf16"]["xla_step_bytes"]
    print(f"nf4_over_bf16_xla_step={xla_ratio:.3f}")
  print(f"nf4_over_bf16_peak={ratio(runs):.3f}")


if __name__ == "__main__":
  main()
