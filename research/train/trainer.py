"""``train_and_evaluate(config, workdir)``: the training loop of one experiment (one task or more).

One readable loop: build the model, find its first parameters (resume order: the workdir's own
checkpoint -> ``resume_from`` -> ``init_from`` / pretrained graft -> scratch), build the optax
chain, then run a jitted, donated train step over prefetched, sharded batches. With several
tasks (one head each) every step trains the task that :mod:`research.train.multitask` schedules
for it, with that task's jitted step on the one shared state; one task is the case N = 1. The
host reads device values only every ``train.log_every`` steps. Evaluations (every task) write
metrics and keep the best params; checkpoints hold the state and every task's input position so
a killed run resumes on the same trajectory. The run directory ends up with config.json,
labels.json, optim_summary.txt, graft_report.txt, metrics.jsonl, tb/, checkpoints/, best/ and
results.json.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from research import optim, paths
from research import tasks as task_lib
from research.train import checkpoints as ckpt_lib
from research.train import multitask, parallel, setup
from research.train.metrics import MetricWriter, peak_memory
from research.train.state import TrainState, build_model, init_fn
from research.train.steps import make_eval_step, make_train_step
from research.transfer import hf


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite steps; the last good checkpoint is kept."""


class Prefetcher:
  """Puts the next ``depth`` batches on device ahead of the step, remembering input positions.

  ``state()`` is the input iterator position *before* the first batch not yet handed out, which
  is what a checkpoint after the current step must hold. With ``stop``, no batch of step
  ``stop`` or later is read.
  """

  def __init__(
    self,
    it,
    put: Callable[[dict], Any],
    depth: int = 2,
    hook: Callable[[int, dict], dict] | None = None,
    start_step: int = 0,
    stop: int | None = None,
  ):
    self._it, self._put, self._depth, self._hook = it, put, depth, hook
    self._queue: collections.deque = collections.deque()
    self._next_step, self._stop = start_step, stop

  def _fill(self) -> None:
    while len(self._queue) < self._depth:
      if self._stop is not None and self._next_step + len(self._queue) >= self._stop:
        return
      position = self._it.get_state()
      batch = next(self._it)
      if self._hook is not None:
        batch = self._hook(self._next_step + len(self._queue), batch)
      self._queue.append((position, self._put(batch)))

  def __next__(self):
    self._fill()
    self._next_step += 1
    return self._queue.popleft()[1]

  def state(self) -> dict:
    return self._queue[0][0] if self._queue else self._it.get_state()


def _single_task(config) -> tuple[str, ml_collections.ConfigDict]:
  """The one task of a trainer that trains one (the meta-learning trainer)."""
  if len(config.tasks) != 1:
    raise ValueError(
      f"this trainer trains one task; config.tasks has {sorted(config.tasks)} "
      "(research.train.trainer trains several)"
    )
  return next(iter(config.tasks.items()))


def open_workdir(config: ml_collections.ConfigDict, workdir: str) -> tuple[Path, bool]:
  """Creates the run directory, writes its config.json (process 0 only); returns it and
  whether this is process 0, the one that writes logs and results."""
  path = Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    (path / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  return path, is_main


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  batch_hook: Callable[[int, dict], dict] | None = None,
) -> dict[str, Any]:
  """Trains and evaluates ``config`` in ``workdir``; returns the results.json dict.

  Args:
    config: the experiment config (see configs/).
    workdir: the run directory; holding a checkpoint, the run resumes from it.
    batch_hook: ``(step, numpy batch) -> batch``, for tests that alter inputs (e.g. inject
      a NaN) or record what was seen.
  """
  from research.data import input_pipeline

  t_start = time.time()
  workdir, is_main = open_workdir(config, workdir)
  tasks, tcfg = dict(config.tasks), config.train
  mt = multitask.settings(config)
  labels = {task: input_pipeline.label_names(t.data) for task, t in tasks.items()}
  if is_main:  # Predict mode reads the label names from here, without the data set.
    (workdir / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
  model, _ = build_model(config, {task: len(names) for task, names in labels.items()})
  mesh = parallel.make_mesh(config.get("parallel"))
  parallel.check_batch_size(tcfg.batch_size, mesh)
  if tcfg.batch_size % tcfg.grad_accum:
    raise ValueError(f"train.batch_size={tcfg.batch_size} must divide by grad_accum")

  # --- State: shapes first, then restored or created (and grafted) in place. --------------
  plan = setup.plan_state(config, init_fn(model), mesh, tcfg.steps)
  abstract_params, shardings = plan.abstract_params, plan.shardings
  ckpts = ckpt_lib.Checkpoints(
    workdir,
    max_to_keep=tcfg.max_to_keep,
    best_metric=tcfg.get("best_metric") or None,
    best_mode=tcfg.get("best_mode", "max"),
  )
  writer = MetricWriter(
    workdir, total_steps=tcfg.steps, enabled=is_main, progress=tcfg.get("progress", True)
  )
  for line in plan.summary:
    writer.print(line)
  if is_main:
    (workdir / "optim_summary.txt").write_text("\n".join(plan.summary) + "\n")
  report_path = workdir / "graft_report.txt" if is_main else None
  state, data_state, origin = setup.first_state(plan, config, ckpts, writer.print, report_path)
  writer.print(f"init: {origin}")
  start_step = int(state.step)
  labels_tree = optim.freeze_labels(config.optim, abstract_params)
  counts = optim.count_params(abstract_params, labels_tree)

  # --- Data and steps. --------------------------------------------------------------------
  bsharding = parallel.batch_sharding(mesh)
  put = lambda b: parallel.global_batch(b, bsharding)
  batches, order = None, np.zeros([0], np.int32)
  if tcfg.steps:  # An evaluation-only run (steps=0) reads no training data.
    tokenizer = _tokenizer(config)
    train_its = {
      task: input_pipeline.build_iterator(
        t.data,
        tokenizer,
        t.data.splits.train,
        batch_size=tcfg.batch_size,
        train=True,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      )
      for task, t in tasks.items()
    }
    sizes = {task: it.num_examples for task, it in train_its.items()}
    probs = multitask.task_probs(sizes, mt["sampling"], mt["temperature"], mt["weights"])
    # Which task each step trains: a pure function of the config, recomputed on resume.
    order = multitask.schedule(
      probs, tcfg.steps, config.seed, mt["block"], round_robin=mt["sampling"] == "round_robin"
    )
    if len(tasks) > 1:
      writer.print(
        f"tasks ({mt['sampling']} sampling): "
        + ", ".join(f"{t} p={probs[t]:.3f} ({sizes[t]} examples)" for t in tasks)
      )
    mixture = multitask.Mixture(train_its, order, start_step)
    if data_state:
      mixture.set_state(data_state)
    batches = Prefetcher(mixture, put, hook=batch_hook, start_step=start_step, stop=tcfg.steps)
  replicated = parallel.replicated(mesh)
  train_steps, evaluators = [], {}
  for task, t in tasks.items():
    make = lambda axis, task=task, t=t: _task_step(
      make_train_step(model, task, t.kind, tcfg.grad_accum, axis, loss_options=t.get("loss")),
      mt["loss_weights"].get(task, 1.0),
    )
    train_steps.append(
      parallel.compile_train_step(make, config.parallel.mode, mesh, shardings, bsharding)
    )
    eval_step = jax.jit(
      make_eval_step(model, task, t.kind),
      in_shardings=(shardings.params, bsharding),
      out_shardings=replicated,
    )
    evaluators[task] = Evaluator(task, t.kind, t, config, put, eval_step, model=model)

  # --- The loop. --------------------------------------------------------------------------
  names = list(tasks)
  pending: list[dict] = []
  last_eval: dict[str, dict] = {}
  train_time, trained_examples, trained_steps, t_log = 0.0, 0.0, 0, None
  patience = tcfg.get("nonfinite_patience", 5)
  schedule = optim.lr_schedule(config.optim, tcfg.steps)
  for step in range(start_step, tcfg.steps):
    state, metrics = train_steps[order[step]](state, next(batches))
    pending.append(metrics)
    done = step + 1
    if done % tcfg.log_every == 0 or done == tcfg.steps:
      host = jax.device_get(pending)  # The only device->host sync of the loop.
      pending = []
      now = time.time()
      if t_log is not None:
        train_time += now - t_log
        trained_examples += float(sum(m["examples"] for m in host))
        trained_steps += len(host)
      record = {
        "loss": _finite_mean([m["loss"] for m in host]),
        "grad_norm": float(np.mean([m["grad_norm"] for m in host])),
        "lr": float(schedule(done - 1)),
        "nonfinite_total": int(host[-1]["nonfinite_total"]),
      }
      first = done - len(host) + 1
      if len(tasks) > 1:  # Each task's mean loss over its steps in this window.
        window = order[first - 1 : done]
        for i in sorted(set(window.tolist())):
          record[f"{names[i]}/loss"] = _finite_mean(
            [m["loss"] for m, j in zip(host, window) if j == i]
          )
      skipped = [first + i for i, m in enumerate(host) if m["nonfinite_streak"]]
      writer.write(done, "train", record)
      writer.advance(len(host), loss=record["loss"])
      if skipped:
        writer.print(
          f"step {done}: skipped non-finite step(s) {skipped[:10]}; "
          f"{record['nonfinite_total']} in total"
        )
      if max(int(m["nonfinite_streak"]) for m in host) >= patience:
        ckpts.wait()
        raise NonFiniteError(
          f"stopping at step {done}: {patience} non-finite steps in a row (loss or gradient "
          f"NaN/inf); the last good checkpoint is {ckpts.latest_step()} in "
          f"{ckpts.latest.directory}" + (f"; skipped steps {skipped[:5]}" if skipped else "")
        )
      t_log = time.time()
    if tcfg.eval_every and (done % tcfg.eval_every == 0 or done == tcfg.steps):
      t_eval = time.time()
      last_eval = _evaluate(evaluators, state.params, done, writer, ckpts)
      if t_log is not None:
        t_log += time.time() - t_eval  # Evaluation time is not training time.
    if tcfg.checkpoint_every and (done % tcfg.checkpoint_every == 0 or done == tcfg.steps):
      ckpts.save(done, state, batches.state())
  ckpts.wait()
  ckpts.close()
  writer.close()
  if not last_eval and (tcfg.eval_every or tcfg.steps == 0):  # steps=0: evaluate only.
    last_eval = {task: evaluator(state.params) for task, evaluator in evaluators.items()}
  results = {
    "config": config.get("experiment", ""),
    "tasks": names,
    "steps": int(tcfg.steps),
    "task_steps": {t: int(n) for t, n in zip(names, np.bincount(order, minlength=len(names)))},
    "eval": last_eval,
    "train_examples_per_sec": trained_examples / train_time if train_time else None,
    # Mean over the logged windows after the first (which holds the compilations).
    "step_time_s": train_time / trained_steps if trained_steps else None,
    "wall_s": time.time() - t_start,
    **peak_memory(),
    "params": counts,
    "init": origin,
  }
  if is_main:
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  return results


def _finite_mean(values: list) -> float:
  finite = [v for v in values if np.isfinite(v)]
  return float(np.mean(finite)) if finite else float("nan")


def _task_step(step: Callable, loss_weight: float) -> Callable:
  """``step`` with the task's loss multiplied by ``loss_weight`` (an optimizer on scaled
  gradients, same optimizer state); the step itself when the weight is 1."""
  if loss_weight == 1.0:
    return step

  def weighted(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    new, metrics = step(state.replace(tx=multitask.weighted_tx(state.tx, loss_weight)), batch)
    return new.replace(tx=state.tx), metrics

  return weighted


def _evaluate(evaluators: dict, params, step: int, writer: MetricWriter, ckpts) -> dict:
  """Every task's metrics: one eval event per task; the best params by any task's metric."""
  out, scores = {}, {}
  for task, evaluator in evaluators.items():
    out[task] = evaluator(params)
    scalars = paths.flatten(out[task])  # Nested breakdowns become "per_type/PER/f1".
    writer.write(step, "eval", {"task": task, **scalars})
    writer.print(
      f"step {step}: eval {task} "
      + " ".join(f"{k}={v:.4f}" for k, v in out[task].items() if isinstance(v, float))
    )
    scores.update({f"{task}/{k}": float(v) for k, v in scalars.items()})
  ckpts.save_best(step, params, scores)
  return out


def _tokenizer(config):
  import transformers

  return transformers.AutoTokenizer.from_pretrained(str(hf.resolve(config.model.checkpoint)))


def _concat(arrays: list[np.ndarray], key: str) -> np.ndarray:
  """Batches of per-token arrays padded to the widest bucket ('labels' with -100), then joined."""
  if arrays[0].ndim < 2:
    return np.concatenate(arrays)
  width = max(a.shape[1] for a in arrays)
  fill = -100 if key == "labels" else 0
  pad = lambda a: np.pad(
    a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=fill
  )
  return np.concatenate([pad(a) for a in arrays])


class Evaluator:
  """Runs one task's eval split through the jitted eval step; metrics on the host."""

  def __init__(self, task, kind, task_cfg, config, put, eval_step, model=None):
    self.task, self.module, self.put, self.eval_step = task, task_lib.get(kind), put, eval_step
    self.task_cfg, self.config, self.model = task_cfg, config, model
    self._hook = None  # The task module's make_evaluate(...) result, built on first use.
    from research.data import input_pipeline

    self.label_names = input_pipeline.label_names(task_cfg.data)
    self._batches: list[dict] | None = None

  def batches(self) -> list[dict]:
    if self._batches is None:  # Tokenized once, kept: eval sets are small.
      from research.data import input_pipeline

      it = input_pipeline.build_iterator(
        self.task_cfg.data,
        _tokenizer(self.config),
        self.task_cfg.data.splits.eval,
        batch_size=self.config.eval.batch_size,
        train=False,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      )
      self._batches = list(it)
    return self._batches

  def __call__(self, params) -> dict[str, float]:
    preds, golds, total, weight = [], [], 0.0, 0.0
    for batch in self.batches():
      # Gold labels come back from the step so every process sees the global batch.
      p, g, t, w = jax.device_get(self.eval_step(params, self.put(batch)))
      preds.append(p)
      golds.append(g)
      total, weight = total + float(t), weight + float(w)
    cat = lambda xs: {k: _concat([x[k] for x in xs], k) for k in xs[0]}
    out = self.module.metrics(cat(preds), cat(golds), self.label_names)
    out["loss"] = total / max(weight, 1.0)
    if hasattr(self.module, "make_evaluate"):  # e.g. seq2seq: decode, then BLEU.
      if self._hook is None:
        args = (self.model, self.task, self.task_cfg, _tokenizer(self.config))
        self._hook = self.module.make_evaluate(*args)
      out.update(self._hook(params, self.batches(), self.put))
    return out
