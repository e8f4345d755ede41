"""Orbax checkpoints of a run: the latest states (to resume) and the best params (to use).

``workdir/checkpoints/<step>`` holds the whole TrainState plus the input iterator position,
step-numbered, atomic, ``max_to_keep`` of them, written asynchronously. ``workdir/best/<step>``
holds only the params of the best evaluation so far by ``train.best_metric``. Before a restore
the saved tree is compared with the one the config builds, so a workdir holding another model
fails naming the first path that differs, not with an opaque shape error deep in orbax.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from research import errors, paths

STATE_FIELDS = ("step", "params", "opt_state", "rng", "nonfinite_streak", "nonfinite_total")


class CheckpointMismatchError(ValueError):
  """A checkpoint whose tree does not fit the model the config builds."""


class CheckpointCorruptError(RuntimeError):
  """No checkpoint of a workdir reads back."""


class CheckpointWriteError(errors.RunError):
  """A checkpoint could not be written (a full disk, a quota): the run stops, one line.

  The write went to a temporary directory, so the checkpoints committed before it are
  untouched and a rerun resumes from the newest; the partial one is removed at that start.
  """


class _OrbaxWriteErrorLogs(logging.Filter):
  """Drops orbax's ERROR records (a traceback per background thread, several per failure):
  the failure reaches the loop as one :class:`CheckpointWriteError`, whose cause holds the
  same traceback for ``--verbose``. ``RESEARCH_VERBOSE=1`` keeps them."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname


def _quiet_orbax_errors() -> None:
  absl = logging.getLogger("absl")  # absl.logging's records, orbax's included.
  if not errors.verbose_from_env() and not any(
    isinstance(f, _OrbaxWriteErrorLogs) for f in absl.filters
  ):
    absl.addFilter(_OrbaxWriteErrorLogs())


def _reason(exc: BaseException) -> str:
  """The operating system's words for a failed write (``No space left on device``), else the
  first line of the message: tensorstore's own run to several hundred characters."""
  text = str(exc)
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
  if isinstance(exc, OSError) and exc.strerror:
    return f"{exc.strerror} (errno {exc.errno})"
  first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
  return first if len(first) <= 200 else first[:200] + "..."


def state_tree(state: Any) -> dict[str, Any]:
  """The saved part of a TrainState (its optimizer, a static field, is rebuilt from config)."""
  return {k: getattr(state, k) for k in STATE_FIELDS}


def _shapes(tree: Any) -> dict[str, tuple]:
  return {p: tuple(getattr(x, "shape", np.shape(x))) for p, x in paths.flatten(tree).items()}


def check_compatible(saved: Any, expected: Any, where: str) -> None:
  """Raises naming the first path missing, extra or differently shaped in ``saved``."""
  have, want = _shapes(saved), _shapes(expected)
  for path, shape in want.items():
    if path not in have:
      raise CheckpointMismatchError(f"{where}: checkpoint has no {path} (expected {shape})")
    if have[path] != shape:
      raise CheckpointMismatchError(
        f"{where}: {path} has shape {have[path]} in the checkpoint but {shape} in this model"
      )
  extra = [p for p in have if p not in want]
  if extra:
    raise CheckpointMismatchError(f"{where}: checkpoint holds {extra[0]}, absent in this model")


def state_handlers() -> dict[str, Any]:
  """Item handlers of a state checkpoint, so a fresh manager can read its metadata."""
  return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


@functools.cache
def _save_replicated_arrays_whole() -> None:
  """On CPU, saves each replicated array from one device instead of orbax's replica-parallel
  slices. Those split a replicated array over its devices, each writing one slice, at the cost
  of compiling a slice per device and shape in every process (72 compilations on 8 simulated
  devices for MiniLM's first save); on CPU the copies they share out are a memcpy. The files
  are the same either way. orbax's own default stands elsewhere (off on GPUs, on on TPUs)."""
  if jax.default_backend() != "cpu":
    return
  handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
  absl = logging.getLogger("absl")  # orbax warns (absl logging) that it overrides jax.Array's.
  level = absl.level
  absl.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl.setLevel(level)


class Checkpoints:
  """The run's checkpoint managers (latest and best)."""

  def __init__(
    self,
    workdir: str | os.PathLike,
    max_to_keep: int = 2,
    best_metric: str | None = None,
    best_mode: str = "max",
  ):
    root = Path(workdir).absolute()
    _quiet_orbax_errors()
    _save_replicated_arrays_whole()
    self._saving: int | None = None  # The step of the last save asked for (it may be async).
    self.latest = ocp.CheckpointManager(
      root / "checkpoints",
      # A killed save leaves a *.orbax-checkpoint-tmp-* directory: removed at start.
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
      ),
      item_handlers=state_handlers(),
    )
    self.best = None
    if best_metric:
      self.best = ocp.CheckpointManager(
        root / "best",
        options=ocp.CheckpointManagerOptions(
          max_to_keep=1,
          best_fn=lambda m: m[best_metric],
          best_mode=best_mode,
          create=True,
          cleanup_tmp_directories=True,
        ),
        item_handlers={"params": ocp.StandardCheckpointHandler()},
      )

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def committed_steps(self) -> list[int]:
    """The steps whose directory is complete (renamed from its temporary name), on disk."""
    root = Path(self.latest.directory)
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []

  def _write_error(self, step: int | None, exc: Exception, where: str) -> CheckpointWriteError:
    """The one-line error of a failed write; an async save's failure surfaces at the next save
    or wait, so ``step`` is the one asked for last that did not commit."""
    committed = self.committed_steps()
    if self._saving is not None and self._saving not in committed:
      step = self._saving
    named = f"checkpoint {step}" if step is not None else "a checkpoint"
    resume = (
      f"the committed checkpoints {committed} are untouched: free space and rerun the same "
      f"command to resume from step {committed[-1]}"
      if committed
      else "no checkpoint was committed yet: free space and rerun the same command"
    )
    return CheckpointWriteError(f"could not write {named} in {where}: {_reason(exc)}; {resume}")

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Saves ``state`` and the input position at ``step`` (asynchronously).

    Raises:
      CheckpointWriteError: this write, or the asynchronous one before it, failed.
    """
    try:
      self.latest.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state_tree(state)), data=ocp.args.JsonSave(data_state)
        ),
      )
    except Exception as e:  # tensorstore's ValueError, an OSError, ...: all one line.
      raise self._write_error(step, e, str(self.latest.directory)) from e
    self._saving = step

  def save_best(self, step: int, params: Any, metrics: dict[str, float]) -> None:
    if self.best is not None:
      try:
        self.best.save(
          step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), metrics=metrics
        )
      except Exception as e:
        raise CheckpointWriteError(
          f"could not write the best params of step {step} in {self.best.directory}: "
          f"{_reason(e)}; free space and rerun the same command to resume"
        ) from e

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """``(state, data_state)`` at ``step`` (default latest), shaped and sharded as the target."""
    return restore_state(self.latest, abstract_state, step)

  def restore_newest_intact(
    self, abstract_state: Any, log: Callable[[str], None]
  ) -> tuple[Any, dict, int]:
    """``(state, data_state, step)`` of the newest checkpoint that reads back.

    A checkpoint cut short or damaged (a crash or a full disk mid-write, flipped bytes) is
    reported in one line naming its step and path, and the one before it is tried; a
    checkpoint of another model is not damage and raises at once. A damaged checkpoint is moved
    to ``checkpoints_damaged/<step>`` beside ``checkpoints/`` (kept for a look, out of the
    way of the steps the resumed run saves again).

    Raises:
      CheckpointMismatchError: the newest checkpoint holds another model.
      CheckpointCorruptError: no checkpoint of the workdir reads back.
    """
    steps = sorted(self.latest.all_steps(), reverse=True)
    for step in steps:
      try:
        state, data_state = restore_state(self.latest, abstract_state, step)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # orbax / tensorstore / JSON errors of a damaged directory.
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        where = Path(self.latest.directory) / str(step)
        aside = where.parent.parent / "checkpoints_damaged" / str(step)
        log(
          f"checkpoint {where} is unreadable ({type(e).__name__}: {first}); moved to {aside}, "
          "trying the one before it"
        )
        if jax.process_index() == 0:
          aside.parent.mkdir(exist_ok=True)
          if aside.exists():
            aside = aside.with_name(f"{step}.{os.getpid()}")
          where.rename(aside)
        self.latest.reload()
        continue
      return state, data_state, step
    raise CheckpointCorruptError(
      f"{self.latest.directory}: none of the checkpoints {sorted(steps)} reads back; move the "
      "directory away to start over"
    )

  def wait(self) -> None:
    """Blocks until the asynchronous writes are done.

    Raises:
      CheckpointWriteError: one of them failed.
    """
    try:
      self.latest.wait_until_finished()
    except Exception as e:
      raise self._write_error(None, e, str(self.latest.directory)) from e
    if self.best is not None:
      try:
        self.best.wait_until_finished()
      except Exception as e:
        raise CheckpointWriteError(
          f"could not write the best params in {self.best.directory}: {_reason(e)}; free "
          "space and rerun the same command to resume"
        ) from e

  def close(self) -> None:
    self.wait()
    self.latest.close()
    if self.best is not None:
      self.best.close()


def restore_state(manager, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
  step = manager.latest_step() if step is None else step
  where = f"{manager.directory}/{step}"
  meta = manager.item_metadata(step)
  target = state_tree(abstract_state)
  check_compatible(meta["state"]["params"], target["params"], where)
  check_compatible(meta["state"], target, where)
  restored = manager.restore(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()),
  )
  return abstract_state.replace(**restored["state"]), dict(restored["data"] or {})


def load_params(run_dir: str | os.PathLike, prefer: str = "best") -> tuple[Any, str]:
  """Params of another run as host numpy arrays, and where they came from.

  Args:
    run_dir: the run's workdir.
    prefer: 'best' (its best evaluation, falling back to the latest state) or 'latest'.

  Raises:
    FileNotFoundError: no checkpoint under ``run_dir``.
  """
  root = Path(run_dir).absolute()
  order = [("best", "params"), ("checkpoints", "state")]
  if prefer == "latest":
    order.reverse()
  for sub, item in order:
    if not (root / sub).is_dir():
      continue
    manager = ocp.CheckpointManager(
      root / sub,
      options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={item: ocp.StandardCheckpointHandler()},
    )
    step = manager.latest_step()
    if sub == "best":
      step = manager.best_step() or step
    if step is None:
      continue
    meta = manager.item_metadata(step)[item]
    abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=_host_sharding()), meta
    )
    restored = manager.restore(
      step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)})
    )[item]
    params = restored if item == "params" else restored["params"]
    return jax.tree.map(np.asarray, params), f"{root / sub}/{step}"
  raise FileNotFoundError(f"{root}: no orbax checkpoint under best/ or checkpoints/")


def _host_sharding():
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
