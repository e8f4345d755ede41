"""Benchmark: model FLOP utilisation of the trainer's step, per attention kernel.

  python -m research.bench.mfu                                 # on a GPU: BERT-base, bf16
  python -m research.bench.mfu --size=tiny --batch=2 --seq=16 --rounds=1 --steps=1   # any CPU

The step is the one research.bench.train_step times (the TaskModel of configs/sst2_minilm.py on
a BERT-base-sized encoder from random weights, its optax chain, the step
``parallel.compile_train_step`` compiles, state donated), built once per attention kernel
(``--attention=auto,xla``: research.models.common.attention's choice, cuDNN on a GPU in bf16,
against XLA's) and timed in alternating rounds. MFU is the model FLOPs of a step
(``train_step.model_flops``: 6 x matmul params x tokens plus the attention matmuls) over the
median step time, over the chip's dense peak (``train_step.PEAK_TFLOPS``: H100/H200 bf16
989 TFLOP/s). Attention dropout is 0 by default (``--attention_dropout``):
``jax.nn.dot_product_attention`` takes no dropout, so with it every kernel falls back to the
written-out attention. The last line is ``mfu_pct=<the first kernel's MFU in percent>`` (``n/a``
when the peak is unknown: CPUs, unless ``--peak_tflops``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

import jax

from research.bench import timing, train_step
from research.models import common

SIZES = {
  **train_step.SIZES,
  "tiny": dict(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64),
}


class Step:
  """The trainer's step on fresh state, compiled with one attention kernel."""

  def __init__(self, args: argparse.Namespace, kernel: str):
    from configs import sst2_minilm
    from research.train import parallel, setup
    from research.train.state import build_model, init_fn
    from research.train.steps import make_train_step

    os.environ[common.ATTENTION_ENV] = kernel  # Read when the step is traced, below.
    config = sst2_minilm.get_config()
    config.model.checkpoint = args.model
    config.model.dtype = args.dtype
    config.model.remat = args.remat
    config.model.encoder_overrides = {
      **SIZES[args.size],
      "attention_dropout": args.attention_dropout,
    }
    model, self.enc = build_model(config, {"sst2": 2})
    mesh = parallel.make_mesh(config.parallel)
    plan = setup.plan_state(config, init_fn(model), mesh, 1000)
    self.state = jax.jit(plan.create, out_shardings=plan.shardings)(plan.rng)
    sharding = parallel.batch_sharding(mesh)
    self.step = parallel.compile_train_step(
      lambda axis: make_train_step(model, "sst2", "classification", 1, axis),
      config.parallel.mode,
      mesh,
      plan.shardings,
      sharding,
    )
    host = train_step.make_batch(args.batch, args.seq, self.enc.vocab_size)
    self.batch = parallel.global_batch(host, sharding)
    self.first_s = timing.per_call(self._one, 1)  # Compiles (tracing reads the kernel).
    del os.environ[common.ATTENTION_ENV]

  def _one(self) -> dict[str, jax.Array]:
    self.state, metrics = self.step(self.state, self.batch)
    return metrics

  def timer(self, steps: int) -> Callable[[], float]:
    return lambda: timing.per_call(self._one, steps)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--size", choices=sorted(SIZES), default="bert-base")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype (bfloat16, float32)")
  p.add_argument("--attention", default="auto,xla", help="kernels to compare, comma-separated")
  p.add_argument("--attention_dropout", type=float, default=0.0)
  p.add_argument("--remat", action="store_true")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=10, help="steps per round and kernel")
  p.add_argument("--model", default=train_step.MINILM, help="HF checkpoint whose config is used")
  p.add_argument("--peak_tflops", type=float, default=None, help="override the peak table")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  load_before = timing.load()
  kernels = [k.strip() for k in args.attention.split(",") if k.strip()]
  if os.environ.get(common.ATTENTION_ENV):
    print(f"note: ${common.ATTENTION_ENV} is ignored here (--attention chooses)")
  if jax.default_backend() != "gpu":
    kernels = [k for k in kernels if k != "cudnn"] or ["xla"]
  steps = {k: Step(args, k) for k in kernels}
  times = timing.alternate({k: s.timer(args.steps) for k, s in steps.items()}, args.rounds)
  enc = next(iter(steps.values())).enc
  flops = train_step.model_flops(
    enc.num_layers, enc.hidden_size, enc.intermediate_size, args.batch, args.seq
  )
  peak = args.peak_tflops or train_step.peak_tflops(jax.devices()[0].device_kind, args.dtype)
  print(timing.machine_line(load_before))
  print(
    f"model: {args.size} ({enc.num_layers}x{enc.hidden_size}, heads {enc.num_heads}), batch "
    f"{args.batch}x{args.seq}, {args.dtype}, attention dropout {args.attention_dropout}, "
    f"{args.rounds} rounds x {args.steps} steps, model FLOPs/step {flops / 1e9:.1f} G, "
    f"peak {peak or 'n/a'} TFLOP/s"
  )
  print(
    f"{'attention':10} {'median s/step':>13} {'min':>8} {'examples/s':>10} {'TFLOP/s':>8} "
    f"{'MFU':>7} {'first step s':>12}"
  )
  mfus = {}
  for kernel, ts in times.items():
    med = statistics.median(ts)
    mfus[kernel] = 100 * flops / med / (peak * 1e12) if peak else None
    shown = f"{mfus[kernel]:6.1f}%" if peak else "    n/a"
    print(
      f"{kernel:10} {med:13.4f} {min(ts):8.4f} {args.batch / med:10.1f} "
      f"{flops / med / 1e12:8.2f} {shown} {steps[kernel].first_s:12.1f}"
    )
  first = mfus[kernels[0]]
  print(f"mfu_pct={first:.3g}" if first is not None else "mfu_pct=n/a")
  return 0


if __name__ == "__main__":
  sys.exit(main())
