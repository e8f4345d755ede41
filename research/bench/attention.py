"""Benchmark: cuDNN's fused attention vs XLA's, through research.models.common.attention.

  python -m research.bench.attention                       # on a GPU: 8 x 512 tokens, bf16
  python -m research.bench.attention --batch=2 --seq=16 --heads=2 --rounds=1   # tiny, any CPU

One BERT-base-shaped attention (12 heads of 64) over a batch with key padding (rows padded to
different lengths, as a bucketed batch is), forward and backward (the gradient of a fixed
random projection of the output with respect to q, k and v), jitted once per kernel. Both sides
call the same function with ``implementation='cudnn'`` or ``'xla'``, so what differs is only the
kernel: their outputs and gradients are compared (max abs difference, in the compute dtype's
terms) and their times alternated over rounds (research.bench.timing). Without a GPU only XLA's
side runs. The last line is ``cudnn_speedup=<XLA median / cuDNN median>`` (``n/a`` without one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from research.bench import timing
from research.models.common import attention


def make_inputs(args: argparse.Namespace) -> tuple[jax.Array, ...]:
  """q, k, v [B, T, N, H], the key padding mask [B, 1, 1, T] and the output projection."""
  rng = np.random.default_rng(0)
  dtype = jnp.dtype(args.dtype)
  shape = (args.batch, args.seq, args.heads, args.head_dim)
  q, k, v, w = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(4))
  # Lengths from the full sequence down to a quarter of it (even lengths: cuDNN's bias path).
  lengths = np.linspace(args.seq, args.seq // 4, args.batch).astype(int) // 2 * 2
  mask = (np.arange(args.seq)[None, :] < np.maximum(lengths, 2)[:, None])[:, None, None, :]
  return q, k, v, jnp.asarray(mask), w


def make_step(implementation: str) -> Callable[..., tuple[jax.Array, tuple[jax.Array, ...]]]:
  """Jitted ``(q, k, v, mask, w) -> (output, (dq, dk, dv))`` with one kernel."""

  def loss(q, k, v, mask, w):
    out = attention(q, k, v, mask=mask, implementation=implementation)
    return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), out

  def step(q, k, v, mask, w):
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, mask, w)
    return out, grads

  return jax.jit(step)


def max_abs_diff(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> float:
  """The largest elementwise difference over matching arrays, in fp32. (Padded queries are
  compared too: the mask hides padded keys only, so their outputs are well defined.)"""
  return max(
    float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
    for x, y in zip(a, b, strict=True)
  )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=20, help="calls per round and side")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  load_before = timing.load()
  inputs = make_inputs(args)
  sides = {"xla": make_step("xla")}
  if jax.default_backend() == "gpu":
    sides["cudnn"] = make_step("cudnn")
  results, first = {}, {}
  for name, step in sides.items():
    first[name] = timing.per_call(lambda step=step: step(*inputs), 1)
    results[name] = step(*inputs)
  times = timing.alternate(
    {
      name: lambda step=step: timing.per_call(lambda: step(*inputs), args.steps)
      for name, step in sides.items()
    },
    args.rounds,
  )
  print(timing.machine_line(load_before))
  print(
    f"attention: batch {args.batch} x {args.seq} tokens, {args.heads} heads of {args.head_dim}, "
    f"{args.dtype}, key padding, forward + backward; {args.rounds} rounds x {args.steps} calls"
  )
  for name, ts in times.items():
    print(
      f"{name:6} median {1e3 * statistics.median(ts):9.3f} ms/call, min {1e3 * min(ts):9.3f}, "
      f"first call (compile) {first[name]:.1f} s"
    )
  if "cudnn" in results:
    (out_x, grads_x), (out_c, grads_c) = results["xla"], results["cudnn"]
    out_diff = max_abs_diff((out_x,), (out_c,))
    grad_diff = max_abs_diff(grads_x, grads_c)
    scale = float(jnp.max(jnp.abs(out_x.astype(jnp.float32))))
    print(
      f"max abs diff cuDNN vs XLA: output {out_diff:.3e} (max |output| {scale:.3f}), "
      f"grads {grad_diff:.3e}"
    )
    print(f"cudnn_speedup={timing.ratio(times, 'xla', 'cudnn'):.2f}")
  else:
    print(f"cuDNN: not run (backend {jax.default_backend()})")
    print("cudnn_speedup=n/a")
  return 0


if __name__ == "__main__":
  sys.exit(main())
