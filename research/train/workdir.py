"""One run per workdir: an exclusive lock file, taken before the run writes anything.

Two runs writing one workdir interleave their metrics, overwrite each other's config.json and
race on checkpoint directories. ``workdir/.lock`` holds the holder's host, pid and start time;
it is created atomically (``O_CREAT | O_EXCL``), removed when the run ends, and taken over when
its pid is gone on this host (a killed run leaves it behind). Only process 0 of a multi-host run
takes it: the other processes are the same run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's live process.
    return True
  return True


def _holder(path: Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return None


@contextlib.contextmanager
def locked(workdir: Path, enabled: bool = True) -> Iterator[None]:
  """Holds ``workdir/.lock`` for the duration of the block.

  Args:
    workdir: the run directory (created if missing).
    enabled: False on the processes that do not write (they share process 0's lock).

  Raises:
    WorkdirBusyError: a live run (this host's pid still running, or a run on another host)
      holds the lock; the message names it.
  """
  if not enabled:
    yield
    return
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_NAME
  me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
  # The lock appears with its content in one step (a hard link to a written temp file), so a
  # kill can never leave an empty lock file that no one could tell from a live holder.
  claim = workdir / f"{LOCK_NAME}.{me['host']}.{me['pid']}"
  claim.write_text(json.dumps(me))
  try:
    _take(path, claim, me, workdir)
  finally:
    claim.unlink(missing_ok=True)
  try:
    yield
  finally:
    if (_holder(path) or {}).get("pid") == me["pid"]:
      path.unlink(missing_ok=True)


def _create(path: Path, claim: Path) -> None:
  """Creates ``path`` with ``claim``'s content; FileExistsError if it exists."""
  try:
    os.link(claim, path)
  except FileExistsError:
    raise
  except OSError:  # A file system without hard links: exclusive create, then write.
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
      f.write(claim.read_text())


def _take(path: Path, claim: Path, me: dict, workdir: Path) -> None:
  """Creates the lock ``path`` for ``me``, replacing a dead holder's; raises if one lives."""
  for _ in range(2):
    try:
      _create(path, claim)
    except FileExistsError:
      holder = _holder(path)
      stale = holder is not None and holder.get("host") == me["host"] and not _alive(holder["pid"])
      if not stale:
        who = (
          f"pid {holder['pid']} on {holder['host']} since "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['started']))}"
          if holder
          else "an unreadable lock file"
        )
        raise WorkdirBusyError(
          f"{workdir} is in use by another run ({who}); wait for it, pick another --workdir, "
          f"or delete {path} if that run is gone"
        ) from None
      path.unlink(missing_ok=True)  # Its pid is gone: a killed run's lock.
      continue
    return
  raise WorkdirBusyError(f"{workdir}: could not take {path} (another run keeps taking it)")
