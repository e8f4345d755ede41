"""The one training loop. Every training program runs through :func:`run`.

A *program* is what varies between kinds of training: supervised fine-tuning of one task or
several (:mod:`research.train.trainer`), meta-learning over episodes
(:mod:`research.meta.trainer`), or one a user writes (docs/extending.md). It builds its model,
says how many steps it trains, hands out host batches from a positionable iterator, gives the
jitted step for each step, evaluates params and writes its final report fields.

Everything else is the loop's, written once: the run directory and its config.json, the state
(restored from the workdir's checkpoint, ``resume_from``, a graft, or scratch:
:mod:`research.train.setup`), prefetching batches to the devices, step counting, the log / eval
/ checkpoint schedule, checkpoints holding the state and the input position (so a killed run
resumes on the same trajectory), the non-finite guard, metrics.jsonl / TensorBoard / the
progress bar, SIGTERM preemption (a checkpoint at the current step, then :class:`Preempted`),
and results.json. The host reads device values only every ``train.log_every`` steps.
"""

from __future__ import annotations

import collections
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

from research import optim, paths
from research.train import checkpoints as ckpt_lib
from research.train import parallel, setup
from research.train import segments as segments_lib
from research.train import workdir as workdir_lib
from research.train.metrics import MetricWriter, peak_memory
from research.train.state import TrainState

BatchHook = Callable[[int, dict], dict]


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite steps; the last good checkpoint is kept."""


class Preempted(Exception):
  """SIGTERM arrived: the state at ``step`` is checkpointed; rerunning the command resumes."""

  def __init__(self, step: int, where: str):
    super().__init__(
      f"preempted (SIGTERM) after step {step}: checkpoint saved in {where}; rerun the same "
      "command to resume"
    )
    self.step = step


class PositionedIterator(Protocol):
  """Host batches with a saveable position (grain iterators, the multi-task mixture, ...)."""

  def __next__(self) -> dict[str, np.ndarray]: ...

  def get_state(self) -> dict[str, Any]: ...

  def set_state(self, state: dict[str, Any]) -> None: ...


class Run:
  """What the loop gives a program: the config, where to write, the mesh and how to put a
  host batch on it, and how to print a line (through the progress bar on process 0)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: Path, mesh: jax.sharding.Mesh):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.is_main = jax.process_index() == 0
    self.batch_sharding = parallel.batch_sharding(mesh)
    self.print: Callable[[str], None] = (
      (lambda line: print(line, file=sys.stderr, flush=True)) if self.is_main else (lambda _: None)
    )
    # ``write(step, split, record)``: one metrics.jsonl / TensorBoard event (process 0).
    self.write: Callable[[int, str, dict], None] = lambda step, split, record: None
    # Paths of the leaves the optimizer trains (set before ``compile``): the only ones a train
    # step differentiates (research.train.steps.make_train_step).
    self.trainable: frozenset[str] | None = None

  def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A process-local host batch as one global array per field, split over the mesh."""
    return parallel.global_batch(batch, self.batch_sharding)

  def write_file(self, name: str, text: str) -> None:
    """Writes ``workdir/name`` on process 0 (the one that writes logs and results)."""
    if self.is_main:
      (self.workdir / name).write_text(text)


class Program:
  """What varies between training programs; :func:`run` owns everything else.

  The loop calls, in order: :meth:`build` (validate inputs, build the model: nothing written
  yet), :meth:`init_params` through the state plan, :meth:`batches` (only when ``steps > 0``)
  and :meth:`compile`, then :meth:`step_fn` / :meth:`train_record` every step and log window,
  :meth:`evaluate` on the eval schedule, and :meth:`finish` once at the end.

  Attributes (set by :meth:`build`):
    steps: steps to train (0: evaluate only).
    tasks: task names, for results.json.
    eval_split: the metrics.jsonl split of periodic evaluations.
    best_metric / best_mode: which ``<task>/<metric>`` of an evaluation picks ``best/``.
  """

  steps: int = 0
  tasks: list[str]
  eval_split: str = "eval"
  best_metric: str | None = None
  best_mode: str = "max"

  def build(self, run: Run) -> None:
    """Validates the config and data (before anything is written) and builds the model."""
    raise NotImplementedError

  def init_params(self, rng: jax.Array) -> Any:
    """``rng -> params``, traced by ``jax.eval_shape`` and jitted with the params' shardings."""
    raise NotImplementedError

  def files(self) -> dict[str, str]:
    """Files the program writes into the run directory at the start, ``{name: text}``."""
    return {}

  def describe(self) -> str:
    """A line printed after ``init:`` (e.g. the algorithm's settings)."""
    return ""

  def batches(self, run: Run, start_step: int, data_state: dict) -> PositionedIterator:
    """The training batches from ``start_step`` on, positioned at ``data_state`` if given."""
    raise NotImplementedError

  def compile(self, run: Run, shardings: TrainState) -> None:
    """Builds the jitted train and eval steps for the state's ``shardings``."""
    raise NotImplementedError

  def step_fn(self, step: int) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted, donating ``(state, batch) -> (state, metrics)`` that trains step ``step``.

    Its metrics hold at least ``loss``, ``grad_norm``, ``examples``, ``nonfinite_streak`` and
    ``nonfinite_total``.
    """
    raise NotImplementedError

  def train_record(self, host: list[dict], first: int, done: int) -> dict[str, float]:
    """Extra fields of the train record of steps ``first..done`` (1-based), beside the loop's
    ``loss`` / ``grad_norm`` / ``lr`` / ``nonfinite_total``."""
    return {}

  def evaluate(self, run: Run, params: Any, step: int) -> dict[str, dict[str, Any]]:
    """``{task: metrics}`` of ``params`` (``{}``: nothing to evaluate)."""
    raise NotImplementedError

  def finish(self, run: Run, state: TrainState, last_eval: dict[str, dict]) -> dict[str, Any]:
    """The program's results.json fields (at least ``eval``), after the last step."""
    raise NotImplementedError


class Prefetcher:
  """Puts the next ``depth`` batches on device ahead of the step, remembering input positions.

  ``state()`` is the input iterator position *before* the first batch not yet handed out, which
  is what a checkpoint after the current step must hold. With ``stop``, no batch of step
  ``stop`` or later is read.
  """

  def __init__(
    self,
    it: PositionedIterator,
    put: Callable[[dict], Any],
    depth: int = 2,
    hook: BatchHook | None = None,
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


class _PreemptionFlag:
  """Set by SIGTERM while the loop runs (the previous handler is restored afterwards).

  With several processes the flag is agreed on at log steps (an all-gather), so every process
  stops after the same step and writes the same checkpoint.
  """

  def __init__(self):
    self.raised = False

  @contextlib.contextmanager
  def installed(self) -> Iterator[_PreemptionFlag]:
    if threading.current_thread() is not threading.main_thread():
      yield self  # Signal handlers can only be set from the main thread.
      return
    previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "raised", True))
    try:
      yield self
    finally:
      signal.signal(signal.SIGTERM, previous)

  def agreed(self, at_log_step: bool) -> bool:
    if jax.process_count() == 1:
      return self.raised
    if not at_log_step:
      return False
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(self.raised))))


def finite_mean(values: list) -> float:
  """The mean of the finite values (NaN when none is): skipped steps report a NaN loss."""
  finite = [v for v in values if np.isfinite(v)]
  return float(np.mean(finite)) if finite else float("nan")


def run(
  program: Program,
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  batch_hook: BatchHook | None = None,
) -> dict[str, Any]:
  """Trains and evaluates ``program`` on ``config`` in ``workdir``; returns results.json's dict.

  Args:
    program: what to train (see :class:`Program`).
    config: the experiment config (see configs/).
    workdir: the run directory; holding a checkpoint, the run resumes from it.
    batch_hook: ``(step, numpy batch) -> batch``, for tests that alter inputs (e.g. inject a
      NaN) or record what was seen.

  Raises:
    NonFiniteError: ``train.nonfinite_patience`` non-finite steps in a row.
    Preempted: SIGTERM arrived; the state after the current step is checkpointed.
  """
  t_start = time.time()
  run_ = Run(config, Path(workdir), parallel.make_mesh(config.parallel))
  setup.check_config(config, run_.mesh)  # Values, batch splits, init sources, data splits.
  program.build(run_)
  steps = int(program.steps)
  with workdir_lib.locked(run_.workdir, enabled=run_.is_main):
    results = _train(program, run_, steps, batch_hook, t_start)
    run_.write_file("results.json", json.dumps(results, indent=2) + "\n")
  return results


def _train(
  program: Program, run_: Run, steps: int, batch_hook: BatchHook | None, t_start: float
) -> dict[str, Any]:
  """The loop proper, with the workdir locked; returns the results dict."""
  config, tcfg = run_.config, run_.config.train
  plan = setup.plan_state(config, program.init_params, run_.mesh, max(int(tcfg.steps), 1))
  ckpts = ckpt_lib.Checkpoints(
    run_.workdir,
    max_to_keep=tcfg.max_to_keep,
    best_metric=program.best_metric,
    best_mode=program.best_mode,
  )
  return _steps(program, run_, steps, batch_hook, t_start, plan, ckpts)


class _StepProfiler:
  """``train.profile_steps = (first, stop)``: a jax.profiler trace of steps ``[first, stop)``
  in ``directory`` (TensorBoard's profile plugin or Perfetto read it), from the main process.
  The steps before ``first`` compile, so the trace holds steady-state steps only; the trace
  stops early if the run ends or fails inside the window."""

  def __init__(self, steps: Any, directory: Path, enabled: bool):
    self.first, self.stop = (int(x) for x in steps)
    self.directory, self.enabled, self.active = directory, enabled and self.stop > self.first, False

  def before(self, step: int) -> None:
    if self.enabled and step == self.first:
      jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, outputs: Any, print_fn: Callable[[str], None]) -> None:
    if self.active and step + 1 == self.stop:
      jax.block_until_ready(outputs)
      self._end()
      print_fn(f"profile of steps {self.first}-{self.stop - 1}: {self.directory}")

  def _end(self) -> None:
    self.active = False
    jax.profiler.stop_trace()

  def __enter__(self) -> _StepProfiler:
    return self

  def __exit__(self, *exc: Any) -> None:
    if self.active:
      self._end()


def _steps(
  program: Program,
  run_: Run,
  steps: int,
  batch_hook: BatchHook | None,
  t_start: float,
  plan: setup.StatePlan,
  ckpts: ckpt_lib.Checkpoints,
) -> dict[str, Any]:
  """From the first state to the results dict: restore or init, then the step loop."""
  config, tcfg = run_.config, run_.config.train
  if run_.is_main:
    for line in plan.summary:
      run_.print(line)
  report_path = run_.workdir / "graft_report.txt" if run_.is_main else None
  # Restored (a workdir of another model fails here, having written nothing) or created.
  state, data_state, origin = setup.first_state(plan, config, ckpts, run_.print, report_path)
  start_step = int(state.step)
  run_.write_file("config.json", config.to_json_best_effort(indent=2) + "\n")
  for name, text in program.files().items():
    run_.write_file(name, text)
  run_.write_file("optim_summary.txt", "\n".join(plan.summary) + "\n")
  writer = MetricWriter(
    run_.workdir,
    total_steps=steps,
    initial_step=start_step,
    enabled=run_.is_main,
    progress=tcfg.progress,
    progress_every_s=tcfg.progress_every_s,
  )
  writer.drop_after(start_step)  # A resumed run rewrites what the killed one logged later.
  run_.print, run_.write = writer.print, writer.write
  # This process's figures beside those of the segments before it (a resumed run).
  segments = segments_lib.Segments(run_.workdir, start_step, t_start, enabled=run_.is_main)
  writer.print(" ".join(filter(None, [f"init: {origin};", program.describe()])).rstrip(";"))
  labels = paths.flatten(optim.freeze_labels(plan.optim, plan.abstract_params))
  counts = optim.count_params(plan.abstract_params, paths.unflatten(labels))
  run_.trainable = frozenset(p for p, label in labels.items() if label == optim.TRAINABLE)
  batches = None
  if steps > start_step:  # An evaluation-only run (steps=0) reads no training data.
    batches = Prefetcher(
      program.batches(run_, start_step, data_state),
      run_.put,
      hook=batch_hook,
      start_step=start_step,
      stop=steps,
    )
  program.compile(run_, plan.shardings)

  def evaluate(done: int) -> dict[str, dict]:
    out = program.evaluate(run_, state.params, done)
    scores = {}
    for task, metrics in out.items():
      scalars = paths.flatten(metrics)  # Nested breakdowns become "per_type/PER/f1".
      writer.write(done, program.eval_split, {"task": task, **scalars})
      shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
      writer.print(f"step {done}: {program.eval_split} {task} {shown}")
      scores.update({f"{task}/{k}": float(v) for k, v in scalars.items()})
    if scores:
      ckpts.save_best(done, state.params, scores)
    return out

  pending: list[dict] = []
  last_eval: dict[str, dict] = {}
  t_window, first_window = time.time(), True  # The window being trained started at t_window.
  patience = tcfg.nonfinite_patience
  schedule = optim.lr_schedule(plan.optim, max(int(tcfg.steps), 1))
  profiler = _StepProfiler(tcfg.profile_steps, run_.workdir / "profile", run_.is_main)
  with _PreemptionFlag().installed() as preemption, profiler:
    for step in range(start_step, steps):
      profiler.before(step)
      state, metrics = program.step_fn(step)(state, next(batches))
      profiler.after(step, (state, metrics), writer.print)
      if step == start_step:  # Waits for this one step: results.json's time_to_first_step_s.
        jax.block_until_ready((state, metrics))
        segments.first_step_done()
      pending.append(metrics)
      done = step + 1
      at_log = done % tcfg.log_every == 0 or done == steps
      if at_log:
        host = jax.device_get(pending)  # The only device->host sync of the loop.
        pending = []
        examples = float(sum(m["examples"] for m in host))
        # The segment's first window holds the compilations: counted, but not in the rates.
        segments.window(done, len(host), examples, time.time() - t_window, not first_window)
        first = done - len(host) + 1
        record = {
          "loss": finite_mean([m["loss"] for m in host]),
          "grad_norm": float(np.mean([m["grad_norm"] for m in host])),
          "lr": float(schedule(done - 1)),
          "nonfinite_total": int(host[-1]["nonfinite_total"]),
          **program.train_record(host, first, done),
        }
        skipped = [first + i for i, m in enumerate(host) if m["nonfinite_streak"]]
        writer.write(done, "train", record)
        writer.advance(len(host), examples=examples, loss=record["loss"])
        segments.save()
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
        t_window, first_window = time.time(), False
      if tcfg.eval_every and (done % tcfg.eval_every == 0 or done == steps):
        t_eval = time.time()
        last_eval = evaluate(done) or last_eval
        t_window += time.time() - t_eval  # Evaluation time is not training time.
      saved = False
      if tcfg.checkpoint_every and (done % tcfg.checkpoint_every == 0 or done == steps):
        ckpts.save(done, state, batches.state())
        saved = True
      if done < steps and preemption.agreed(at_log):
        if not saved:
          ckpts.save(done, state, batches.state())
        ckpts.wait()
        ckpts.close()
        segments.save()
        writer.close()
        raise Preempted(done, f"{ckpts.latest.directory}/{done}")
  ckpts.wait()
  ckpts.close()
  finished = program.finish(run_, state, last_eval)
  writer.close()
  segments.save()
  totals = segments.totals()  # Every segment's work: a resumed run is not its last segment.
  return {
    "config": config.experiment,
    "tasks": list(program.tasks),
    "steps": steps,
    **finished,
    **{
      k: totals.pop(k)
      for k in ("train_examples_per_sec", "step_time_s", "wall_s", "time_to_first_step_s")
    },
    **peak_memory(),
    "params": counts,
    "init": origin,
    **totals,
  }


PROGRAMS: dict[str, type[Program]] = {}


def register_program(name: str) -> Callable[[type[Program]], type[Program]]:
  """Class decorator: ``config.program = name`` runs this program."""

  def add(cls: type[Program]) -> type[Program]:
    if name in PROGRAMS and PROGRAMS[name] is not cls:
      raise ValueError(f"training program {name!r} is already registered ({PROGRAMS[name]})")
    PROGRAMS[name] = cls
    return cls

  return add


def program_for(config: ml_collections.ConfigDict) -> type[Program]:
  """The registered program class named by ``config.program``.

  Raises:
    KeyError: no program of that name is registered (the message lists those that are).
  """
  name = config.program
  if name not in PROGRAMS:
    raise KeyError(f"config.program={name!r}: no such training program; known: {sorted(PROGRAMS)}")
  return PROGRAMS[name]


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  batch_hook: BatchHook | None = None,
) -> dict[str, Any]:
  """Runs ``config``'s training program (``config.program``) in ``workdir``.

  Args:
    config: the experiment config (see configs/).
    workdir: the run directory; holding a checkpoint, the run resumes from it.
    batch_hook: ``(step, numpy batch) -> batch``, for tests that alter inputs.

  Returns:
    The results.json dict.
  """
  return run(program_for(config)(config), config, workdir, batch_hook=batch_hook)
