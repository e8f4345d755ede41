"""Benchmark: one MAML meta-step on MiniLM, ours (JAX) vs the same step in PyTorch ``torch.func``.

  python -m research.bench.maml [--episodes=4 --shot=5 --inner_steps=5 --seq=32 --rounds=5]
  python -m research.bench.maml --peer=none          # ours only
  python -m research.bench.maml --variants=second,remat,hvp,first --episode_loop=scan
  python -m research.bench.maml --inner=lora         # the LoRA inner loop, on both sides

The step: 4 episodes of 5-way 5-shot (5 query examples per class), 5 inner SGD steps on every
parameter of all-MiniLM-L6-v2 plus a zero-initialised 5-way head on mean-pooled tokens, the
query loss differentiated through the inner loop (second order), then Adam on the meta-gradient.
Ours is what the meta trainer runs: :func:`research.meta.steps.make_meta_step` compiled by
:func:`research.train.parallel.compile_train_step`, state donated; timed second order, second
order with ``jax.checkpoint`` per inner step (remat), second order by forward-over-reverse
Hessian-vector products (``hvp``: ``meta.hvp='forward'``), and first order. The peer is
transformers' ``BertModel`` (eager attention: its SDPA kernels have no double backward) run through
``torch.func.functional_call`` and ``torch.func.grad`` of ``torch.func.grad``, one episode after
the other, then ``torch.optim.Adam``. Both sides see the same batch, and their meta-losses are
printed side by side as a correctness check. Rounds alternate ours and the peer in one process;
medians are reported. Memory: XLA's compiled-program figures (arguments + outputs + temporaries)
per variant, and on CUDA the peer's ``max_memory_allocated``. The last line is
``speedup_vs_torch_func=<peer median / ours median>`` for our fastest second-order variant.

``--inner=lora`` times the meta trainer's LoRA inner loop instead
(``configs/intent_fewshot_maml.py:inner=lora``, as research.bench.maml_memory builds it): rank-8
LoRA on every layer's query and value projections, the inner loop adapts the LoRA matrices and
the head, the outer Adam meta-learns the same set, and the base weights are frozen (their
meta-gradient is not computed). The peer wraps transformers' query/value ``nn.Linear`` layers in
a minimal LoRA module (:func:`lora_linear`: ``x W^T + b + (x A) B alpha/r``, our layout) whose A
and B are copied from our initial state (A drawn from the config's seed, B zero), and runs the
same inner SGD over LoRA + head, second order, with Adam on LoRA + head; base weights enter
``torch.func`` as constants. So the first meta-losses agree, and the speedup compares the same
computation.

``--init=random`` starts both sides from one random MiniLM-shaped checkpoint (saved by
transformers to a temporary directory, then loaded by each side as usual); ``--model`` needs only
the checkpoint's config.json then. Timings do not depend on the weights' values: this is for
machines without the 87 MB pretrained weights (the GPU machine, research/bench/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from research import paths
from research.bench import timing

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def make_batch(args: argparse.Namespace, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """``episodes`` random episodes (no padding), labels 0..n-1 in blocks, as the sampler makes."""
  rng = np.random.default_rng(seed)
  e, n = args.episodes, args.way
  batch = {}
  for prefix, per_class in (("support_", args.shot), ("query_", args.query)):
    m = n * per_class
    batch[f"{prefix}input_ids"] = rng.integers(1000, min(vocab, 20000), (e, m, args.seq), np.int32)
    batch[f"{prefix}attention_mask"] = np.ones((e, m, args.seq), np.int32)
    batch[f"{prefix}token_type_ids"] = np.zeros((e, m, args.seq), np.int32)
    batch[f"{prefix}labels"] = np.tile(np.repeat(np.arange(n, dtype=np.int32), per_class), (e, 1))
  batch["classes"] = np.tile(np.arange(n, dtype=np.int32), (e, 1))
  return batch


class Ours:
  """The meta trainer's step on the meta trainer's state, for one meta-learning variant."""

  def __init__(
    self, args: argparse.Namespace, *, first_order: bool, remat: bool, hvp: str = "reverse"
  ):
    from configs import intent_fewshot_maml
    from research import optim
    from research.meta.algorithms import MetaLearner, settings_from_config
    from research.meta.steps import make_meta_step
    from research.train import parallel, setup
    from research.train.state import build_model, init_fn
    from research.transfer import graft, hf

    self.name = "ours " + ("first order" if first_order else "second order")
    self.name += " + remat" if remat else ""
    self.name += ", forward HVP" if hvp == "forward" else ""
    variant = f"algorithm={'fomaml' if first_order else 'maml'}"
    # The config's own LoRA inner loop (model.peft, meta.inner and the optimizer's LoRA rules).
    variant += ",inner=lora" if args.inner == "lora" else ""
    config = intent_fewshot_maml.get_config(variant)
    config.model.checkpoint = args.model
    config.model.dtype = args.dtype
    config.meta.update(
      k_shot=args.shot,
      q_query=args.query,
      n_way=args.way,
      inner_steps=args.inner_steps,
      remat_inner=remat,
      episode_loop=args.episode_loop,
      hvp=hvp,
      head_init="zeros",
      inner_lr=args.inner_lr,
    )
    task = next(iter(config.tasks))
    model, self.enc = build_model(config, {task: args.way})
    mesh = parallel.make_mesh(config.parallel)
    plan = setup.plan_state(config, init_fn(model), mesh, 1000)
    # What the outer optimizer freezes gets no meta-gradient, as in the meta trainer (the base
    # weights under a LoRA inner loop; nothing for the full one).
    labels = paths.flatten(optim.freeze_labels(plan.optim, plan.abstract_params))
    self.frozen = frozenset(p for p, label in labels.items() if label == optim.FROZEN)
    learner = MetaLearner(model, task, settings_from_config(config.meta), frozen=self.frozen)
    shardings = plan.shardings
    state = jax.jit(plan.create, out_shardings=shardings)(plan.rng)
    _, pretrained = hf.load_pretrained(args.model)
    params, _ = graft.graft(state.params, pretrained)
    self.state = state.replace(params=params, opt_state=jax.jit(plan.tx.init)(params))
    bsharding = parallel.batch_sharding(mesh)
    self.host_batch = make_batch(args, self.enc.vocab_size)
    self.batch = parallel.global_batch(self.host_batch, bsharding)
    step = parallel.compile_train_step(
      lambda axis: make_meta_step(learner, axis), "jit", mesh, shardings, bsharding
    )
    start = time.perf_counter()
    self.step = step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    mem = self.step.memory_analysis()
    self.memory_bytes = None
    if mem is not None:
      self.memory_bytes = sum(
        int(getattr(mem, f, 0) or 0)
        for f in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
      )
    # Host copies of the first params (the state's are donated by the first step): the peer
    # starts from them.
    self.params = jax.tree.map(np.array, params)

  @property
  def meta_learned(self) -> int:
    """How many parameters the outer optimizer moves (the peer must move as many).

    Without the encoder's pooler: the head pools by mean, so the pooler gets a zero
    meta-gradient (Adam leaves it) and the peer's BertModel is built without one.
    """
    flat = paths.flatten(self.params)
    used = lambda k: k not in self.frozen and not k.startswith("encoder/pooler/")
    return sum(int(v.size) for k, v in flat.items() if used(k))

  def run(self, n: int) -> float:
    def step() -> dict[str, jax.Array]:
      self.state, self.metrics = self.step(self.state, self.batch)
      return self.metrics

    return timing.per_call(step, n)

  @property
  def last_loss(self) -> float:
    """The meta-loss of the last step run (a host sync: read it after the timing)."""
    return float(self.metrics["loss"])


# Our LoRA leaves; the peer wraps the same projections of BertModel (attention.self.<name>).
LORA_PATH = re.compile(r"encoder/layer_(\d+)/attention/(query|value)/(lora_a|lora_b)")


def lora_linear(torch: Any) -> type:
  """:class:`LoraLinear` on ``torch`` (imported lazily, as everywhere in this module)."""

  class LoraLinear(torch.nn.Module):
    """``base(x) + (x A) B * scale``: an ``nn.Linear`` plus LoRA, in our layout (A [in, r],
    B [r, out]) and arithmetic, so our values load as they are; minimal, so the peer pays for no
    adapter bookkeeping (peft's) that ours does not have."""

    def __init__(self, base: Any, a: np.ndarray, b: np.ndarray, scale: float):
      super().__init__()
      self.base, self.scale = base, scale
      device = base.weight.device
      self.lora_a = torch.nn.Parameter(torch.from_numpy(np.array(a)).to(device))
      self.lora_b = torch.nn.Parameter(torch.from_numpy(np.array(b)).to(device))

    def forward(self, x: Any) -> Any:
      return self.base(x) + (x @ self.lora_a) @ self.lora_b * self.scale

  return LoraLinear


class TorchFunc:
  """The same second-order meta-step with ``torch.func`` on transformers' ``BertModel``.

  ``self.params`` are what adapts in the inner loop and what Adam meta-learns (one set, as in
  ours: every parameter, or LoRA + head); ``self.fixed`` the rest (the frozen base under LoRA),
  passed to ``functional_call`` as constants so no gradient is formed for them.
  """

  def __init__(
    self, args: argparse.Namespace, host_batch: dict[str, np.ndarray], ours: Ours | None = None
  ):
    """``ours``: with ``--inner=lora``, the side whose initial LoRA values the peer copies."""
    import torch
    import transformers

    from research.transfer import hf

    self.torch, self.args = torch, args
    self.name = "torch.func (transformers" + (" + LoRA)" if args.inner == "lora" else ")")
    torch.manual_seed(0)
    self.device = "cuda" if torch.cuda.is_available() and args.torch_device != "cpu" else "cpu"
    model = transformers.BertModel.from_pretrained(
      str(hf.resolve(args.model)), add_pooling_layer=False, attn_implementation="eager"
    )
    self.fixed: dict[str, Any] = {}
    if args.inner == "lora":
      if ours is None:
        raise ValueError("--inner=lora: the peer copies our initial LoRA values; give `ours`")
      self.add_lora(model, ours)
    self.model = model.to(self.device).eval()  # eval: no dropout, like ours (dropout 0).
    hidden = model.config.hidden_size
    self.params = {f"encoder.{k}": v for k, v in self.model.named_parameters()}
    if args.inner == "lora":  # The base weights: constants of the whole step.
      lora = lambda k: k.endswith((".lora_a", ".lora_b"))
      self.fixed = {k: v.detach() for k, v in self.params.items() if not lora(k)}
      self.params = {k: v for k, v in self.params.items() if lora(k)}
    self.params["head.weight"] = torch.zeros(args.way, hidden, device=self.device)
    self.params["head.bias"] = torch.zeros(args.way, device=self.device)
    for p in self.params.values():
      p.requires_grad_(True)
    self.opt = torch.optim.Adam(self.params.values(), lr=2e-5)
    to = lambda x: torch.from_numpy(x).long().to(self.device)
    self.episodes = [{k: to(v[e]) for k, v in host_batch.items()} for e in range(args.episodes)]
    self.memory_bytes = None

  @property
  def meta_learned(self) -> int:
    """How many parameters Adam moves."""
    return sum(int(p.numel()) for p in self.params.values())

  def add_lora(self, model: Any, ours: Ours) -> None:
    """Wraps each layer's query and value projection of ``model`` in a LoRA layer holding our
    initial ``lora_a`` / ``lora_b`` (the same start on both sides; rank and alpha/r are ours).

    Raises:
      ValueError: if our LoRA leaves are not exactly query and value of every layer.
    """
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for path, value in paths.flatten(ours.params).items():
      if m := LORA_PATH.fullmatch(path):
        found.setdefault((int(m[1]), m[2]), {})[m[3]] = value
      elif "lora" in path:
        raise ValueError(f"--inner=lora: the peer has no LoRA at {path}")
    layers = model.encoder.layer
    wanted = {(i, n) for i in range(len(layers)) for n in ("query", "value")}
    if set(found) != wanted:
      raise ValueError(f"--inner=lora: our LoRA targets {sorted(found)}, the peer's {wanted}")
    wrap = lora_linear(self.torch)
    for (i, name), ab in found.items():
      attention = layers[i].attention.self
      base = getattr(attention, name)
      setattr(attention, name, wrap(base, ab["lora_a"], ab["lora_b"], ours.enc.peft.lora_scale))

  def logits(self, params: dict[str, Any], ep: dict[str, Any], prefix: str):
    torch = self.torch
    params = {**self.fixed, **params}
    enc = {k[len("encoder.") :]: v for k, v in params.items() if k.startswith("encoder.")}
    mask = ep[f"{prefix}attention_mask"]
    out = torch.func.functional_call(
      self.model,
      enc,
      (ep[f"{prefix}input_ids"],),
      {"attention_mask": mask, "token_type_ids": ep[f"{prefix}token_type_ids"]},
    ).last_hidden_state
    m = mask[..., None].to(out.dtype)
    pooled = (out * m).sum(1) / m.sum(1).clamp(min=1)
    return pooled @ params["head.weight"].T + params["head.bias"]

  def meta_loss(self, params: dict[str, Any], ep: dict[str, Any]):
    torch, lr = self.torch, self.args.inner_lr
    ce = torch.nn.functional.cross_entropy
    # The zero trick, as ours: every episode starts from a zero head.
    fast = {
      **params,
      "head.weight": params["head.weight"] * 0,
      "head.bias": params["head.bias"] * 0,
    }
    support = lambda p: ce(self.logits(p, ep, "support_"), ep["support_labels"])
    for _ in range(self.args.inner_steps):
      grads = torch.func.grad(support)(fast)
      fast = {k: fast[k] - lr * grads[k] for k in fast}
    return ce(self.logits(fast, ep, "query_"), ep["query_labels"])

  def step(self) -> Any:
    """One meta-step over the episodes, then Adam; returns the mean meta-loss tensor."""
    torch = self.torch
    detached = {k: v.detach() for k, v in self.params.items()}
    total, losses = None, []
    for ep in self.episodes:
      grads, loss = torch.func.grad_and_value(self.meta_loss)(detached, ep)
      losses.append(loss)
      total = grads if total is None else {k: total[k] + grads[k] for k in total}
    for k, p in self.params.items():
      p.grad = total[k] / len(self.episodes)
    self.opt.step()
    return sum(losses) / len(losses)

  def wait(self, loss: Any) -> None:
    """Reads the loss and, on CUDA, waits for the queued work (the optimizer step too)."""
    self.last_loss = float(loss)
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def run(self, n: int) -> float:
    torch = self.torch
    if self.device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    seconds = timing.per_call(self.step, n, wait=self.wait)
    if self.device == "cuda":
      self.memory_bytes = torch.cuda.max_memory_allocated()
    return seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--episodes", type=int, default=4)
  p.add_argument("--way", type=int, default=5)
  p.add_argument("--shot", type=int, default=5)
  p.add_argument("--query", type=int, default=5)
  p.add_argument("--inner_steps", type=int, default=5)
  p.add_argument("--inner_lr", type=float, default=0.01)
  p.add_argument("--seq", type=int, default=32)
  p.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians over them)")
  p.add_argument("--steps", type=int, default=1, help="meta-steps per round and side")
  p.add_argument("--episode_loop", choices=("vmap", "scan"), default="vmap")
  p.add_argument(
    "--inner",
    choices=("full", "lora"),
    default="full",
    help="inner loop: every parameter, "
    "or rank-8 LoRA on query/value + head (configs/intent_fewshot_maml.py:inner=lora)",
  )
  p.add_argument("--dtype", default="float32", help="compute dtype of ours")
  p.add_argument("--peer", choices=("torch_func", "none"), default="torch_func")
  p.add_argument("--torch_device", default="auto", help="'cpu' to keep the peer off the GPU")
  p.add_argument("--variants", default="second,remat,hvp,first", help="which of ours to time")
  p.add_argument("--model", default=MINILM, help="HF checkpoint (dir or hub id)")
  p.add_argument(
    "--init", choices=("pretrained", "random"), default="pretrained", help="see the docstring"
  )
  return p.parse_args(argv)


def random_checkpoint(model: str, directory: Path) -> Path:
  """A randomly initialised ``BertModel`` of ``model``'s config, saved as an HF checkpoint."""
  import torch
  import transformers

  from research.transfer import hf

  torch.manual_seed(0)
  config = transformers.BertConfig.from_pretrained(str(hf.resolve(model)))
  transformers.BertModel(config).save_pretrained(str(directory))
  return directory


def _mib(x: int | None) -> str:
  return f"{x / 2**20:9.0f}" if x else "      n/a"


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.init == "random":
    with tempfile.TemporaryDirectory() as tmp:
      args.model = str(random_checkpoint(args.model, Path(tmp)))
      args.init = "pretrained"
      return bench(args)
  return bench(args)


def bench(args: argparse.Namespace) -> int:
  load_before = timing.load()
  wanted = args.variants.split(",")
  spec = {
    "second": dict(first_order=False, remat=False),
    "remat": dict(first_order=False, remat=True),
    "hvp": dict(first_order=False, remat=False, hvp="forward"),
    "first": dict(first_order=True, remat=False),
  }
  unknown = [v for v in wanted if v not in spec]
  if unknown:
    raise SystemExit(f"--variants: unknown {unknown}; choose from {list(spec)}")
  ours = [Ours(args, **spec[v]) for v in wanted]
  peer = TorchFunc(args, ours[0].host_batch, ours[0]) if args.peer == "torch_func" else None
  if peer is not None and peer.meta_learned != ours[0].meta_learned:
    raise SystemExit(
      f"the peer meta-learns {peer.meta_learned} parameters, ours {ours[0].meta_learned}: "
      "not the same step"
    )
  sides = [*ours, *([peer] if peer is not None else [])]
  first, first_loss = {}, {}
  for s in sides:  # Warm-up: our first run, the peer's first step; the same start on each side.
    first[s.name] = s.run(1)
    first_loss[s.name] = s.last_loss
  times = timing.alternate({s.name: lambda s=s: s.run(args.steps) for s in sides}, args.rounds)
  print(timing.machine_line(load_before))
  print(
    f"meta-step: MiniLM-L6, {args.episodes} episodes of {args.way}-way {args.shot}-shot "
    f"(+{args.query} query/class), seq {args.seq}, {args.inner_steps} inner steps, "
    f"dtype {args.dtype}, {args.rounds} rounds x {args.steps} steps"
  )
  rank = ours[0].enc.peft.lora_rank if args.inner == "lora" else 0
  inner = f"LoRA rank {rank} on query/value + head" if rank else "every parameter"
  print(f"inner loop: {inner}; meta-learned parameters: {ours[0].meta_learned:,}")
  print(f"{'':34} {'median s/step':>13} {'min':>7} {'memory MiB':>10} {'compile s':>9} {'loss':>8}")
  for s in sides:
    ts = times[s.name]
    compile_s = f"{s.compile_s:9.1f}" if hasattr(s, "compile_s") else "      n/a"
    print(
      f"{s.name:34} {statistics.median(ts):13.3f} {min(ts):7.3f} {_mib(s.memory_bytes):>10} "
      f"{compile_s} {s.last_loss:8.4f}"
    )
  print("first run s: " + ", ".join(f"{k} {v:.2f}" for k, v in first.items()))
  print("first meta-loss (same start): " + ", ".join(f"{k} {v:.5f}" for k, v in first_loss.items()))
  if peer is None:
    print(f"meta_steps_per_sec={1 / statistics.median(times[ours[0].name]):.3f}")
    return 0
  second = [o for o in ours if "first order" not in o.name] or ours
  ref = min(second, key=lambda o: statistics.median(times[o.name]))
  print(f"speedup of {ref.name!r} over the peer")
  print(f"speedup_vs_torch_func={timing.ratio(times, peer.name, ref.name):.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
