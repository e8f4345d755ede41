"""Benchmark: SST-2 training epoch, sequence packing (``data_cfg.packing``) vs length buckets.

  python -m research.bench.packing [--batch_size=32 --steps=3 --model=minilm|tiny]

Both sides are the real input pipeline (:func:`research.data.build_iterator` on SST-2 train, the
same ``batch_size``: examples per batch when bucketed, rows of up to ``packing_max_per_row``
examples when packed) and the same jitted train step (the TaskModel with a mean-pooled head,
:func:`research.train.steps.apply_model` and the classification loss, AdamW). Reported per
side: the planned padding fraction of epoch 0, batches per epoch, examples per batch, and the
epoch time, *estimated* as the sum over the epoch's batches of the median step time of its
shape (each distinct shape timed ``--steps`` times after its compile). Timing every batch of a
67k-example epoch would take an hour on a CPU; a step's time depends on its shape, not on the
token values, so the estimate is what a run of the epoch costs in steps (the pipeline is not
the bottleneck: ``research.bench.input_pipeline``). The last line is ``packed_speedup=<bucketed
epoch / packed epoch>``.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from transformers import AutoTokenizer

from research.bench import timing
from research.bench.input_pipeline import data_config, minilm_dir
from research.data import build_iterator
from research.models.config import EncoderConfig
from research.models.heads import HeadConfig
from research.models.task_model import init_params, make_task_model
from research.tasks import classification
from research.train.steps import apply_model
from research.transfer.hf import load_pretrained


def make_step(model_name: str) -> tuple[Any, Any]:
  """``(jitted step(state, batch) -> (state, loss), initial state)`` for MiniLM or a tiny BERT."""
  if model_name == "minilm":
    enc_cfg, pretrained = load_pretrained(minilm_dir())
  else:
    enc_cfg, pretrained = EncoderConfig.tiny(vocab_size=30522, max_position_embeddings=512), None
  model = make_task_model(enc_cfg, {"sst2": HeadConfig("sequence", 2, pooling="mean")})
  params = init_params(model, jax.random.key(0))
  if pretrained is not None:
    params = {**params, "encoder": pretrained["encoder"]}
  tx = optax.adamw(1e-4, weight_decay=0.01)

  def loss_fn(p, batch, rng):
    total, weight = classification.loss(apply_model(model, p, batch, "sst2", rng), batch)
    return total / jnp.maximum(weight, 1.0)

  @jax.jit
  def step(state, batch):
    p, opt, rng = state
    rng, sub = jax.random.split(rng)
    loss, grads = jax.value_and_grad(loss_fn)(p, batch, sub)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt, rng), loss

  return step, (params, tx.init(params), jax.random.key(1))


def epoch_estimate(it: Any, step: Any, state: Any, steps: int) -> dict[str, Any]:
  """Epoch 0 of ``it``: its batches' shapes, each timed, and the epoch time they add up to."""
  shapes: collections.Counter = collections.Counter()
  first: dict[tuple[int, ...], dict] = {}
  examples = []
  for batch in it:  # One epoch (num_epochs=1).
    shape = batch["input_ids"].shape
    shapes[shape] += 1
    first.setdefault(shape, batch)
    examples.append(float(batch["example_mask"].sum()))
  per_shape = {}
  for shape, batch in sorted(first.items()):
    device_batch = jax.device_put(batch)
    state, _ = jax.block_until_ready(step(state, device_batch))  # compile

    def one(b=device_batch):
      nonlocal state
      state, loss = step(state, b)
      return loss

    per_shape[shape] = statistics.median(timing.per_call(one, 1) for _ in range(steps))
  return {
    "padding": it.planned_padding_fraction(0),
    "batches": it.num_batches,
    "examples_per_batch": float(np.mean(examples)),
    "shapes": dict(shapes),
    "per_shape": per_shape,
    "epoch_s": sum(n * per_shape[s] for s, n in shapes.items()),
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per batch shape")
  parser.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
  parser.add_argument("--max_per_row", type=int, default=16)
  args = parser.parse_args(argv)
  before = timing.load()
  tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
  step, state = make_step(args.model)
  results = {}
  for name, packed in (("bucketed", False), ("packed", True)):
    cfg = data_config(128, single_bucket=False)
    cfg.update(packing=packed, packing_max_per_row=args.max_per_row)
    it = build_iterator(
      cfg, tokenizer, "train", batch_size=args.batch_size, train=True, num_epochs=1
    )
    results[name] = r = epoch_estimate(it, step, state, args.steps)
    print(
      f"{name:9s} padding={r['padding']:.3f} batches={r['batches']} "
      f"examples/batch={r['examples_per_batch']:.1f} shapes={len(r['shapes'])} "
      f"epoch_estimate_s={r['epoch_s']:.0f}"
    )
    for shape, n in sorted(r["shapes"].items()):
      print(f"  {shape}: {n} batches x {r['per_shape'][shape] * 1e3:.0f} ms")
  print(f"model={args.model} batch_size={args.batch_size} {timing.machine_line(before)}")
  print(f"packed_speedup={results['bucketed']['epoch_s'] / results['packed']['epoch_s']:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
