"""Every command the documentation shows still parses: its module exists, its config file and
variant load, its ``--config.*`` overrides name real keys with values of the right type, and its
sweep expands. A figure in docs/results.md is only as good as the command beside it."""

import ast
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags
from train_util import REPO

from launch import sweep

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# `python -m MODULE ARGS`, up to the end of the (backslash-joined) line or a closing backtick.
COMMAND = re.compile(r"python -m ([\w.]*\w)((?:[^`\n])*)")


def documented_commands() -> list[tuple[str, str, list[str]]]:
  """(where, module, args) of every ``python -m`` command in README.md and docs/*.md."""
  found = []
  for doc in DOCS:
    text = re.sub(r"\\\n\s*", " ", doc.read_text())  # Join shell line continuations.
    for lineno, line in enumerate(text.splitlines(), 1):
      for m in COMMAND.finditer(line):
        args = m.group(2).split(" #", 1)[0]  # Drop a trailing shell comment.
        try:
          argv = shlex.split(args)
        except ValueError:  # An unbalanced quote in prose around the command.
          argv = args.split()
        argv = [a for a in argv if a.startswith("--")]
        found.append((f"{doc.relative_to(REPO)}:{lineno}", m.group(1), argv))
  return found


COMMANDS = documented_commands()


def test_the_docs_show_commands():
  modules = {module for _, module, _ in COMMANDS}
  assert {"research.main", "launch.local", "launch.report"} <= modules
  assert sum(module == "research.main" for _, module, _ in COMMANDS) >= 30


@pytest.mark.parametrize("where,module", sorted({(w, m) for w, m, _ in COMMANDS}))
def test_documented_module_exists(where, module):
  assert module.startswith(("research", "launch")), f"{where}: {module} is not ours"
  assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"


def _config_args(argv: list[str]) -> list[str]:
  return [
    a for a in argv if a.startswith("--config") and "=" in a and not re.search(r"<|\.\.\.", a)
  ]


TRAIN_COMMANDS = [
  (where, _config_args(argv))
  for where, module, argv in COMMANDS
  if module == "research.main" and any(a.startswith("--config=") for a in _config_args(argv))
]


@pytest.mark.parametrize("where,argv", TRAIN_COMMANDS, ids=[w for w, _ in TRAIN_COMMANDS])
def test_documented_training_command_parses(where, argv, monkeypatch):
  monkeypatch.chdir(REPO)
  # The CLI's own parser: a locked config file flag with its dotted overrides.
  values = flags.FlagValues()
  args = ["research.main", *argv]
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=values, lock_config=True, sys_argv=args
  )
  values(args)
  config = values.config
  assert config is not None and config.tasks, where
  for arg in argv:
    if arg.startswith("--config."):
      key, value = arg[len("--config.") :].split("=", 1)
      node = config
      for part in key.split("."):
        node = node[part]
      if isinstance(node, tuple):
        assert node == tuple(ast.literal_eval(value)), (where, arg)
      else:
        assert str(node).lower() == value.lower() or float(node) == float(value), (where, arg)


SWEEP_COMMANDS = [
  (where, argv)
  for where, module, argv in COMMANDS
  if module.startswith("launch.") and "--sweep" in argv and any("--config=" in a for a in argv)
]


@pytest.mark.parametrize("where,argv", SWEEP_COMMANDS, ids=[w for w, _ in SWEEP_COMMANDS])
def test_documented_sweep_expands(where, argv, monkeypatch):
  monkeypatch.chdir(REPO)
  spec = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
  ref = sweep.ConfigRef.parse(spec)
  points = sweep.sweep_points(ref, use_sweep=True)  # Checks every override key, too.
  assert len(points) >= 2, where
  assert Path(ref.path).is_file()


def test_code_points_only_at_documents_that_exist():
  """Docstrings and comments that send a reader to a document name one in the repository."""
  sources = [*REPO.glob("research/**/*.py"), *REPO.glob("launch/**/*.py")]
  sources += [*REPO.glob("configs/**/*.py"), REPO / "pyproject.toml", REPO / "Makefile"]
  missing = []
  for path in sources:
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
      for name in re.findall(r"(?<![\w/.])((?:docs/)?[\w-]+\.md)\b", line):
        if (
          name != "report.md" and not (REPO / name).is_file()
        ):  # report.md: launch.report's output.
          missing.append(f"{path.relative_to(REPO)}:{lineno}: {name}")
  assert not missing, missing
