"""The supervised training program: one task or several (one head each) on one encoder.

Every step trains the task that :mod:`research.train.multitask` schedules for it, with that
task's jitted step on the one shared state; one task is the case N = 1. Evaluations score every
task's eval split; predict mode later reads labels.json. The loop itself (resume, schedule,
checkpoints, the non-finite guard, preemption, results.json) is :func:`research.train.loop.run`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from research import tasks as task_lib
from research.train import loop, multitask, parallel
from research.train.loop import NonFiniteError, Preempted, train_and_evaluate
from research.train.state import TrainState, build_model, init_fn
from research.train.steps import make_eval_step, make_train_step
from research.transfer import hf

__all__ = ["NonFiniteError", "Preempted", "SupervisedProgram", "train_and_evaluate"]


@loop.register_program("supervised")
class SupervisedProgram(loop.Program):
  """Fine-tuning on labelled data: classification, regression, tagging, seq2seq tasks."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def build(self, run: loop.Run) -> None:
    config, tcfg = self.config, self.config.train
    self.task_cfgs = dict(config.tasks)
    self.tasks = list(self.task_cfgs)
    self.mt = multitask.settings(config)
    self.kinds = {task: task_lib.get(t.kind) for task, t in self.task_cfgs.items()}
    self.labels = {task: self.kinds[task].label_names(t.data) for task, t in self.task_cfgs.items()}
    self.model, _ = build_model(config, {task: len(n) for task, n in self.labels.items()})
    # Each task's tokenizer, as its kind chooses it (seq2seq may train a target vocabulary; a
    # resumed run reads its own copy back from the run directory).
    self.tokenizers = {task: tokenizer_of(config, task, run.workdir) for task in self.tasks}
    parallel.check_batch_size(tcfg.batch_size, run.mesh)
    if tcfg.batch_size % tcfg.grad_accum:
      raise ValueError(f"train.batch_size={tcfg.batch_size} must divide by grad_accum")
    self.steps = int(tcfg.steps)
    self.best_metric = tcfg.best_metric or None
    self.best_mode = tcfg.best_mode
    self.init_params = init_fn(self.model)
    self.order = np.zeros([0], np.int32)

  def files(self) -> dict[str, str]:
    # Predict mode reads the label names from here, without the data set; the kinds' files
    # (a trained vocabulary) are what predict mode and a resumed run tokenize with.
    files = {"labels.json": json.dumps(self.labels, indent=2) + "\n"}
    for task, kind in self.kinds.items():
      files.update(kind.run_files(self.tokenizers[task]))
    return files

  def batches(self, run: loop.Run, start_step: int, data_state: dict) -> multitask.Mixture:
    from research.data import input_pipeline

    config, mt = self.config, self.mt
    train_its = {
      task: input_pipeline.build_iterator(
        t.data,
        self.tokenizers[task],
        t.data.splits.train,
        batch_size=config.train.batch_size,
        train=True,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        encoder=self.kinds[task].encoder,
      )
      for task, t in self.task_cfgs.items()
    }
    sizes = {task: it.num_examples for task, it in train_its.items()}
    probs = multitask.task_probs(sizes, mt["sampling"], mt["temperature"], mt["weights"])
    # Which task each step trains: a pure function of the config, recomputed on resume.
    self.order = multitask.schedule(
      probs, self.steps, config.seed, mt["block"], round_robin=mt["sampling"] == "round_robin"
    )
    if len(self.tasks) > 1:
      run.print(
        f"tasks ({mt['sampling']} sampling): "
        + ", ".join(f"{t} p={probs[t]:.3f} ({sizes[t]} examples)" for t in self.tasks)
      )
    mixture = multitask.Mixture(train_its, self.order, start_step)
    if data_state:
      mixture.set_state(data_state)
    return mixture

  def compile(self, run: loop.Run, shardings: TrainState) -> None:
    config, model = self.config, self.model
    self.train_steps, self.evaluators = [], {}
    for task, t in self.task_cfgs.items():
      make = lambda axis, task=task, t=t: _task_step(
        make_train_step(
          model,
          task,
          t.kind,
          config.train.grad_accum,
          axis,
          loss_options=t.get("loss"),
          trainable=run.trainable,
        ),
        self.mt["loss_weights"].get(task, 1.0),
      )
      self.train_steps.append(
        parallel.compile_train_step(
          make, config.parallel.mode, run.mesh, shardings, run.batch_sharding
        )
      )
      eval_step = jax.jit(
        make_eval_step(model, task, t.kind),
        in_shardings=(shardings.params, run.batch_sharding),
        out_shardings=parallel.replicated(run.mesh),
      )
      self.evaluators[task] = Evaluator(
        task, t.kind, t, config, run.put, eval_step, model=model, tokenizer=self.tokenizers[task]
      )

  def step_fn(self, step: int) -> Callable:
    return self.train_steps[self.order[step]]

  def train_record(self, host: list[dict], first: int, done: int) -> dict[str, float]:
    if len(self.tasks) == 1:
      return {}
    record, window = {}, self.order[first - 1 : done]
    for i in sorted(set(window.tolist())):  # Each task's mean loss over its steps here.
      record[f"{self.tasks[i]}/loss"] = loop.finite_mean(
        [m["loss"] for m, j in zip(host, window) if j == i]
      )
    return record

  def evaluate(self, run: loop.Run, params: Any, step: int) -> dict[str, dict[str, Any]]:
    return {task: evaluator(params) for task, evaluator in self.evaluators.items()}

  def finish(self, run: loop.Run, state: TrainState, last_eval: dict) -> dict[str, Any]:
    if not last_eval and (self.config.train.eval_every or self.steps == 0):  # Evaluate only.
      last_eval = self.evaluate(run, state.params, self.steps)
    counts = np.bincount(self.order, minlength=len(self.tasks))
    # Text beside the scores (seq2seq's sacreBLEU signatures) goes to results.json only.
    last_eval = {t: {**m, **self.evaluators[t].notes} for t, m in last_eval.items()}
    return {
      "task_steps": {t: int(n) for t, n in zip(self.tasks, counts)},
      "eval": last_eval,
    }


def _task_step(step: Callable, loss_weight: float) -> Callable:
  """``step`` with the task's loss multiplied by ``loss_weight`` (an optimizer on scaled
  gradients, same optimizer state); the step itself when the weight is 1."""
  if loss_weight == 1.0:
    return step

  def weighted(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    new, metrics = step(state.replace(tx=multitask.weighted_tx(state.tx, loss_weight)), batch)
    return new.replace(tx=state.tx), metrics

  return weighted


def tokenizer_of(
  config: ml_collections.ConfigDict,
  task: str | None = None,
  workdir: str | Path | None = None,
  build: bool = True,
):
  """The tokenizer of the run's checkpoint (an HF directory or hub id); with ``task``, the one
  that task's kind reads its data with (``TaskKind.tokenizer``: e.g. seq2seq's trained target
  vocabulary, read back from ``workdir`` when the run directory holds it; ``build=False``
  refuses to make a missing one, as predict mode must)."""
  pretrained = hf.load_tokenizer(hf.resolve(config.model.checkpoint))
  if pretrained.pad_token is None and pretrained.eos_token is not None:
    # Decoder-only tokenizers (Llama 3, GPT-2) have no pad token: pad with EOS, as transformers'
    # recipes do; the attention mask keeps padding out, and `last` pooling finds real tokens.
    pretrained.pad_token = pretrained.eos_token
  if task is None:
    return pretrained
  kind = task_lib.get(config.tasks[task].kind)
  return kind.tokenizer(config, task, pretrained, workdir, build)


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
  """Runs one task's eval split through the jitted eval step; metrics on the host.

  The kind's hook may return text beside its numbers (seq2seq's sacreBLEU signatures): the
  numbers are the eval metrics, the text is kept in ``notes`` for results.json.
  """

  def __init__(self, task, kind, task_cfg, config, put, eval_step, model=None, tokenizer=None):
    self.task, self.kind, self.put, self.eval_step = task, task_lib.get(kind), put, eval_step
    self.task_cfg, self.config, self.model = task_cfg, config, model
    self.tokenizer = tokenizer if tokenizer is not None else tokenizer_of(config, task)
    self.notes: dict[str, str] = {}
    self._hook, self._hook_built = None, False  # The kind's make_evaluate(...), built once.
    self.label_names = self.kind.label_names(task_cfg.data)
    self._batches: list[dict] | None = None

  def batches(self) -> list[dict]:
    if self._batches is None:  # Tokenized once, kept: eval sets are small.
      from research.data import input_pipeline

      it = input_pipeline.build_iterator(
        self.task_cfg.data,
        self.tokenizer,
        self.task_cfg.data.splits.eval,
        batch_size=self.config.eval.batch_size,
        train=False,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        encoder=self.kind.encoder,
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
    out = self.kind.metrics(cat(preds), cat(golds), self.label_names)
    out["loss"] = total / max(weight, 1.0)
    if not self._hook_built:  # e.g. seq2seq: decode, then BLEU; None for most kinds.
      args = (self.model, self.task, self.task_cfg, self.tokenizer)
      self._hook, self._hook_built = self.kind.make_evaluate(*args), True
    if self._hook is not None:
      for key, value in self._hook(params, self.batches(), self.put).items():
        if isinstance(value, str):
          self.notes[key] = value
        else:
          out[key] = value
    return out
