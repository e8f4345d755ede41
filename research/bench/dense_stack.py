"""Benchmark: the encoder's matmuls alone, XLA vs PyTorch, in two activation layouts.

  python -m research.bench.dense_stack [--batch=32 --seq=128 --rounds=5]

Why it exists: issue 4's train-step comparison mixes matmul kernels with everything else in a
step. This one isolates the kernels. A stack of ``layers`` blocks with exactly MiniLM's dense
shapes (fused QKV ``D -> 3D``, output ``D -> D``, FFN ``D -> F -> D``), a trivial mixing of
the QKV thirds in place of attention, residuals and GELU, forward + backward to all inputs,
timed as

- ``xla token-major``: activations ``[tokens, D]`` (what the encoder does); the weight
  gradients ``X^T dY`` contract both operands' major dimension,
- ``xla feature-major``: activations ``[D, tokens]``, weights used transposed; there the
  weight-side products take the transposed operand instead,
- ``torch``: the same stack in PyTorch eager (MKL sgemm), ``backward()``.

Rounds alternate the three in one process; medians and GFLOP/s (matmul FLOPs only) are
printed; the last line is ``torch_over_xla=<torch GFLOP/s / best XLA GFLOP/s>``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from research.bench import timing

Weights = list[list[jax.Array]]


def block_shapes(hidden: int, intermediate: int) -> list[tuple[int, int]]:
  """``[in, out]`` kernels of one block, as stored in an HF checkpoint (QKV fused)."""
  return [(hidden, 3 * hidden), (hidden, hidden), (hidden, intermediate), (intermediate, hidden)]


def stack_flops(layers: int, hidden: int, intermediate: int, tokens: int) -> float:
  """Matmul FLOPs of forward + backward (3 x forward) over the whole stack."""
  per_token = sum(2 * a * b for a, b in block_shapes(hidden, intermediate))
  return 3.0 * layers * per_token * tokens


def token_major(weights: Weights, x: jax.Array) -> jax.Array:
  """The stack on ``x: [tokens, D]``, the encoder's layout; a scalar to differentiate."""
  d = x.shape[1]
  for qkv, out, up, down in weights:
    h = x @ qkv
    x = x + (h[:, :d] + h[:, d : 2 * d] * h[:, 2 * d :]) @ out
    x = x + jax.nn.gelu(x @ up, approximate=False) @ down
  return jnp.sum(x * x)


def feature_major(weights: Weights, xt: jax.Array) -> jax.Array:
  """The same stack on ``xt: [D, tokens]``: equal to ``token_major(weights, xt.T)``."""
  d = xt.shape[0]
  for qkv, out, up, down in weights:
    h = qkv.T @ xt
    xt = xt + out.T @ (h[:d] + h[d : 2 * d] * h[2 * d :])
    xt = xt + down.T @ jax.nn.gelu(up.T @ xt, approximate=False)
  return jnp.sum(xt * xt)


def xla_runner(loss: Callable, weights: Weights, x: jax.Array) -> Callable[[], None]:
  """A compiled, warmed-up gradient call to time (blocks until done)."""
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(grad(weights, x))
  return lambda: jax.block_until_ready(grad(weights, x))


def torch_loss(weights: list, x):
  """:func:`token_major` in PyTorch eager."""
  import torch

  d = x.shape[1]
  for qkv, out, up, down in weights:
    h = x @ qkv
    x = x + (h[:, :d] + h[:, d : 2 * d] * h[:, 2 * d :]) @ out
    x = x + torch.nn.functional.gelu(x @ up) @ down
  return (x * x).sum()


def torch_runner(weights: Weights, x: jax.Array) -> Callable[[], None]:
  import torch

  leaves = [[torch.tensor(np.asarray(w), requires_grad=True) for w in block] for block in weights]
  tx = torch.tensor(np.asarray(x), requires_grad=True)
  params = [w for block in leaves for w in block] + [tx]

  def step() -> None:
    for w in params:
      w.grad = None
    torch_loss(leaves, tx).backward()

  step()
  return step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--hidden", type=int, default=384)
  p.add_argument("--intermediate", type=int, default=1536)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=2, help="timed calls per round and side")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  tokens = args.batch * args.seq
  key = jax.random.PRNGKey(0)
  shapes = block_shapes(args.hidden, args.intermediate)
  weights = [
    [0.02 * jax.random.normal(jax.random.fold_in(key, 10 * i + j), s) for j, s in enumerate(shapes)]
    for i in range(args.layers)
  ]
  x = jax.random.normal(key, (tokens, args.hidden))
  runners = {
    "xla token-major": xla_runner(token_major, weights, x),
    "xla feature-major": xla_runner(feature_major, weights, x.T),
    "torch": torch_runner(weights, x),
  }
  load_before = timing.load()
  sides = {name: lambda run=run: timing.per_call(run, args.steps) for name, run in runners.items()}
  times = timing.alternate(sides, args.rounds)
  flops = stack_flops(args.layers, args.hidden, args.intermediate, tokens)
  print(
    f"{args.layers} blocks, {tokens} tokens, D={args.hidden}, F={args.intermediate}: "
    f"{flops / 1e9:.0f} GFLOP per forward+backward"
  )
  print(f"{'':20} {'median s':>9} {'GFLOP/s':>8}")
  rate = {}
  for name, med in timing.medians(times).items():
    rate[name] = flops / med / 1e9
    print(f"{name:20} {med:9.3f} {rate[name]:8.1f}")
  print(timing.load_line(load_before))
  best_xla = max(v for k, v in rate.items() if k.startswith("xla"))
  print(f"torch_over_xla={rate['torch'] / best_xla:.3g}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
