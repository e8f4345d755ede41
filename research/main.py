"""Command-line entry point: parses flags and calls the trainer.

  python -m research.main --config=configs/sst2_minilm.py[:variant] --workdir=DIR \
      [--config.optim.lr=3e-5 ...]
  python -m research.main --mode=predict --workdir=DIR --input=FILE [--output=FILE]

``config.imports`` names modules imported before training (and, from the run's config.json,
before predicting): task kinds and other plug-ins defined outside the package, found on
PYTHONPATH. Configs are locked, so a misspelt override (``--config.optim.lrr=1``) stops the run
with the list of valid keys at that level instead of silently adding a field.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from research import config_lib

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file[:variant].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumes when it holds a run).")
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "predict"],
  "Train (and evaluate), or predict with a trained run's best params.",
)
_INPUT = flags.DEFINE_string("input", None, "predict: a text file, one input per line.")
_OUTPUT = flags.DEFINE_string(
  "output", None, "predict: output JSONL (default: WORKDIR/predictions/<input>.jsonl)."
)
_TASK = flags.DEFINE_string("task", None, "predict: which task head (multi-task runs).")
flags.mark_flags_as_required(["workdir"])
flags.register_multi_flags_validator(
  ["mode", "config", "input"],
  lambda f: f["input"] is not None if f["mode"] == "predict" else f["config"] is not None,
  message="--mode=train needs --config; --mode=predict needs --input",
)


def unknown_override(argv: list[str]) -> str | None:
  """A message naming the first ``--config.a.b`` override whose key does not exist."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  config = config_lib.load_config(spec)
  for arg in argv:
    m = re.match(r"--config\.([\w.]+)(=|$)", arg)
    if not m:
      continue
    try:
      config_lib.check_key(config, m.group(1), shown_as=f"--config.{m.group(1)}")
    except KeyError as e:
      return e.args[0]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # config_flags raises AttributeError/KeyError for unknown keys.
    message = unknown_override(argv[1:]) or f"{type(e).__name__}: {e}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# 128 + SIGTERM, the shell's status of a process ended by SIGTERM: a resumable stop, not a failure.
PREEMPTED_EXIT = 143


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  logging.set_verbosity(logging.WARNING)  # orbax and tfds are chatty at INFO.
  if _MODE.value == "predict":
    from research.predict import predict_file

    out = predict_file(_WORKDIR.value, _INPUT.value, _OUTPUT.value, task=_TASK.value)
    print(f"wrote {out}", file=sys.stderr)
    return
  config = _CONFIG.value
  from research.predict import import_modules

  import_modules(config.imports)  # Plug-ins (task kinds, families, programs) register here.
  from research.train import parallel

  parallel.maybe_initialize_distributed(config.parallel)
  # Importing a program's module registers it under its config.program name.
  from research.meta import trainer as _meta  # noqa: F401
  from research.train import checkpoints, loop, workdir
  from research.train import trainer as _supervised  # noqa: F401

  try:
    results = loop.train_and_evaluate(config, _WORKDIR.value)
  except loop.Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(PREEMPTED_EXIT)
  except (workdir.WorkdirBusyError, checkpoints.CheckpointCorruptError) as e:
    print(f"error: {e}", file=sys.stderr)  # One line: the message names the path and the fix.
    sys.exit(1)
  for task, metrics in results["eval"].items():
    shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"{task}: {shown}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
