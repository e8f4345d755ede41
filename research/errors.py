"""The user mistakes the command line reports in one line, and how it reports them.

A new user's first runs fail on their own inputs far more often than on our bugs: a misspelt
key, a value out of range, a data file that is not there. Such a failure is worth one line
that names the culprit (the config key, the file and line, the directory) and the fix; a
30-160-line traceback whose last line holds the culprit hides it. Code that detects such a
mistake raises one of the classes below, and ``research.main`` prints ``error: <message>`` and
exits with the class's status. Anything else is a bug and keeps its traceback.

- :class:`UsageError` (exit 2): the command or the config asks for something that cannot be: a
  bad flag, an unknown key, variant or config file, a value out of range, a split the data set
  does not have.
- :class:`RunError` (exit 1): the request is well-formed but the run cannot go on because of
  something on disk: a missing or malformed data file, an unusable checkpoint, init source or
  workdir.

Both derive from the built-in class that code raised before (``ValueError``,
``RuntimeError``), so existing ``except`` clauses and tests keep working. This module sits at
the bottom layer (standard library only) so that every package may raise them.
"""

from __future__ import annotations

import os
import re

USAGE_EXIT = 2
RUN_EXIT = 1
VERBOSE_ENV = "RESEARCH_VERBOSE"


class UsageError(ValueError):
  """A request that cannot be satisfied as written (a flag, a config key or value); exit 2."""


class UnknownKeyError(UsageError, KeyError):
  """A config key or variant that does not exist; also a KeyError, as config lookups raise."""

  def __str__(self) -> str:
    # KeyError's own __str__ quotes its argument as a repr; the message is meant to be read.
    return str(self.args[0]) if self.args else ""


class RunError(RuntimeError):
  """A well-formed run that cannot go on because of a file or directory it uses; exit 1."""


def verbose_from_env() -> bool:
  """Whether ``$RESEARCH_VERBOSE`` asks for full tracebacks (any value but '', 0, false, no)."""
  return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(exc: BaseException) -> str:
  """The exception's message on one line (library messages may span several).

  An ``OSError`` from ``open`` names its file only in ``filename``; the line puts it first.
  """
  if isinstance(exc, OSError) and exc.filename and exc.strerror:
    text = f"{exc.filename}: {exc.strerror}"
  else:
    text = str(exc)
  text = re.sub(r"\s*\n\s*", " ", text.strip())
  return text or type(exc).__name__
