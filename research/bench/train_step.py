"""Benchmark: train-step throughput of our jitted classifier vs transformers' PyTorch BERT.

  python -m research.bench.train_step [--batch=32 --seq=128 --rounds=5 --steps=2]
  python -m research.bench.train_step --peer=flax4       # the transformers-4.57 Flax peer
  python -m research.bench.train_step --size=bert-base --dtype=bfloat16 --peer=none  # on a GPU

Ours is exactly what the trainer runs: the TaskModel of ``configs/sst2_minilm.py`` (MiniLM-L6,
fresh 2-label head), its optax chain (AdamW, clipping, weight-decay mask, freeze labels) and the
step that :func:`research.train.parallel.compile_train_step` compiles, with the state donated.
The peer is ``transformers.BertForSequenceClassification`` with ``torch.optim.AdamW`` and the
same clipping on the same batch, in train mode (dropout on) like ours. Rounds alternate ours and
the peer in one process (load from other jobs hits both alike); medians are reported. Model
FLOPs per step (matmuls, 6 x params x tokens plus attention) give MFU against the device's
peak from :data:`PEAK_TFLOPS` (CPU: ``--peak_tflops`` or none). The last line is
``speedup_vs_pytorch=<peer median / ours median>`` (``speedup_vs_flax4=`` with that peer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from research.bench import timing
from research.subprocess_env import child_env

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# Dense peak TFLOP/s per chip: (bf16, fp32 without TF32). Sources: vendor data sheets (SXM parts).
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
  "A100": (312.0, 19.5),
  "H100": (989.0, 67.0),
  "H200": (989.0, 67.0),
  "TPU v4": (275.0, 275.0 / 8),
  "TPU v5 lite": (197.0, 197.0 / 8),  # v5e
  "TPU v5e": (197.0, 197.0 / 8),
  "TPU v5p": (459.0, 459.0 / 8),
  "TPU v5": (459.0, 459.0 / 8),  # v5p reports itself as 'TPU v5'
}
SIZES = {  # EncoderConfig overrides on top of the MiniLM checkpoint's config.
  "minilm": {},
  "bert-base": dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072),
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The table's peak for a ``jax.Device.device_kind`` (longest matching name), or None."""
  names = [n for n in PEAK_TFLOPS if n.lower() in device_kind.lower()]
  if not names:
    return None
  bf16, fp32 = PEAK_TFLOPS[max(names, key=len)]
  return bf16 if dtype in ("bfloat16", "float16") else fp32


def model_flops(layers: int, hidden: int, intermediate: int, batch: int, seq: int) -> float:
  """Training FLOPs of one step (forward + backward = 3 x forward), matmuls only.

  Per token and layer the forward does ``2 * (4 D^2 + 2 D F)`` for the projections and FFN and
  ``4 T D`` for the two attention matmuls; embeddings (lookups) and the tiny head are left out,
  as in the usual MFU convention.
  """
  per_token = layers * (2 * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * seq * hidden)
  return 3.0 * per_token * batch * seq


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A fixed random batch with no padding (both sides compute on every position anyway): the
  Flax peer's batch (it cannot import this package, so the draws live there) + example_mask."""
  from research.bench import flax4_peer

  return {
    **flax4_peer.make_batch(batch, seq, vocab, seed),
    "example_mask": np.ones((batch,), np.float32),
  }


class Ours:
  """The trainer's step on the trainer's state, compiled by ``parallel.compile_train_step``."""

  name = "ours (JAX)"

  def __init__(self, args: argparse.Namespace):
    from configs import sst2_minilm
    from research.train import parallel, setup
    from research.train.state import build_model, init_fn
    from research.train.steps import make_train_step

    config = sst2_minilm.get_config()
    config.model.checkpoint = args.model
    config.model.dtype = args.dtype
    config.model.remat = args.remat
    config.model.encoder_overrides = dict(SIZES[args.size])
    config.parallel.mode = args.mode
    model, self.enc = build_model(config, {"sst2": 2})
    mesh = parallel.make_mesh(config.parallel)
    plan = setup.plan_state(config, init_fn(model), mesh, 1000)
    shardings = plan.shardings
    self.state = jax.jit(plan.create, out_shardings=shardings)(plan.rng)
    self.batch_sharding = parallel.batch_sharding(mesh)
    self.step = parallel.compile_train_step(
      lambda axis: make_train_step(model, "sst2", "classification", 1, axis),
      args.mode,
      mesh,
      shardings,
      self.batch_sharding,
    )
    self.host_batch = make_batch(args.batch, args.seq, self.enc.vocab_size)
    self.batch = parallel.global_batch(self.host_batch, self.batch_sharding)

  def stepper(self, batch: dict[str, jax.Array]) -> Callable[[], dict[str, jax.Array]]:
    """One train step on ``batch`` per call, the way the trainer runs them (no host sync)."""

    def step() -> dict[str, jax.Array]:
      self.state, metrics = self.step(self.state, batch)
      return metrics

    return step

  def compile(self) -> float:
    return timing.per_call(self.stepper(self.batch), 1)

  def run(self, n: int) -> float:
    """Seconds per step over ``n`` steps."""
    return timing.per_call(self.stepper(self.batch), n)

  def time_shape(self, seq: int, n: int) -> float:
    """Seconds per step at another sequence length (compiles that shape first)."""
    from research.train import parallel

    batch = make_batch(len(self.host_batch["labels"]), seq, self.enc.vocab_size)
    step = self.stepper(parallel.global_batch(batch, self.batch_sharding))
    timing.per_call(step, 1)
    return timing.per_call(step, n)

  def loss(self) -> float:
    """Runs one more step and returns its loss (a host sync: not for timing)."""
    return float(self.stepper(self.batch)()["loss"])


class PyTorch:
  """``BertForSequenceClassification`` + ``torch.optim.AdamW`` + clipping, in train mode."""

  name = "PyTorch (transformers)"

  def __init__(self, args: argparse.Namespace, ours: Ours):
    import torch
    import transformers

    from research.transfer import hf

    self.torch = torch
    torch.manual_seed(0)
    directory = hf.resolve(args.model)
    overrides = SIZES[args.size]
    names = dict(num_layers="num_hidden_layers", num_heads="num_attention_heads")
    config = transformers.BertConfig.from_pretrained(str(directory), num_labels=2)
    for key, value in overrides.items():
      setattr(config, names.get(key, key), value)
    if overrides:
      model = transformers.BertForSequenceClassification(config)
    else:
      model = transformers.BertForSequenceClassification.from_pretrained(
        str(directory), config=config
      )
    self.model = model.train()
    self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    b = ours.host_batch
    self.inputs = {k: torch.from_numpy(b[k]).long() for k in MODEL_KEYS}
    self.labels = torch.from_numpy(b["labels"]).long()
    self.threads = torch.get_num_threads()

  def compile(self) -> float:
    return self.run(1)

  def step(self) -> Any:
    """One eager step; returns the loss tensor."""
    self.opt.zero_grad(set_to_none=True)
    loss = self.model(**self.inputs, labels=self.labels).loss
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    return loss

  def run(self, n: int) -> float:
    return timing.per_call(self.step, n)


MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class Flax4:
  """transformers-4.57 ``FlaxBertForSequenceClassification`` in its own venv, as a worker.

  transformers 5 dropped Flax, so the peer runs in ``.venv-flax4`` (``make venv-flax4``): a
  subprocess that times ``n`` steps on request, so rounds still alternate with ours.
  """

  name = "Flax BERT (transformers 4.57)"

  def __init__(self, args: argparse.Namespace, ours: Ours):
    python = Path(args.flax4_python)
    if not python.exists():
      raise SystemExit(f"--peer=flax4: {python} not found; create it with `make venv-flax4`")
    from research.transfer import hf

    worker = Path(__file__).with_name("flax4_peer.py")
    spec = dict(
      model=str(hf.resolve(args.model)),
      overrides=SIZES[args.size],
      batch=args.batch,
      seq=args.seq,
      dtype=args.dtype,
    )
    self.proc = subprocess.Popen(
      [str(python), str(worker), json.dumps(spec)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env=child_env(),
    )

  def _ask(self, n: int) -> float:
    self.proc.stdin.write(f"{n}\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError("the flax4 worker died; run it by hand to see why")
    return float(line)

  def compile(self) -> float:
    return self._ask(1)

  def run(self, n: int) -> float:
    return self._ask(n)

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def epoch_figure(args: argparse.Namespace, ours: Ours) -> None:
  """One SST-2 training epoch: our bucketed batches vs padding every batch to ``--seq``.

  The epoch's batch shapes come from the real input pipeline (one pass, ``num_epochs=1``);
  each shape's step time is measured once, so the epoch time is ``sum(count x step time)``.
  """
  import collections

  import transformers

  from research.data import build_iterator, default_data_config
  from research.transfer import hf

  tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf.resolve(args.model)))
  cfg = default_data_config("sst2", max_length=args.seq)
  cfg.buckets = (*[b for b in cfg.buckets if b < args.seq], args.seq)
  it = build_iterator(cfg, tokenizer, "train", batch_size=args.batch, train=True, num_epochs=1)
  counts = collections.Counter(int(b["input_ids"].shape[1]) for b in it)
  step_s = {t: ours.time_shape(t, args.steps) for t in sorted({*counts, args.seq})}
  n = sum(counts.values())
  bucketed = sum(c * step_s[t] for t, c in counts.items())
  padded = n * step_s[args.seq]
  print(f"SST-2 train epoch, {n} batches of {args.batch}:")
  print(f"{'bucket':>8} {'batches':>8} {'s/step':>8}")
  for t in sorted(counts):
    print(f"{t:8d} {counts[t]:8d} {step_s[t]:8.3f}")
  print(
    f"epoch: bucketed {bucketed / 60:.1f} min, padded to {args.seq} {padded / 60:.1f} min "
    f"({padded / bucketed:.1f}x)"
  )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians over them)")
  p.add_argument("--steps", type=int, default=2, help="steps per round and side")
  p.add_argument("--peer", choices=("pytorch", "flax4", "none"), default="pytorch")
  p.add_argument("--size", choices=sorted(SIZES), default="minilm")
  p.add_argument("--dtype", default="float32", help="compute dtype of ours (float32, bfloat16)")
  p.add_argument("--remat", action="store_true")
  p.add_argument("--mode", default="jit", help="parallel.mode of ours")
  p.add_argument("--model", default=MINILM, help="HF checkpoint (dir or hub id)")
  p.add_argument("--peak_tflops", type=float, default=None, help="override the peak table")
  p.add_argument("--flax4_python", default=".venv-flax4/bin/python")
  p.add_argument("--epoch", action="store_true", help="also time an SST-2 epoch (bucketed)")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  load_before = timing.load()
  ours = Ours(args)
  peer = None
  if args.peer == "pytorch":
    peer = PyTorch(args, ours)
  elif args.peer == "flax4":
    peer = Flax4(args, ours)
  first = {"ours": ours.compile()}
  if peer is not None:
    first["peer"] = peer.compile()
  sides = {"ours": lambda: ours.run(args.steps)}
  if peer is not None:
    sides["peer"] = lambda: peer.run(args.steps)
  times = timing.alternate(sides, args.rounds)
  machine = timing.machine_line(load_before)
  if isinstance(peer, Flax4):
    peer.close()
  if args.epoch:
    epoch_figure(args, ours)

  enc = ours.enc
  flops = model_flops(enc.num_layers, enc.hidden_size, enc.intermediate_size, args.batch, args.seq)
  peak = args.peak_tflops or peak_tflops(jax.devices()[0].device_kind, args.dtype)
  print(machine)
  print(
    f"model: {args.size} ({enc.num_layers}x{enc.hidden_size}, heads {enc.num_heads}), batch "
    f"{args.batch}x{args.seq}, dtype {args.dtype}, {args.rounds} rounds x {args.steps} steps, "
    f"model FLOPs/step {flops / 1e9:.1f} G"
  )
  header = f"{'':30} {'median s/step':>13} {'min':>7} {'examples/s':>10} {'TFLOP/s':>8} {'MFU':>7}"
  print(header)
  names = {"ours": ours.name, "peer": peer.name if peer is not None else ""}
  for side, ts in times.items():
    name, med = names[side], statistics.median(ts)
    mfu = f"{100 * flops / med / (peak * 1e12):6.1f}%" if peak else "    n/a"
    print(
      f"{name:30} {med:13.3f} {min(ts):7.3f} {args.batch / med:10.1f} "
      f"{flops / med / 1e12:8.3f} {mfu}"
    )
  peer_first = f", peer {first['peer']:.1f} s" if peer is not None else ""
  print(f"first step (compile + run): ours {first['ours']:.1f} s{peer_first}")
  print("per-round s/step: ours " + " ".join(f"{t:.3f}" for t in times["ours"]))
  if peer is None:
    print(f"examples_per_sec={args.batch / statistics.median(times['ours']):.1f}")
  else:
    print("per-round s/step: peer " + " ".join(f"{t:.3f}" for t in times["peer"]))
    key = "speedup_vs_pytorch" if args.peer == "pytorch" else "speedup_vs_flax4"
    print(f"{key}={timing.ratio(times, 'peer', 'ours'):.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
