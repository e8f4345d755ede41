"""Benchmark: fine-tuning SST-2 to 88% dev accuracy, end to end, ours vs the transformers Trainer.

  python -m research.bench.time_to_accuracy                        # 3 seeds x 2000 steps, ~2 h
  python -m research.bench.time_to_accuracy --seeds=0 --steps=1000  # one pair, ~25 min
  python -m research.bench.time_to_accuracy --tiny                  # seconds (the test's mode)

What a user waits for is not a step but "fine-tune to 88%": from the command to the number,
with start-up, compilation, padding, evaluation and data preparation all included. Each side is
one fresh process launched from here and timed by this process's clock from launch: ours is
``python -m research.main --config=configs/sst2_minilm.py`` (pooler head, length buckets); the
peer is the transformers ``Trainer`` in PyTorch on the same checkpoint
(``BertForSequenceClassification``: the same pooler head and dropout), the same recipe (batches
of 32, AdamW at 1e-4, 6% warmup then linear decay, weight decay 0.01 off biases and norms,
clipping at 1.0, max length 128), ``DataCollatorWithPadding`` and
``train_sampling_strategy='group_by_length'`` (the Trainer's own counterpart of our length
buckets; ``--peer_sampling=random`` for plain shuffling), evaluating the whole dev set every
``--eval_every`` steps. Neither side saves checkpoints along the way (ours writes its one final
checkpoint, the Trainer none). Ours starts with an empty compilation cache unless
``--warm_cache`` (a user's later runs find it filled: research/compile_cache.py). Each side's
evaluations are picked up from the file it writes them to (our metrics.jsonl, the worker's
evals.jsonl) as they appear, stamped with the time since launch.

Seeds alternate the order of the two sides (ours first on even seeds), so a busy spell on the
machine does not always hit the same side. Printed: per seed, dev accuracy and wall time at
every evaluation, side by side; the load average before and after; a plot of dev accuracy
against wall time (``<out>/time_to_accuracy.png``) and the figures as JSON; then
``equal_steps_speedup=`` (median over seeds of the peer's whole-process wall over ours),
``time_to_88_speedup=`` (median over seeds of the peer's time to the first evaluation at or
above ``--target`` over ours; nan where a side never got there) and ``ours_first=<k>/<seeds>``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from research import compile_cache
from research.subprocess_env import child_env

REPO = Path(__file__).resolve().parents[2]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
OURS_CONFIG = "configs/sst2_minilm.py"
# The ``tiny`` side of the peer: the shape of research.config_lib.TINY_ENCODER, random weights.
TINY_BERT = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)
POLL_S = 0.2


def read_tsv(path: Path) -> list[tuple[str, int]]:
  """``(sentence, label)`` rows of an SST-2 TSV file (a header line, then text<TAB>label)."""
  with open(path, newline="") as f:
    rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    return [(row["sentence"], int(row["label"])) for row in rows]


def data_dir(tiny: bool) -> Path:
  """SST-2's folder: the committed fixture for ``tiny``, else the shared data set."""
  if tiny:
    return REPO / "tests" / "fixtures" / "data" / "sst2"
  return Path(os.environ.get("RESEARCH_DATA_DIR", REPO / "data")) / "sst2"


def trainer_worker(args: argparse.Namespace) -> None:
  """The peer: one transformers Trainer run; each evaluation appended to ``args.evals``."""
  import numpy as np
  import torch
  import transformers

  from research.transfer import hf

  directory = str(hf.resolve(MINILM))
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  folder = data_dir(args.tiny)
  max_length = 32 if args.tiny else 128

  def encode(rows: list[tuple[str, int]]) -> list[dict[str, Any]]:
    texts, labels = zip(*rows, strict=True)
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [
      {"input_ids": ids, "attention_mask": mask, "labels": label}
      for ids, mask, label in zip(enc["input_ids"], enc["attention_mask"], labels, strict=True)
    ]

  train, dev = encode(read_tsv(folder / "train.tsv")), encode(read_tsv(folder / "dev.tsv"))
  transformers.set_seed(args.seed)
  if args.tiny:
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, num_labels=2, **TINY_BERT)
    model = transformers.BertForSequenceClassification(config)
  else:
    model = transformers.BertForSequenceClassification.from_pretrained(directory, num_labels=2)

  class Evals(transformers.TrainerCallback):
    def on_evaluate(self, _args, state, _control, metrics=None, **_kw):
      record = {"step": state.global_step, "accuracy": metrics["eval_accuracy"]}
      with open(args.evals, "a") as f:
        f.write(json.dumps(record) + "\n")

  def accuracy(pred: transformers.EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

  targs = transformers.TrainingArguments(
    output_dir=args.workdir,
    per_device_train_batch_size=args.batch_size,
    per_device_eval_batch_size=args.batch_size,
    learning_rate=1e-4,
    weight_decay=0.01,
    warmup_steps=round(0.06 * args.steps),
    lr_scheduler_type="linear",
    max_grad_norm=1.0,
    max_steps=args.steps,
    eval_strategy="steps",
    eval_steps=args.eval_every,
    save_strategy="no",
    logging_steps=50,
    seed=args.seed,
    use_cpu=True,
    report_to="none",
    train_sampling_strategy=args.peer_sampling,
    disable_tqdm=True,
  )
  trainer = transformers.Trainer(
    model=model,
    args=targs,
    train_dataset=train,
    eval_dataset=dev,
    data_collator=transformers.DataCollatorWithPadding(tokenizer),
    compute_metrics=accuracy,
    callbacks=[Evals()],
  )
  torch.manual_seed(args.seed)
  trainer.train()


def new_records(path: Path, seen: int) -> list[dict[str, Any]]:
  """The complete JSON lines of ``path`` after the first ``seen`` ones (none if it is absent)."""
  if not path.exists():
    return []
  text = path.read_text()
  lines = text.split("\n")[:-1]  # A line being written has no newline yet.
  return [json.loads(line) for line in lines[seen:] if line.strip()]


def run_side(cmd: list[str], evals: Path, log: Path, env: dict[str, str]) -> dict[str, Any]:
  """Launches ``cmd``, stamps each evaluation record appearing in ``evals`` with the seconds
  since launch, and waits for the process.

  Raises:
    RuntimeError: the process failed (the tail of its log in the message).
  """
  seen, records = 0, []
  start = time.perf_counter()
  with open(log, "w") as out:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    while True:
      done = proc.poll() is not None
      now = time.perf_counter() - start
      for record in new_records(evals, seen):
        seen += 1
        if record.get("split", "eval") == "eval":
          records.append({"step": record["step"], "accuracy": record["accuracy"], "wall_s": now})
      if done:
        break
      time.sleep(POLL_S)
  wall = time.perf_counter() - start
  if proc.returncode:
    tail = log.read_text()[-3000:]
    raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}; {log}:\n{tail}")
  return {"wall_s": wall, "evals": records}


def ours_command(args: argparse.Namespace, seed: int, workdir: Path) -> list[str]:
  config = OURS_CONFIG + (":tiny" if args.tiny else "")
  cmd = [sys.executable, "-m", "research.main", f"--config={config}", f"--workdir={workdir}"]
  cmd += [
    f"--config.seed={seed}",
    f"--config.train.steps={args.steps}",
    f"--config.train.eval_every={args.eval_every}",
    f"--config.train.checkpoint_every={args.steps}",
    "--config.train.best_metric=",
    f"--config.train.batch_size={args.batch_size}",
    f"--config.eval.batch_size={args.batch_size}",
  ]
  return cmd


def peer_command(args: argparse.Namespace, seed: int, workdir: Path) -> list[str]:
  cmd = [sys.executable, "-m", "research.bench.time_to_accuracy", "--worker"]
  cmd += [f"--seed={seed}", f"--steps={args.steps}", f"--eval_every={args.eval_every}"]
  cmd += [f"--batch_size={args.batch_size}", f"--peer_sampling={args.peer_sampling}"]
  cmd += [f"--workdir={workdir}", f"--evals={workdir / 'evals.jsonl'}"]
  return cmd + (["--tiny"] if args.tiny else [])


def first_at(evals: list[dict[str, Any]], target: float) -> float:
  """Seconds since launch of the first evaluation at or above ``target``; nan if none."""
  return next((e["wall_s"] for e in evals if e["accuracy"] >= target), math.nan)


def run_seed(args: argparse.Namespace, seed: int, root: Path) -> dict[str, Any]:
  """Both sides for one seed, in the seed's order; their figures."""
  sides: dict[str, Any] = {}
  for name in ("ours", "peer") if seed % 2 == 0 else ("peer", "ours"):
    workdir = root / f"{name}_seed{seed}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    env = child_env()
    if name == "ours":
      if not args.warm_cache:
        env[compile_cache.COMPILE_CACHE_ENV] = str(workdir / "compile_cache")
      cmd, evals = ours_command(args, seed, workdir / "run"), workdir / "run" / "metrics.jsonl"
    else:
      cmd, evals = peer_command(args, seed, workdir), workdir / "evals.jsonl"
    print(f"seed {seed}: {name} ...", flush=True)
    sides[name] = run_side(cmd, evals, workdir / "log.txt", env)
    print(f"seed {seed}: {name} took {sides[name]['wall_s']:.1f} s", flush=True)
  return sides


def plot(results: dict[int, dict[str, Any]], target: float, path: Path) -> bool:
  """Dev accuracy against wall time, both sides, every seed; False without matplotlib."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  colors = {"ours": "tab:blue", "peer": "tab:orange"}
  labels = {"ours": "ours (JAX, research.main)", "peer": "transformers Trainer (PyTorch)"}
  for i, (_, sides) in enumerate(sorted(results.items())):
    for name, side in sides.items():
      xs = [e["wall_s"] for e in side["evals"]]
      ys = [100 * e["accuracy"] for e in side["evals"]]
      ax.plot(
        xs,
        ys,
        "o-",
        color=colors[name],
        alpha=0.9 - 0.2 * i,
        ms=3,
        label=labels[name] if i == 0 else None,
      )
  ax.axhline(100 * target, color="grey", ls="--", lw=1)
  ax.set_xlabel("wall time since launch (s)")
  ax.set_ylabel("SST-2 dev accuracy (%)")
  ax.legend(loc="lower right")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def summarise(results: dict[int, dict[str, Any]], target: float) -> dict[str, Any]:
  """Per-seed ratios and their medians."""
  equal, to_target, first = [], [], 0
  for sides in results.values():
    equal.append(sides["peer"]["wall_s"] / sides["ours"]["wall_s"])
    ours, peer = first_at(sides["ours"]["evals"], target), first_at(sides["peer"]["evals"], target)
    to_target.append(peer / ours if not math.isnan(ours) and not math.isnan(peer) else math.nan)
    first += int(not math.isnan(ours) and (math.isnan(peer) or ours < peer))
  finite = [r for r in to_target if not math.isnan(r)]
  return {
    "equal_steps_speedup": statistics.median(equal),
    "time_to_target_speedup": statistics.median(finite) if len(finite) == len(equal) else math.nan,
    "ours_first": first,
    "per_seed_equal_steps": equal,
    "per_seed_time_to_target": to_target,
  }


def report(results: dict[int, dict[str, Any]], target: float) -> None:
  for seed, sides in sorted(results.items()):
    print(
      f"\nseed {seed}: whole process ours {sides['ours']['wall_s']:.1f} s, "
      f"Trainer {sides['peer']['wall_s']:.1f} s"
    )
    print("| step | ours dev acc | ours wall (s) | Trainer dev acc | Trainer wall (s) |")
    print("|---:|---:|---:|---:|---:|")
    peer = {e["step"]: e for e in sides["peer"]["evals"]}
    for e in sides["ours"]["evals"]:
      p = peer.get(e["step"])
      theirs = f"{100 * p['accuracy']:.2f} | {p['wall_s']:.1f}" if p else "- | -"
      print(f"| {e['step']} | {100 * e['accuracy']:.2f} | {e['wall_s']:.1f} | {theirs} |")
    for name in ("ours", "peer"):
      print(
        f"{name} first at >= {100 * target:.1f}%: {first_at(sides[name]['evals'], target):.1f} s"
      )


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
  parser.add_argument("--steps", type=int, help="train steps (default 2000; --tiny: 20)")
  parser.add_argument("--eval_every", type=int, help="default 250; --tiny: 10")
  parser.add_argument("--batch_size", type=int, help="default 32; --tiny: 8")
  parser.add_argument("--target", type=float, default=0.88, help="dev accuracy to reach")
  parser.add_argument(
    "--peer_sampling",
    default="group_by_length",
    choices=("group_by_length", "random"),
    help="the Trainer's train_sampling_strategy",
  )
  parser.add_argument("--warm_cache", action="store_true", help="ours uses the user's cache")
  parser.add_argument("--tiny", action="store_true", help="tiny random models on the fixture")
  parser.add_argument("--out", help="results folder (default: a new temporary folder)")
  parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--workdir", help=argparse.SUPPRESS)
  parser.add_argument("--evals", help=argparse.SUPPRESS)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.steps = args.steps or (20 if args.tiny else 2000)
  args.eval_every = args.eval_every or (10 if args.tiny else 250)
  args.batch_size = args.batch_size or (8 if args.tiny else 32)
  if args.worker:
    trainer_worker(args)
    return
  if not (data_dir(args.tiny) / "train.tsv").exists():
    sys.exit(f"error: SST-2 not found at {data_dir(args.tiny)} (see data/README.md)")
  root = Path(args.out or tempfile.mkdtemp(prefix="time_to_accuracy_"))
  root.mkdir(parents=True, exist_ok=True)
  seeds = [int(s) for s in args.seeds.split(",")]
  load = os.getloadavg()
  results = {seed: run_seed(args, seed, root) for seed in seeds}
  after = os.getloadavg()
  report(results, args.target)
  print(
    f"\nload average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
    f"after: {after[0]:.2f} {after[1]:.2f} {after[2]:.2f} ({os.cpu_count()} cores)"
  )
  summary = summarise(results, args.target)
  figures = {"args": vars(args), "load_before": load, "load_after": after, **summary}
  (root / "results.json").write_text(json.dumps({**figures, "seeds": results}, indent=1))
  if plot(results, args.target, root / "time_to_accuracy.png"):
    print(f"plot: {root / 'time_to_accuracy.png'}")
  print(f"ours_first={summary['ours_first']}/{len(seeds)}")
  print(f"equal_steps_speedup={summary['equal_steps_speedup']:.3f}")
  print(f"time_to_{round(100 * args.target)}_speedup={summary['time_to_target_speedup']:.3f}")


if __name__ == "__main__":
  main()
