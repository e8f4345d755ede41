"""Command-line entry point: parses flags and calls the trainer.

  python -m research.main --config=configs/sst2_minilm.py[:variant] --workdir=DIR \
      [--config.optim.lr=3e-5 ...] [--verbose]
  python -m research.main --mode=predict --workdir=DIR --input=FILE [--output=FILE]
  python -m research.main --help      # the configs and their variants, environment, examples

``config.imports`` names modules imported before training (and, from the run's config.json,
before predicting): task kinds and other plug-ins defined outside the package, found on
PYTHONPATH. Configs are locked, so a misspelt override (``--config.optim.lrr=1``) stops the run
with the list of valid keys at that level instead of silently adding a field.

A user mistake (research.errors) ends the run with one ``error: ...`` line on stderr naming the
key, file or directory at fault: exit 2 for a usage error (a flag, a config file, key, variant or
value), 1 for a run that cannot go on (a data file, checkpoint, init source or busy workdir).
``--verbose`` (or ``RESEARCH_VERBOSE=1``) prints the traceback before that line; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from research import cli_help, compile_cache, config_lib, errors

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
_VERBOSE = flags.DEFINE_bool(
  "verbose", False, f"On an error, print the traceback too (also: {errors.VERBOSE_ENV}=1)."
)
flags.mark_flags_as_required(["workdir"])
flags.register_multi_flags_validator(
  ["mode", "config", "input"],
  lambda f: f["input"] is not None if f["mode"] == "predict" else f["config"] is not None,
  message="--mode=train needs --config; --mode=predict needs --input",
)

HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")
# 128 + SIGTERM, the shell's status of a process ended by SIGTERM: a resumable stop, not a failure.
PREEMPTED_EXIT = 143
REPO = Path(__file__).resolve().parents[1]


def fail(exc: BaseException, code: int, verbose: bool) -> NoReturn:
  """Ends the process: the traceback when ``verbose``, then one ``error:`` line, last."""
  if verbose:
    traceback.print_exception(exc)
  print(f"error: {errors.one_line(exc)}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  # No interpreter shutdown after a failed run: orbax's abandoned reads and writes would print
  # their asyncio tracebacks after the error line. Committed checkpoints are already whole.
  os._exit(code)


def wants_verbose(argv: list[str]) -> bool:
  """``--verbose`` among the arguments (read before the flags parse) or ``$RESEARCH_VERBOSE``."""
  on = any(a == "--verbose" or a.lower() in ("--verbose=true", "--verbose=1") for a in argv)
  return on or errors.verbose_from_env()


def config_arg(argv: list[str]) -> str | None:
  """The value of ``--config=SPEC`` or ``--config SPEC`` in ``argv``."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_config_arg(argv: list[str]) -> None:
  """Loads ``--config`` and checks its override keys before config_flags does.

  config_flags keeps a failure to load the file until the config is first used (then it shows
  as a traceback), and names an unknown override key less helpfully.

  Raises:
    research.errors.UsageError: a missing config file (listing those there are), an unknown
      variant or override key (listing the valid ones).
  """
  spec = config_arg(argv)
  if spec is None:
    return
  path = spec.partition(":")[0]
  if not Path(path).is_file():
    known = ", ".join(p.relative_to(REPO).as_posix() for p in sorted(REPO.glob("configs/*.py")))
    raise errors.UsageError(f"--config={spec}: no such config file {path}; configs: {known}")
  try:
    config = config_lib.load_config(spec)
  except errors.UnknownKeyError as e:  # A variant the config does not take.
    raise errors.UsageError(f"--config={spec}: {e}") from e
  for arg in argv:
    m = re.match(r"--config\.([\w.]+)(=|$)", arg)
    if m:
      config_lib.check_key(config, m.group(1), shown_as=f"--config.{m.group(1)}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with ``--help`` exiting 0 and every flag mistake one line, exit 2."""
  verbose = wants_verbose(argv[1:])
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(cli_help.usage(sys.modules[__name__]))
    sys.exit(0)
  try:
    check_config_arg(argv[1:])
    rest = flags.FLAGS(argv)
  except errors.UsageError as e:
    fail(e, errors.USAGE_EXIT, verbose)
  except flags.Error as e:  # A bad flag value, a missing required flag.
    fail(e, errors.USAGE_EXIT, verbose)
  if len(rest) > 1:
    fail(
      errors.UsageError(f"unexpected arguments {rest[1:]}; flags are written --name=value"),
      errors.USAGE_EXIT,
      verbose,
    )
  return rest


def run_failures() -> tuple[type[BaseException], ...]:
  """Exceptions that mean the run cannot go on because of the user's files, not a bug: exit 1.

  Besides :class:`research.errors.RunError` (data files, HF checkpoints, init sources), the
  loop's own: a busy workdir, no readable checkpoint, a workdir of another model, the
  non-finite guard; and the operating system's (a missing file, a full disk).
  """
  from research.train import checkpoints, loop, workdir

  return (
    errors.RunError,
    OSError,
    workdir.WorkdirBusyError,
    checkpoints.CheckpointCorruptError,
    checkpoints.CheckpointMismatchError,
    loop.NonFiniteError,
  )


def run(config, workdir: str) -> None:
  """Trains ``config`` in ``workdir`` and prints each task's eval metrics."""
  from research.predict import import_modules

  import_modules(config.imports)  # Plug-ins (task kinds, families, programs) register here.
  from research.train import parallel

  parallel.maybe_initialize_distributed(config.parallel)
  # Importing a program's module registers it under its config.program name.
  from research.meta import trainer as _meta  # noqa: F401
  from research.train import loop
  from research.train import trainer as _supervised  # noqa: F401

  try:
    results = loop.train_and_evaluate(config, workdir)
  except loop.Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(PREEMPTED_EXIT)
  # A cross-data-set meta run scores its task on another data set's episodes: say which.
  test_data = results.get("meta", {}).get("test_data")
  for task, metrics in results["eval"].items():
    shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    on = f" (meta-test on {test_data})" if test_data and test_data != task else ""
    print(f"{task}{on}: {shown}", file=sys.stderr)


def main(argv: list[str]) -> None:
  del argv  # parse_flags has refused stray arguments.
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  compile_cache.enable()  # Before anything compiles; $RESEARCH_COMPILE_CACHE moves or disables.
  logging.set_verbosity(logging.WARNING)  # orbax and tfds are chatty at INFO.
  verbose = _VERBOSE.value or errors.verbose_from_env()
  if not verbose:
    # Exceptions Python cannot raise (orbax's abandoned async reads of a damaged checkpoint,
    # collected as garbage) would print tracebacks around the one error line; --verbose shows them.
    sys.unraisablehook = lambda unraisable: None
  try:
    if _MODE.value == "predict":
      from research.predict import predict_file

      if not verbose:  # Opening a finished run read-only makes orbax warn about its options.
        logging.set_verbosity(logging.ERROR)

      out = predict_file(_WORKDIR.value, _INPUT.value, _OUTPUT.value, task=_TASK.value)
      print(f"wrote {out}", file=sys.stderr)
    else:
      run(_CONFIG.value, _WORKDIR.value)
  except errors.UsageError as e:
    fail(e, errors.USAGE_EXIT, verbose)
  except run_failures() as e:
    fail(e, errors.RUN_EXIT, verbose)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
