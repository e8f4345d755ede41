"""Task kinds as plug-ins: a registry of :class:`~research.tasks.kind.TaskKind` objects.

Every kind-specific decision (data fields and tokenization, head, loss, predictions, metrics,
predict-mode input and output) sits in one kind object; the rest of the code asks
``get(kind)`` and never branches on a kind's name. The built-in kinds are
``classification``, ``regression``, ``tagging`` (optionally with a CRF), ``seq2seq`` and
``text_to_text`` (classification by an encoder-decoder writing label words), one module each.
A kind defined elsewhere registers itself when its module is imported::

  from research import tasks

  @tasks.register_kind("length_parity")
  class LengthParity(tasks.TextKind):
    ...

and a run imports that module through ``config.imports`` (kept in the run's config.json, so
predict mode imports it too). See docs/extending.md, "Add a task kind".
"""

from __future__ import annotations

from collections.abc import Callable

from research.tasks.kind import LineError, TaskKind, TextKind

__all__ = ["LineError", "TaskKind", "TextKind", "get", "names", "register_kind"]

_KINDS: dict[str, TaskKind] = {}
_BUILTINS_LOADED = False


def register_kind(name: str) -> Callable[[type[TaskKind]], type[TaskKind]]:
  """Class decorator: registers an instance of the class as task kind ``name``.

  Re-registering the same class (a module imported again) replaces the entry; another class
  under a taken name is an error.

  Raises:
    TypeError: the class is not a TaskKind.
    ValueError: ``name`` is empty or taken by another class.
  """

  def register(cls: type[TaskKind]) -> type[TaskKind]:
    if not (isinstance(cls, type) and issubclass(cls, TaskKind)):
      raise TypeError(f"register_kind({name!r}) needs a TaskKind subclass, got {cls!r}")
    if not name:
      raise ValueError("a task kind needs a non-empty name")
    old = _KINDS.get(name)
    ident = lambda c: (c.__module__, c.__qualname__)
    if old is not None and ident(type(old)) != ident(cls):
      raise ValueError(
        f"task kind {name!r} is already registered by {ident(type(old))}; not by {ident(cls)}"
      )
    kind = cls()
    kind.name = name
    _KINDS[name] = kind
    return cls

  return register


def _load_builtins() -> None:
  global _BUILTINS_LOADED
  if not _BUILTINS_LOADED:
    _BUILTINS_LOADED = True
    # Importing the modules registers their kinds.
    from research.tasks import (  # noqa: F401
      classification,
      regression,
      seq2seq,
      tagging,
      text_to_text,
    )


def get(kind: str) -> TaskKind:
  """The registered task kind ``kind``.

  Raises:
    ValueError: no such kind (naming the known ones).
  """
  _load_builtins()
  if kind not in _KINDS:
    raise ValueError(
      f"unknown task kind {kind!r}; known: {sorted(_KINDS)}. A kind defined outside research/ "
      "is registered by importing its module: list the module in config.imports."
    )
  return _KINDS[kind]


def names() -> list[str]:
  """The registered kinds."""
  _load_builtins()
  return sorted(_KINDS)
