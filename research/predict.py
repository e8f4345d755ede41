"""Predictions from a trained run: one input per line in, one JSON object per line out.

  python -m research.main --mode=predict --workdir=runs/sst2_minilm --input=reviews.txt \
      [--output=preds.jsonl] [--task=sst2]

Uses the run's ``config.json``, ``labels.json`` and its best params (``best/``, else the
latest checkpoint); the modules of the run's ``imports`` are imported first, so a task kind
defined outside the package is found. How a line is read and a prediction written is the task
kind's (research.tasks): classification lines get ``label`` and ``probs``, regression lines a
``value``; for sentence-pair data sets a line is two texts separated by a tab. Tagging lines are
split on whitespace into words and get per-word ``tags`` and entity ``spans``; seq2seq runs
translate each line (decoding settings from the run's config) into ``translation``. Bad lines
never cost the others their output: an empty line gets ``"error": "empty line"``, a line the
kind cannot read (a pair task's line without a tab) an ``"error"`` saying why, bytes that are
not UTF-8 are replaced (with a warning naming the line), and lines longer than the model's
maximum are truncated, with one warning that counts them. A missing or empty input file, or a
workdir without a trained checkpoint, stops with one error naming it before anything is loaded
or written.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections

from research import errors
from research import tasks as task_lib
from research.data import batching
from research.train import checkpoints as ckpt_lib
from research.train.state import build_model
from research.train.steps import apply_model
from research.train.trainer import tokenizer_of


def read_lines(path: Path) -> Iterator[tuple[int, str, str | None]]:
  """``(line number, text, problem)`` for each line; undecodable bytes are replaced."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      raw = raw.rstrip(b"\r\n")
      try:
        text, problem = raw.decode("utf-8"), None
      except UnicodeDecodeError as e:
        text = raw.decode("utf-8", errors="replace")
        problem = f"not UTF-8 at byte {e.start} (0x{raw[e.start]:02x}); replaced"
        logging.warning("%s:%d: %s", path, number, problem)
      yield number, text, problem


def import_modules(names: Sequence[str]) -> None:
  """Imports ``config.imports``: modules that register task kinds (or other plug-ins) on import.

  Raises:
    ImportError: naming the module and saying how it is found (PYTHONPATH).
  """
  for name in names:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ImportError(
        f"config.imports: cannot import {name!r} ({e}); is its folder on PYTHONPATH?"
      ) from e


def check_input(path: Path) -> None:
  """Raises unless ``path`` is a file holding at least one line of text.

  Checked before the model is loaded: an empty input would otherwise give an empty output
  without a word, after the wait.

  Raises:
    research.errors.RunError: naming the file.
  """
  if not path.is_file():
    what = "a directory" if path.is_dir() else "no such file"
    raise errors.RunError(f"--input={path}: {what}; predict reads a text file, one input per line")
  with open(path, "rb") as f:
    if not any(line.strip() for line in f):
      raise errors.RunError(
        f"--input={path}: empty (no line of text); predict reads one input per line"
      )


def check_run(workdir: Path) -> None:
  """Raises unless ``workdir`` holds a run's config.json and a saved checkpoint step.

  A run that failed before its first checkpoint (or a path that is not a run) would otherwise
  fail later and far from the cause (e.g. rebuilding labels from a data set that is not there).

  Raises:
    research.errors.RunError: ``no trained checkpoint in WORKDIR (what is missing)``.
  """
  if not (workdir / "config.json").is_file():
    what = "no such directory" if not workdir.is_dir() else "no config.json: not a run directory"
    raise errors.RunError(f"no trained checkpoint in {workdir} ({what}); train into it first")
  saved = [
    step
    for sub in ("best", "checkpoints")
    if (workdir / sub).is_dir()
    for step in (workdir / sub).iterdir()
    if step.name.isdigit() and step.is_dir()
  ]
  if not saved:
    raise errors.RunError(
      f"no trained checkpoint in {workdir} (best/ and checkpoints/ hold no step: the run failed "
      "or stopped before saving one); rerun its training command to finish it"
    )


def load_run(workdir: Path, task: str | None) -> tuple[Any, str, dict[str, list[str]], Any]:
  """``(config, task, label names of every task, params)`` of a finished or running run.

  A multi-task run needs ``task`` (its model still gets every head, as in training).

  Raises:
    research.errors.RunError: no trained checkpoint in ``workdir`` (:func:`check_run`).
    research.errors.UsageError: ``task`` missing for a multi-task run, or not one of its tasks.
  """
  check_run(workdir)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  import_modules(config.get("imports", ()) or ())
  names = list(config.tasks)
  if task is None and len(names) > 1:
    raise errors.UsageError(f"{workdir} is a multi-task run: choose --task from {names}")
  task = task or names[0]
  if task not in names:
    raise errors.UsageError(f"--task={task}: {workdir} has no such task; choose from {names}")
  labels_file = workdir / "labels.json"
  if labels_file.is_file():
    labels = json.loads(labels_file.read_text())
  else:
    labels = {
      t: task_lib.get(config.tasks[t].kind).label_names(config.tasks[t].data) for t in names
    }
  params, _ = ckpt_lib.load_params(workdir, prefer="best")
  return config, task, labels, params


def predict_file(
  workdir: str | Path,
  input_path: str | Path,
  output_path: str | Path | None = None,
  *,
  task: str | None = None,
  batch_size: int = 64,
) -> Path:
  """Writes predictions for every line of ``input_path``; returns the output path.

  Raises:
    research.errors.RunError: a missing or empty input file, or no trained checkpoint in
      ``workdir``; checked before anything is loaded or written.
    research.errors.UsageError: a missing or unknown ``task`` of a multi-task run.
  """
  workdir, input_path = Path(workdir), Path(input_path)
  output_path = Path(output_path or workdir / "predictions" / f"{input_path.stem}.jsonl")
  check_input(input_path)
  config, task, all_labels, params = load_run(workdir, task)
  model, _ = build_model(config, {t: len(names) for t, names in all_labels.items()})
  task_cfg, labels = config.tasks[task], all_labels[task]
  kind = task_lib.get(task_cfg.kind)
  # The kind's tokenizer for this run: a trained vocabulary is read from the run directory only.
  tokenizer = tokenizer_of(config, task, workdir, build=False)
  lines = list(read_lines(input_path))
  results: dict[int, dict] = {}
  keep, inputs = [], []  # Lines the kind can read, and what it read.
  for i, (_, text, _) in enumerate(lines):
    if not text.strip():
      continue
    try:
      inputs.append(kind.parse_line(text, task_cfg.data))
      keep.append(i)
    except task_lib.LineError as e:
      results[i] = {"error": str(e)}
  custom = kind.predict_lines(model, params, task, task_cfg, tokenizer, inputs, batch_size)
  if custom is not None:  # The kind's own loop (seq2seq: translation).
    records, truncated = custom
    results.update(zip(keep, records))
  elif inputs:
    tok, truncated = kind.encode_inputs(tokenizer, inputs, task_cfg.data)
    step = jax.jit(lambda p, b: kind.predict(apply_model(model, p, b, task), b))
    buckets = tuple(task_cfg.data.buckets)
    for rows in batching.eval_plan(len(keep), batch_size):
      length = batching.padded_length(tok, rows, buckets)
      batch = batching.assemble(tok, rows, fill=0, length=length)
      out = jax.device_get(step(params, batch))
      for r, i in enumerate(rows):
        if i >= 0:
          results[keep[i]] = kind.render(out, r, batch, labels, inputs[i])
  else:
    truncated = 0
  if truncated:
    logging.warning(
      "%s: %d line(s) longer than max_length=%d tokens were truncated",
      input_path,
      truncated,
      task_cfg.data.max_length,
    )
  output_path.parent.mkdir(parents=True, exist_ok=True)  # Only now: a failure writes nothing.
  with open(output_path, "w") as f:
    for i, (number, text, problem) in enumerate(lines):
      record = {"line": number, "text": text}
      if problem:
        record["warning"] = problem
      record.update(results.get(i, {"error": "empty line"}))
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  return output_path
