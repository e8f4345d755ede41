"""``train_and_evaluate(config, workdir)`` for meta-learning runs (``config.trainer == 'meta'``).

A second small trainer beside research.train.trainer, sharing its pieces: the TaskModel and its
graft from the pretrained checkpoint, the optax chain with freeze masks (the outer optimizer),
the mesh and :func:`research.train.parallel.compile_train_step`, orbax checkpoints holding the
state and the episode iterator position (exact resume), and the MetricWriter.

Episodes come from :mod:`research.data.episodes` over the published class splits: meta-train
episodes from the ``train`` classes, validation episodes (``eval_every``) from ``valid``, and
the final ``meta.test_episodes`` from ``test``, drawn with ``meta.test_seed`` so every algorithm
and baseline (``finetune``, ``protonet``; ``train.steps=0`` for no meta-training) is scored on
the same episodes. results.json holds ``eval.<task>.accuracy`` with its 95% confidence interval
(``ci95``: 1.96 standard errors over episodes), beside the usual contract fields.
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

from research import optim
from research.data import episodes as episodes_lib
from research.meta import inner
from research.meta.algorithms import MetaLearner, settings_from_config
from research.meta.steps import make_eval_step, make_meta_step
from research.train import checkpoints as ckpt_lib
from research.train import parallel, setup
from research.train.metrics import MetricWriter
from research.train.state import build_model, init_fn
from research.train.trainer import Prefetcher, _single_task, _tokenizer, open_workdir


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


def episode_iterator(config, tokenizer, class_split: str, seed: int, episodes: int | None):
  """Episodes of ``class_split``; ``episodes`` fixes a finite evaluation set (else endless)."""
  meta, (_, task_cfg) = config.meta, _single_task(config)
  per_batch = meta.episodes_per_batch if episodes is None else meta.eval_episodes_per_batch
  if episodes is not None and episodes % per_batch:
    raise ValueError(
      f"{episodes} {class_split} episodes must divide by meta.eval_episodes_per_batch={per_batch}"
    )
  return episodes_lib.build_episode_iterator(
    task_cfg.data,
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Meta-trains (``train.steps`` outer steps, possibly 0) and scores held-out episodes.

  Args:
    config: an experiment config with ``trainer='meta'`` and a ``meta`` block (see
      configs/intent_fewshot_maml.py).
    workdir: the run directory; holding a checkpoint, the run resumes from it exactly.

  Returns:
    The results.json dict.

  Raises:
    ValueError: a bad episode shape for a class split (``n_way`` above its classes, or a class
      with fewer than ``k_shot + q_query`` examples, named with its count), or bad settings.
  """
  t_start = time.time()
  workdir, is_main = open_workdir(config, workdir)
  task, _ = _single_task(config)
  meta, tcfg = config.meta, config.train
  settings = settings_from_config(meta)
  tokenizer = _tokenizer(config)
  # Episode iterators first: a bad N or K fails here, before anything is compiled.
  train_it = episode_iterator(config, tokenizer, "train", config.seed, None)
  valid_it = lambda: episode_iterator(
    config, tokenizer, "valid", meta.test_seed + 1, meta.valid_episodes
  )
  test_it = lambda: episode_iterator(config, tokenizer, "test", meta.test_seed, meta.test_episodes)
  valid_it(), test_it()

  model, _ = build_model(config, {task: meta.n_way})
  learner = MetaLearner(model, task, settings)
  mesh = parallel.make_mesh(config.get("parallel"))
  parallel.check_batch_size(meta.episodes_per_batch, mesh, "meta.episodes_per_batch")
  parallel.check_batch_size(meta.eval_episodes_per_batch, mesh, "meta.eval_episodes_per_batch")

  # --- State: the model's params (+ Meta-SGD's learned inner LRs), outer optimizer. -------
  model_init = init_fn(model)

  def init(r):
    params = model_init(r)
    if settings.meta_sgd:
      params["inner_lr"] = inner.inner_lr_tree(params, settings.inner, settings.inner_lr)
    return params

  plan = setup.plan_state(config, init, mesh, max(tcfg.steps, 1))
  abstract_params, shardings = plan.abstract_params, plan.shardings
  ckpts = ckpt_lib.Checkpoints(
    workdir, max_to_keep=tcfg.max_to_keep, best_metric=f"{task}/valid_accuracy"
  )
  writer = MetricWriter(
    workdir,
    total_steps=tcfg.steps if settings.meta_trains else 0,
    enabled=is_main,
    progress=tcfg.get("progress", True),
  )
  for line in plan.summary:
    writer.print(line)
  report_path = workdir / "graft_report.txt" if is_main else None
  state, data_state, origin = setup.first_state(plan, config, ckpts, writer.print, report_path)
  writer.print(f"init: {origin}; {settings}")
  counts = optim.count_params(abstract_params, optim.freeze_labels(config.optim, abstract_params))

  # --- Steps. -----------------------------------------------------------------------------
  bsharding = parallel.batch_sharding(mesh)
  put = lambda b: parallel.global_batch(b, bsharding)
  if data_state:
    train_it.set_state(data_state)
  start_step = int(state.step)
  steps = tcfg.steps if settings.meta_trains else 0
  batches = Prefetcher(train_it, put, start_step=start_step)
  meta_step = parallel.compile_train_step(
    lambda axis: make_meta_step(learner, axis), config.parallel.mode, mesh, shardings, bsharding
  )
  eval_step = jax.jit(
    make_eval_step(learner),
    in_shardings=(shardings.params, bsharding),
    out_shardings=parallel.replicated(mesh),
  )

  # --- The loop. --------------------------------------------------------------------------
  pending: list[dict] = []
  train_time, episodes_seen, t_log = 0.0, 0.0, None
  for step in range(start_step, steps):
    state, metrics = meta_step(state, next(batches))
    pending.append(metrics)
    done = step + 1
    if done % tcfg.log_every == 0 or done == steps:
      host = jax.device_get(pending)  # The only device->host sync of the loop.
      pending = []
      now = time.time()
      if t_log is not None:
        train_time += now - t_log
        episodes_seen += float(sum(m["examples"] for m in host))
      record = {k: float(np.mean([m[k] for m in host])) for k in host[-1] if k != "examples"}
      writer.write(done, "train", record)
      writer.advance(len(host), loss=record["loss"])
      if int(host[-1]["nonfinite_streak"]) >= tcfg.get("nonfinite_patience", 5):
        ckpts.wait()
        raise RuntimeError(f"stopping at step {done}: non-finite meta-gradients in a row")
      t_log = time.time()
    if tcfg.eval_every and done % tcfg.eval_every == 0 and meta.valid_episodes:
      t_eval = time.time()
      scores = mean_ci95(evaluate(eval_step, state.params, valid_it(), put))
      writer.write(done, "valid", {"task": task, **scores})
      writer.print(f"step {done}: valid accuracy {scores['accuracy']:.4f} ± {scores['ci95']:.4f}")
      ckpts.save_best(done, state.params, {f"{task}/valid_accuracy": scores["accuracy"]})
      if t_log is not None:
        t_log += time.time() - t_eval
    if tcfg.checkpoint_every and (done % tcfg.checkpoint_every == 0 or done == steps):
      ckpts.save(done, state, batches.state())
  ckpts.wait()
  ckpts.close()

  # --- Held-out meta-test episodes. -------------------------------------------------------
  key = {"step": steps, "params": params_checksum(state.params), "meta": meta.to_dict()}
  progress = MetaTestProgress(workdir / "meta_test_progress.json", key, writer.print, is_main)
  accs = evaluate(eval_step, state.params, test_it(), put, progress)
  progress.done()
  test = mean_ci95(accs)
  writer.write(steps, "test", {"task": task, **test})
  writer.print(
    f"meta-test {settings.algorithm} {meta.n_way}-way {meta.k_shot}-shot: accuracy "
    f"{test['accuracy']:.4f} ± {test['ci95']:.4f} over {test['episodes']} episodes"
  )
  writer.close()
  if is_main:
    np.save(workdir / "test_episode_accuracy.npy", accs)
  results = {
    "config": config.get("experiment", ""),
    "tasks": [task],
    "steps": int(steps),
    "eval": {task: test},
    "train_examples_per_sec": episodes_seen / train_time if train_time else None,
    "train_examples_unit": "episodes",
    "wall_s": time.time() - t_start,
    "test_wall_s": progress.wall_s(),
    "params": counts,
    "init": origin,
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
      "data": _single_task(config)[1].data.name,
      "class_split_run": _single_task(config)[1].data.few_shot.run,
      "test_seed": meta.test_seed,
    },
  }
  if is_main:
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  return results


def default_meta_config() -> ml_collections.ConfigDict:
  """The ``config.meta`` fields with defaults (experiment configs override)."""
  return ml_collections.ConfigDict(
    dict(
      algorithm="maml",  # maml | fomaml | anil | reptile | protonet | finetune
      inner=(),  # path regexes that adapt in the inner loop; () = the algorithm's default
      inner_steps=5,
      inner_lr=0.01,
      eval_inner_steps=10,
      first_order=False,
      remat_inner=False,
      episode_loop="vmap",  # vmap | scan: the episodes of a meta-batch in parallel or in turn
      hvp="reverse",  # reverse | forward: second-order term by autodiff, or custom-VJP HVPs
      meta_sgd=False,
      head_init="zeros",  # learned | zeros | proto
      n_way=5,
      k_shot=1,
      q_query=5,
      episodes_per_batch=4,
      eval_episodes_per_batch=8,
      valid_episodes=0,
      test_episodes=600,
      test_seed=1234,
      finetune=dict(steps=20, lr=1e-4, head_init="zeros"),
    )
  )
