"""Benchmark: memory and time of a MAML meta-step, MiniLM and base size, full vs LoRA inner loop.

  python -m research.bench.maml_memory                       # the table in docs/benchmarks.md
  python -m research.bench.maml_memory --sizes=minilm --repeats=3
  python -m research.bench.maml_memory --tiny                # seconds: a 2-layer model (tests)

The step is the meta trainer's (:func:`research.meta.steps.make_meta_step` compiled by
:func:`research.train.parallel.compile_train_step`, state donated, outer Adam): 5-way 5-shot
episodes with 5 query examples per class, 32 tokens, 5 inner SGD steps, a zero head on
mean-pooled tokens. Each configuration runs in a fresh subprocess (so peak RSS is its own):

- size: ``minilm`` (all-MiniLM-L6-v2's shape, 22M) or ``base`` (BERT-base's shape: 12 layers,
  768 wide, 110M, the size of all-mpnet-base-v2); random weights, which do not change the cost.
- inner: ``full`` (every parameter adapts and is meta-learned) or ``lora`` (rank-8 LoRA on
  query/value plus the head adapt and are meta-learned; the base weights are frozen and get no
  meta-gradient: ``configs/intent_fewshot_maml.py:inner=lora``).
- order: ``second`` (reverse-over-reverse), ``hvp`` (second order by forward-over-reverse
  Hessian-vector products, ``meta.hvp='forward'``: one inner step's activations live at a time),
  ``first`` (FOMAML).

Columns: XLA's compiled footprint of the step (arguments + outputs + temporaries: what a device
would hold), the subprocess's peak RSS (the CPU run, the JAX runtime included), and the median
seconds per meta-step over ``--repeats`` steps after ``--warmup`` untimed ones. A configuration
whose compiled footprint is above ``--max_run_gb`` is compiled but not run (its RSS and time
are ``-``), so the benchmark cannot exhaust a shared machine's memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from research.bench import timing
from research.subprocess_env import child_env

SIZES = {
  "minilm": {},
  "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
  "tiny": dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
}
INNERS = ("full", "lora")
ORDERS = ("second", "hvp", "first")
GB = 1024**3


def child(args: argparse.Namespace) -> dict:
  """Builds, compiles and times one configuration in this process; returns its row."""
  import jax

  from configs import intent_fewshot_maml
  from research import optim, paths
  from research.bench.maml import make_batch
  from research.meta.algorithms import MetaLearner, settings_from_config
  from research.meta.steps import make_meta_step
  from research.train import parallel, setup
  from research.train.state import build_model, init_fn

  variant = "inner=lora" if args.inner == "lora" else ""
  config = intent_fewshot_maml.get_config(variant)
  config.model.init = "scratch"
  config.model.encoder_overrides = SIZES[args.size]
  config.meta.update(
    algorithm="fomaml" if args.order == "first" else "maml",
    n_way=args.way,
    k_shot=args.shot,
    q_query=args.query,
    inner_steps=args.inner_steps,
    hvp="forward" if args.order == "hvp" else "reverse",
    episode_loop="scan",
    head_init="zeros",
    episodes_per_batch=args.episodes,
  )
  task = next(iter(config.tasks))
  model, enc = build_model(config, {task: args.way})
  mesh = parallel.make_mesh(config.parallel, devices=jax.devices()[:1])
  plan = setup.plan_state(config, init_fn(model), mesh, 1000)
  labels = paths.flatten(optim.freeze_labels(plan.optim, plan.abstract_params))
  frozen = [p for p, label in labels.items() if label == optim.FROZEN]
  learner = MetaLearner(model, task, settings_from_config(config.meta), frozen=frozen)
  state = jax.jit(plan.create, out_shardings=plan.shardings)(plan.rng)
  bsharding = parallel.batch_sharding(mesh)
  batch = parallel.global_batch(make_batch(args, enc.vocab_size), bsharding)
  step = parallel.compile_train_step(
    lambda axis: make_meta_step(learner, axis), "jit", mesh, plan.shardings, bsharding
  )
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  compiled_bytes = sum(
    int(getattr(mem, f, 0) or 0)
    for f in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
  )
  flat = paths.flatten(state.params)
  row = dict(
    size=args.size,
    inner=args.inner,
    order=args.order,
    params=sum(int(x.size) for x in flat.values()),
    meta_learned=sum(int(x.size) for p, x in flat.items() if p not in set(frozen)),
    compiled_gb=compiled_bytes / GB,
    compile_s=compile_s,
    peak_rss_gb=None,
    s_per_step=None,
    loss=None,
  )
  if compiled_bytes / GB > args.max_run_gb:
    return row
  for _ in range(args.warmup):  # Untimed: first-run allocations.
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  row.update(
    s_per_step=statistics.median(times),
    loss=float(metrics["loss"]),
    peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
  )
  return row


def run_configuration(args: argparse.Namespace, size: str, inner: str, order: str) -> dict:
  """One configuration in a fresh subprocess (one CPU device); its row from the last line."""
  cmd = [sys.executable, "-m", "research.bench.maml_memory", "--child"]
  cmd += [f"--size={size}", f"--inner={inner}", f"--order={order}"]
  keys = ("way", "shot", "query", "seq", "inner_steps", "episodes", "repeats", "warmup")
  for key in (*keys, "max_run_gb"):
    cmd.append(f"--{key}={getattr(args, key)}")
  # One device, as a user runs it (child_env drops the tests' 8 fake devices).
  out = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
  if out.returncode != 0:
    return dict(size=size, inner=inner, order=order, error=out.stderr.strip()[-500:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
  lines = [
    "| size | inner loop | order | params | meta-learned | compiled GB | peak RSS GB | s/step |",
    "|---|---|---|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['size']} | {r['inner']} | {r['order']} | error: {r['error'][-80:]} |")
      continue
    lines.append(
      f"| {r['size']} | {r['inner']} | {r['order']} | {r['params'] / 1e6:.1f}M "
      f"| {r['meta_learned'] / 1e6:.3f}M | {r['compiled_gb']:.2f} "
      f"| {fmt(r['peak_rss_gb'], '.2f')} | {fmt(r['s_per_step'], '.2f')} |"
    )
  return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--sizes", default="minilm,base")
  p.add_argument("--inners", default="full,lora")
  p.add_argument("--orders", default="second,hvp,first")
  p.add_argument("--way", type=int, default=5)
  p.add_argument("--shot", type=int, default=5)
  p.add_argument("--query", type=int, default=5)
  p.add_argument("--seq", type=int, default=32)
  p.add_argument("--inner_steps", type=int, default=5)
  p.add_argument("--episodes", type=int, default=1, help="episodes per meta-step (scanned)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
  p.add_argument("--max_run_gb", type=float, default=10.0)
  p.add_argument("--tiny", action="store_true", help="a 2-layer model, 2-way 1-shot (tests)")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--size", help=argparse.SUPPRESS)
  p.add_argument("--inner", help=argparse.SUPPRESS)
  p.add_argument("--order", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.tiny:
    args.sizes, args.way, args.shot, args.query, args.seq = "tiny", 2, 1, 1, 8
    args.inner_steps, args.repeats = 2, 1
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse(argv)
  if args.child:
    print(json.dumps(child(args)))
    return 0
  before = timing.load()
  print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
  print(
    f"{args.way}-way {args.shot}-shot, {args.query} query/class, {args.seq} tokens, "
    f"{args.inner_steps} inner steps, {args.episodes} episode(s)/meta-step, "
    f"median of {args.repeats}",
    flush=True,
  )
  rows = []
  for size in args.sizes.split(","):
    for inner in args.inners.split(","):
      for order in args.orders.split(","):
        rows.append(run_configuration(args, size, inner, order))
        print(json.dumps(rows[-1]), flush=True)
  print(table(rows))
  print(timing.load_line(before))
  return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
