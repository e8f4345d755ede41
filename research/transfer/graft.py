"""Grafting: copy subtrees of a source tree into a freshly initialised target tree, by rules.

Rules are ``(target regex, source template)`` pairs in the one rule syntax of research.paths:
the first rule whose regex fully matches a target path decides; its template (``\\1`` groups
allowed) names the source path to copy from, or ``None`` to keep that target leaf at init.
Loading is loud: the report lists what was transferred, left at init, unused in the source and
re-initialised on a shape mismatch. A shape mismatch raises, naming both paths and shapes,
unless the target path matches one of ``reinit_on_mismatch`` (e.g. a classifier with a new
label count). ``strict=True`` also raises on anything left at init or unused in the source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from research import paths

ENCODER_RULES = (("encoder/(.*)", r"encoder/\1"),)


class GraftError(ValueError):
  """A graft that cannot be done as asked; the message names the paths at fault."""


@dataclasses.dataclass
class GraftReport:
  """What a graft did, leaf by leaf."""

  transferred: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (target, src)
  left_at_init: list[str] = dataclasses.field(default_factory=list)
  unused_in_source: list[str] = dataclasses.field(default_factory=list)
  reinitialised: list[tuple[str, str, tuple, tuple]] = dataclasses.field(default_factory=list)

  def table(self) -> str:
    """A plain-text table, one line per leaf, grouped by outcome, with counts."""
    rows = [("transferred", t, s) for t, s in self.transferred]
    rows += [("left at init", t, "-") for t in self.left_at_init]
    rows += [("unused in source", "-", s) for s in self.unused_in_source]
    rows += [
      ("reinit: shape mismatch", t, f"{s} {ss} != target {ts}")
      for t, s, ts, ss in self.reinitialised
    ]
    width = max([len(r[1]) for r in rows] + [6])
    lines = [f"{'outcome':<23} {'target':<{width}}  source", "-" * (width + 50)]
    lines += [f"{o:<23} {t:<{width}}  {s}" for o, t, s in rows]
    lines.append(self.summary())
    return "\n".join(lines)

  def summary(self) -> str:
    return (
      f"graft: {len(self.transferred)} transferred, {len(self.left_at_init)} left at init, "
      f"{len(self.unused_in_source)} unused in source, {len(self.reinitialised)} re-initialised "
      "(shape mismatch)"
    )

  def save(self, path: str | Path) -> None:
    Path(path).write_text(self.table() + "\n")


def graft(
  target: Any,
  source: Any,
  rules: Sequence[tuple[str, str | None]] = ENCODER_RULES,
  *,
  strict: bool = False,
  reinit_on_mismatch: Sequence[str] = (),
) -> tuple[Any, GraftReport]:
  """Returns ``(target with grafted leaves, report)``; ``target`` itself is not modified.

  Args:
    target: the freshly initialised tree (leaves may be sharded jax Arrays; the grafted leaves
      keep the target's dtype and sharding).
    source: the tree to copy from (numpy or jax leaves).
    rules: ordered ``(target regex, source template | None)`` pairs; first full match wins;
      target paths matching no rule stay at init.
    strict: raise if anything is left at init or unused in the source.
    reinit_on_mismatch: target regexes whose shape mismatches re-initialise instead of raising.

  Raises:
    GraftError: a shape mismatch not allowed by ``reinit_on_mismatch``, a template naming a
      path absent from the source, or (strict) anything left at init or unused.
  """
  compiled = paths.compile_rules(rules)
  reinit = [p for p, _ in paths.compile_rules([(r, None) for r in reinit_on_mismatch])]
  src = paths.flatten(source)
  report = GraftReport()
  used: set[str] = set()

  def copy(path: str, leaf: Any) -> Any:
    hit = next(((p, t, m) for p, t in compiled if (m := p.fullmatch(path))), None)
    if hit is None:
      report.left_at_init.append(path)
      return leaf
    pattern, template, m = hit
    if template is None:
      report.left_at_init.append(path)
      return leaf
    src_path = m.expand(template)
    if src_path not in src:
      if strict:
        raise GraftError(f"rule {pattern.pattern!r} maps {path} to {src_path}, absent in source")
      report.left_at_init.append(path)
      return leaf
    value = src[src_path]
    used.add(src_path)
    if tuple(np.shape(value)) != tuple(leaf.shape):
      if any(p.fullmatch(path) for p in reinit):
        report.reinitialised.append((path, src_path, tuple(leaf.shape), tuple(np.shape(value))))
        return leaf
      raise GraftError(
        f"shape mismatch: target {path} has shape {tuple(leaf.shape)} but source {src_path} "
        f"has shape {tuple(np.shape(value))}; add the path to reinit_on_mismatch to "
        "re-initialise it instead"
      )
    report.transferred.append((path, src_path))
    value = np.asarray(value, dtype=leaf.dtype)
    if isinstance(leaf, jax.Array):
      return jax.device_put(value, leaf.sharding)
    return value

  grafted = paths.map_with_path(copy, target)
  report.unused_in_source = [p for p in src if p not in used]
  if strict and (report.left_at_init or report.unused_in_source):
    raise GraftError(
      "strict graft: "
      + (f"left at init: {report.left_at_init[:5]} " if report.left_at_init else "")
      + (f"unused in source: {report.unused_in_source[:5]}" if report.unused_in_source else "")
    )
  return grafted, report
