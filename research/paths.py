"""Parameter paths: the one place that flattens pytrees to "/"-joined paths and matches rules.

Every feature that selects parameters (grafting, freezing, LR multipliers, weight decay, LoRA
targets, sharding, the MAML inner set) goes through this module, so one rule syntax holds
everywhere: an ordered list of ``(regex, value)`` pairs, matched with ``re.fullmatch``, first
match wins. ``re.search`` is deliberately not used: ``head`` would silently hit ``multihead/...``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import jax

V = TypeVar("V")
Rules = Sequence[tuple[str, Any]]

SEP = "/"


def key_to_str(key: Any) -> str:
  """One path entry (DictKey, SequenceKey, GetAttrKey, ...) as a plain string."""
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def keypath_to_str(keypath: Iterable[Any]) -> str:
  """A jax key path as a "/"-joined string, e.g. ``encoder/layer_0/attention/query/kernel``."""
  return SEP.join(key_to_str(k) for k in keypath)


def flatten(tree: Any) -> dict[str, Any]:
  """Flattens a pytree of leaves into ``{"a/b/c": leaf}`` in deterministic (tree) order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {keypath_to_str(kp): leaf for kp, leaf in flat}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of :func:`flatten` for nested dicts."""
  tree: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = tree
    *parents, last = path.split(SEP)
    for part in parents:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"Path {path!r} goes through a leaf at {part!r}.")
    if last in node:
      raise ValueError(f"Duplicate path {path!r}.")
    node[last] = leaf
  return tree


def map_with_path(fn: Callable[[str, Any], Any], tree: Any, *rest: Any) -> Any:
  """``jax.tree_util.tree_map_with_path`` with string paths: ``fn(path, leaf, *rest_leaves)``."""
  return jax.tree_util.tree_map_with_path(
    lambda kp, leaf, *xs: fn(keypath_to_str(kp), leaf, *xs), tree, *rest
  )


def compile_rules(rules: Rules) -> list[tuple[re.Pattern[str], Any]]:
  """Compiles ``(regex, value)`` rules, naming the rule when a regex is malformed."""
  if isinstance(rules, (str, bytes)) or (
    isinstance(rules, tuple) and len(rules) == 2 and isinstance(rules[0], str)
  ):
    raise TypeError(f"Rules must be a sequence of (regex, value) pairs, got a single {rules!r}.")
  compiled = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise TypeError(f"Rule #{i} must be a (regex, value) pair, got {rule!r}.")
    try:
      compiled.append((re.compile(rule[0]), rule[1]))
    except re.error as e:
      raise ValueError(f"Rule #{i} has an invalid regex {rule[0]!r}: {e}") from e
  return compiled


_NO_DEFAULT = object()


def match(rules: Rules, path: str, default: Any = _NO_DEFAULT) -> Any:
  """The value of the first rule whose regex fully matches ``path``.

  Raises:
    KeyError: if no rule matches and no default is given.
  """
  for pattern, value in compile_rules(rules):
    if pattern.fullmatch(path):
      return value
  if default is _NO_DEFAULT:
    raise KeyError(f"No rule matches parameter path {path!r}; rules: {[r for r, _ in rules]}")
  return default


def label_tree(tree: Any, rules: Rules, default: Any = _NO_DEFAULT) -> Any:
  """A pytree of the same structure holding, per leaf, the value of its first matching rule."""
  compiled = compile_rules(rules)

  def label(path: str, _: Any) -> Any:
    for pattern, value in compiled:
      if pattern.fullmatch(path):
        return value
    if default is _NO_DEFAULT:
      raise KeyError(f"No rule matches parameter path {path!r}; rules: {[r for r, _ in rules]}")
    return default

  return map_with_path(label, tree)


def mask(tree: Any, patterns: str | Sequence[str]) -> Any:
  """A boolean pytree: True where the path fully matches any of ``patterns``."""
  if isinstance(patterns, str):
    patterns = [patterns]
  return label_tree(tree, [(p, True) for p in patterns], default=False)


def select(tree: Any, patterns: str | Sequence[str]) -> dict[str, Any]:
  """``{path: leaf}`` for the leaves whose path fully matches any of ``patterns``."""
  if isinstance(patterns, str):
    patterns = [patterns]
  compiled = [p for p, _ in compile_rules([(p, None) for p in patterns])]
  return {k: v for k, v in flatten(tree).items() if any(p.fullmatch(k) for p in compiled)}


def unused_rules(rules: Rules, paths: Iterable[str]) -> list[str]:
  """The regexes of ``rules`` that match none of ``paths`` (usually a typo worth reporting)."""
  paths = list(paths)
  return [p.pattern for p, _ in compile_rules(rules) if not any(p.fullmatch(x) for x in paths)]


def layer_index(path: str, pattern: str = r".*layer_(\d+)/.*") -> int | None:
  """The transformer layer number in a path such as ``encoder/layer_3/...``, else None."""
  m = re.fullmatch(pattern, path)
  return int(m.group(1)) if m else None
