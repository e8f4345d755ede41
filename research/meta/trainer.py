"""The meta-learning training program (``config.program = 'meta'``).

Meta-training runs through the one loop (:func:`research.train.loop.run`: resume, checkpoints,
the non-finite guard, preemption, results.json); what is particular to meta-learning is here.
Episodes come from :mod:`research.data.episodes` over the published class splits: meta-train
episodes from the ``train`` classes, validation episodes (``eval_every``) from ``valid``, and
the final ``meta.test_episodes`` from ``test``, drawn with ``meta.test_seed`` so every algorithm
and baseline (``finetune``, ``protonet``; ``train.steps=0`` for no meta-training) is scored on
the same episodes. results.json holds ``eval.<task>.accuracy`` with its 95% confidence interval
(``ci95``: 1.96 standard errors over episodes), beside the usual contract fields.

Cross-data-set meta-transfer: ``meta.test_data`` names another intent data set (e.g. meta-train
on CLINC150's meta-train classes, meta-test on BANKING77's meta-test classes); only the test
episodes come from it (:func:`test_data_config`). They depend on that data set, the tokenizer, the
episode shape and ``meta.test_seed``, never on the meta-training data, so runs trained on
different data sets are scored, paired, on the same episodes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import optim, paths
from research.data import episodes as episodes_lib
from research.data import registry
from research.meta import inner
from research.meta.algorithms import MetaLearner, settings_from_config
from research.meta.steps import make_eval_step, make_meta_step
from research.train import loop, parallel, setup
from research.train.loop import train_and_evaluate
from research.train.state import build_model, init_fn
from research.train.trainer import tokenizer_of

__all__ = [
  "MetaProgram",
  "MetaTestProgress",
  "mean_ci95",
  "test_data_config",
  "test_episode_iterator",
  "train_and_evaluate",
]


def mean_ci95(values: np.ndarray) -> dict[str, float]:
  """Mean, standard deviation and the 95% CI half-width (1.96 standard errors)."""
  values = np.asarray(values, np.float64)
  n = len(values)
  std = float(values.std(ddof=1)) if n > 1 else 0.0
  return {
    "accuracy": float(values.mean()),
    "ci95": 1.96 * std / math.sqrt(max(n, 1)),
    "std": std,
    "episodes": n,
  }


def single_task(config: ml_collections.ConfigDict) -> tuple[str, ml_collections.ConfigDict]:
  """The one task of a meta-learning run (its episodes come from that task's data set)."""
  if len(config.tasks) != 1:
    raise ValueError(
      f"meta-learning trains one task; config.tasks has {sorted(config.tasks)} "
      "(the supervised program trains several)"
    )
  return next(iter(config.tasks.items()))


def few_shot_data_names() -> list[str]:
  """The registered data sets with published few-shot class splits (what ``meta.test_data``
  may name)."""
  return [n for n in registry.names() if registry.DATASETS[n].get("few_shot")]


def test_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The data set of the meta-test episodes: the task's own, or ``meta.test_data``'s.

  Another data set gets its registry defaults, the task data's ``max_length`` and ``buckets``
  (tokenized the same way), then ``meta.test_data_overrides`` (e.g. a committed fixture's
  paths). ``meta.test_data`` equal to the task's data set is the task's own data config.

  Raises:
    ValueError: (one line) ``meta.test_data`` is not a registered data set with few-shot class
      splits, or ``meta.test_data_overrides`` names a field data configs do not have.
  """
  meta, (_, task_cfg) = config.meta, single_task(config)
  name = meta.test_data
  if not name or name == task_cfg.data.name:
    return task_cfg.data
  known = few_shot_data_names()
  if name not in known:
    raise ValueError(
      f"meta.test_data={name!r} is not a registered data set with few-shot class splits; "
      f"known: {known} ('' = the task's own data)"
    )
  fields = dict(max_length=task_cfg.data.max_length, buckets=tuple(task_cfg.data.buckets))
  fields.update(meta.test_data_overrides.to_dict())
  try:
    return registry.default_data_config(name, **fields)
  except KeyError as e:
    raise ValueError(f"meta.test_data_overrides: {e.args[0]}") from None


def episode_iterator(
  config,
  tokenizer,
  class_split: str,
  seed: int,
  episodes: int | None,
  data_cfg: ml_collections.ConfigDict | None = None,
):
  """Episodes of ``class_split`` of ``data_cfg`` (default: the task's data); ``episodes`` fixes
  a finite evaluation set (else endless)."""
  meta, (_, task_cfg) = config.meta, single_task(config)
  per_batch = meta.episodes_per_batch if episodes is None else meta.eval_episodes_per_batch
  if episodes is not None and episodes % per_batch:
    raise ValueError(
      f"{episodes} {class_split} episodes must divide by meta.eval_episodes_per_batch={per_batch}"
    )
  return episodes_lib.build_episode_iterator(
    task_cfg.data if data_cfg is None else data_cfg,
    tokenizer,
    class_split,
    n_way=meta.n_way,
    k_shot=meta.k_shot,
    q_query=meta.q_query,
    episodes_per_batch=per_batch,
    seed=seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_batches=None if episodes is None else episodes // per_batch,
  )


def test_episode_iterator(config: ml_collections.ConfigDict, tokenizer: Any):
  """The ``meta.test_episodes`` meta-test episodes: the ``test`` classes of
  :func:`test_data_config`, drawn with ``meta.test_seed`` (the same for every run that shares
  them, whatever it meta-trained on)."""
  meta = config.meta
  return episode_iterator(
    config, tokenizer, "test", meta.test_seed, meta.test_episodes, test_data_config(config)
  )


def evaluate(eval_step, params, it, put, progress: MetaTestProgress | None = None) -> np.ndarray:
  """Per-episode query accuracies over a finite episode iterator.

  With ``progress``, the scores so far and the iterator's position are saved after every batch
  and a rerun continues after the last saved batch (see :class:`MetaTestProgress`); every tenth of
  the way a line gives the running accuracy.
  """
  out = progress.resume(it) if progress else []
  report_every = max(1, it.num_batches // 10)
  for b in it:
    out.append(np.asarray(jax.device_get(eval_step(params, put(b)))))
    if progress:
      progress.save(out, it)
      if len(out) % report_every == 0 and len(out) < it.num_batches:
        done = np.concatenate(out)
        progress.log(f"meta-test: {len(done)} episodes, accuracy so far {done.mean():.4f}")
  return np.concatenate(out) if out else np.zeros([0])


class MetaTestProgress:
  """A resumable meta-test: per-batch accuracies and the episode iterator position on disk.

  600 meta-test episodes take up to an hour on a CPU; a run killed in the middle (a preempted
  job, a session's end) should not score them all again. The file is keyed by what the scores
  depend on: the meta-trained step, a checksum of the params and the ``meta`` settings; a file
  with another key is ignored (and overwritten), so a stale file never mixes into new scores.
  JSON, written atomically by process 0 and read by every process (the workdir is shared, as
  for checkpoints); removed when the meta-test completes.
  """

  def __init__(self, path: Path, key: dict[str, Any], log: Callable[[str], None], write: bool):
    self.path, self.log, self.write = path, log, write
    self.key = json.loads(json.dumps(key))  # As it reads back (tuples become lists).
    self.started = time.time()
    self.earlier_s = 0.0  # Seconds the runs before this one spent on the saved episodes.

  def wall_s(self) -> float:
    """The meta-test's wall time so far, the earlier (killed) runs' share included."""
    return self.earlier_s + time.time() - self.started

  def resume(self, it) -> list[np.ndarray]:
    """Scores saved by an earlier run with the same key, after moving ``it`` past them."""
    if not self.path.exists():
      return []
    try:
      saved = json.loads(self.path.read_text())
    except json.JSONDecodeError as e:
      self.log(f"meta-test: ignoring unreadable progress file {self.path} ({e})")
      return []
    if saved.get("key") != self.key:
      self.log(f"meta-test: {self.path} was saved for other params or settings; starting over")
      return []
    it.set_state(saved["iterator"])
    self.earlier_s = float(saved.get("wall_s", 0.0))
    scores = [np.asarray(b, np.float32) for b in saved["accuracies"]]
    self.log(f"meta-test: resuming after {sum(len(b) for b in scores)} episodes from {self.path}")
    return scores

  def save(self, scores: list[np.ndarray], it) -> None:
    if not self.write:
      return
    state = {
      "key": self.key,
      "iterator": it.get_state(),
      "accuracies": [b.tolist() for b in scores],
      "wall_s": self.wall_s(),
    }
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(self.path)

  def done(self) -> None:
    if self.write:
      self.path.unlink(missing_ok=True)


def params_checksum(params) -> float:
  """A fingerprint of a params pytree: every leaf's sum plus its sum of squares (one jit)."""

  def total(p):
    leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(p)]
    return sum(jnp.sum(x) + jnp.sum(x * x) for x in leaves)

  return float(jax.jit(total)(params))


@loop.register_program("meta")
class MetaProgram(loop.Program):
  """Meta-trains (``train.steps`` outer steps, possibly 0) and scores held-out episodes.

  ``build`` raises ValueError for a bad episode shape of a class split (``n_way`` above its
  classes, or a class with fewer than ``k_shot + q_query`` examples, named with its count), an
  unknown ``meta.test_data`` or bad settings, before anything is compiled or written.
  """

  eval_split = "valid"

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def build(self, run: loop.Run) -> None:
    config, meta = self.config, self.config.meta
    self.task, _ = single_task(config)
    self.tasks = [self.task]
    self.test_data = test_data_config(config)  # A bad meta.test_data fails first.
    self.settings = settings_from_config(meta)
    self.tokenizer = tokenizer_of(config)
    # Episode iterators first: a bad N or K fails here, before anything is compiled.
    self.train_it = episode_iterator(config, self.tokenizer, "train", config.seed, None)
    self.valid_it(), self.test_it()
    model, _ = build_model(config, {self.task: meta.n_way})
    self.model_init = init_fn(model)
    # The meta-gradient is computed only for what the outer optimizer moves (optim.freeze /
    # optim.trainable, or model.peft's rules): a LoRA inner loop leaves the base weights frozen.
    abstract = jax.eval_shape(self.init_params, jax.random.key_data(jax.random.key(0)))
    labels = paths.flatten(optim.freeze_labels(setup.optim_config(config), abstract))
    frozen = [p for p, label in labels.items() if label == optim.FROZEN]
    self.learner = MetaLearner(model, self.task, self.settings, frozen=frozen)
    parallel.check_batch_size(meta.episodes_per_batch, run.mesh, "meta.episodes_per_batch")
    parallel.check_batch_size(
      meta.eval_episodes_per_batch, run.mesh, "meta.eval_episodes_per_batch"
    )
    self.steps = int(config.train.steps) if self.settings.meta_trains else 0
    self.best_metric = f"{self.task}/accuracy"

  def valid_it(self):
    meta = self.config.meta
    return episode_iterator(
      self.config, self.tokenizer, "valid", meta.test_seed + 1, meta.valid_episodes
    )

  def test_it(self):
    return test_episode_iterator(self.config, self.tokenizer)

  def init_params(self, rng: jax.Array) -> Any:
    """The model's params, plus Meta-SGD's learned inner learning rates."""
    params = self.model_init(rng)
    if self.settings.meta_sgd:
      s = self.settings
      params["inner_lr"] = inner.inner_lr_tree(params, s.inner, s.inner_lr)
    return params

  def describe(self) -> str:
    return str(self.settings)

  def batches(self, run: loop.Run, start_step: int, data_state: dict):
    if data_state:
      self.train_it.set_state(data_state)
    return self.train_it

  def compile(self, run: loop.Run, shardings: Any) -> None:
    self.meta_step = parallel.compile_train_step(
      lambda axis: make_meta_step(self.learner, axis),
      self.config.parallel.mode,
      run.mesh,
      shardings,
      run.batch_sharding,
    )
    self.eval_step = jax.jit(
      make_eval_step(self.learner),
      in_shardings=(shardings.params, run.batch_sharding),
      out_shardings=parallel.replicated(run.mesh),
    )

  def step_fn(self, step: int):
    return self.meta_step

  def train_record(self, host: list[dict], first: int, done: int) -> dict[str, float]:
    skip = {"loss", "grad_norm", "examples", "nonfinite_streak", "nonfinite_total"}
    return {k: float(np.mean([m[k] for m in host])) for k in host[-1] if k not in skip}

  def evaluate(self, run: loop.Run, params: Any, step: int) -> dict[str, dict[str, Any]]:
    if not self.config.meta.valid_episodes:
      return {}
    return {self.task: mean_ci95(evaluate(self.eval_step, params, self.valid_it(), run.put))}

  def finish(self, run: loop.Run, state: Any, last_eval: dict) -> dict[str, Any]:
    """Scores the held-out meta-test episodes (resumable: :class:`MetaTestProgress`)."""
    meta, settings, task = self.config.meta, self.settings, self.task
    key = {"step": self.steps, "params": params_checksum(state.params), "meta": meta.to_dict()}
    path = run.workdir / "meta_test_progress.json"
    progress = MetaTestProgress(path, key, run.print, run.is_main)
    accs = evaluate(self.eval_step, state.params, self.test_it(), run.put, progress)
    progress.done()
    test = mean_ci95(accs)
    run.print(
      f"meta-test {settings.algorithm} {meta.n_way}-way {meta.k_shot}-shot on "
      f"{self.test_data.name}: accuracy {test['accuracy']:.4f} ± {test['ci95']:.4f} over "
      f"{test['episodes']} episodes"
    )
    run.write(self.steps, "test", {"task": task, "test_data": self.test_data.name, **test})
    if run.is_main:
      np.save(run.workdir / "test_episode_accuracy.npy", accs)
    task_cfg = single_task(self.config)[1]
    return {
      "eval": {task: test},
      "train_examples_unit": "episodes",
      "test_wall_s": progress.wall_s(),
      "meta": {
        "algorithm": settings.algorithm,
        "n_way": meta.n_way,
        "k_shot": meta.k_shot,
        "q_query": meta.q_query,
        "inner": list(settings.inner),
        "inner_steps": settings.inner_steps,
        "eval_inner_steps": settings.eval_inner_steps,
        "first_order": settings.first_order,
        "head_init": settings.head_init,
        "meta_sgd": settings.meta_sgd,
        "data": task_cfg.data.name,
        "class_split_run": task_cfg.data.few_shot.run,
        # The meta-test episodes' data set and class split (the task's own unless meta.test_data).
        "test_data": self.test_data.name,
        "test_class_split_run": self.test_data.few_shot.run,
        "test_seed": meta.test_seed,
      },
    }
