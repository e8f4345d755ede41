"""Named-entity tag schemes: IOB1, IOB2 (BIO) and BIOES, validation and lossless conversion.

- IOB1: ``I-X`` inside any entity; ``B-X`` only where an entity directly follows another of the
  same type (CoNLL-2003's original chunk column).
- IOB2: every entity starts with ``B-X``, continues with ``I-X``.
- BIOES: ``S-X`` single-token entity; ``B-X ... E-X`` longer ones, ``I-X`` in between.

Builders store IOB2; the pipeline converts to the configured target scheme. IOB2 <-> BIOES is
lossless for well-formed sequences; an ``I-X`` that opens an entity is read as its beginning.
"""

from __future__ import annotations

from collections.abc import Sequence

SCHEMES = ("iob1", "iob2", "bioes")
_PREFIXES = {"iob1": "BI", "iob2": "BI", "bioes": "BIES"}


def split_tag(tag: str) -> tuple[str, str]:
  """``'B-PER' -> ('B', 'PER')``, ``'O' -> ('O', '')``."""
  if tag == "O":
    return "O", ""
  prefix, sep, kind = tag.partition("-")
  if not sep or not kind:
    return tag, ""
  return prefix, kind


def tag_names(types: Sequence[str], scheme: str) -> list[str]:
  """All tags of ``scheme`` over entity ``types``: ``O`` then, per type, its prefixes in order."""
  if scheme not in SCHEMES:
    raise ValueError(f"Unknown tag scheme {scheme!r}; expected one of {SCHEMES}.")
  return ["O"] + [f"{p}-{t}" for t in types for p in _PREFIXES[scheme]]


def entity_types(names: Sequence[str]) -> list[str]:
  """Entity types in order of first appearance among tag ``names``."""
  types: list[str] = []
  for name in names:
    _, kind = split_tag(name)
    if kind and kind not in types:
      types.append(kind)
  return types


def detect_scheme(names: Sequence[str]) -> str:
  """``'bioes'`` if any tag starts with ``E-``/``S-``, else ``'iob2'``."""
  return "bioes" if any(split_tag(n)[0] in ("E", "S") for n in names) else "iob2"


def check_tag(tag: str, scheme: str, types: Sequence[str]) -> str | None:
  """``None`` if ``tag`` is valid in ``scheme`` over ``types``, else what was expected."""
  prefix, kind = split_tag(tag)
  if prefix == "O" and not kind:
    return None
  if prefix in _PREFIXES[scheme] and kind in types:
    return None
  return f"one of O, {', '.join(f'{p}-X' for p in _PREFIXES[scheme])} with X in {list(types)}"


def to_iob2(tags: Sequence[str], scheme: str) -> list[str]:
  """Converts a sentence's tags from ``scheme`` to IOB2."""
  out: list[str] = []
  prev_kind = ""
  for tag in tags:
    prefix, kind = split_tag(tag)
    if prefix == "O":
      out.append("O")
    elif scheme == "iob1":
      begins = prefix == "B" or kind != prev_kind
      out.append(f"{'B' if begins else 'I'}-{kind}")
    elif scheme == "bioes":
      out.append(f"{'B' if prefix in ('B', 'S') else 'I'}-{kind}")
    else:
      out.append(tag)
    prev_kind = kind
  return out


def iob2_to_bioes(tags: Sequence[str]) -> list[str]:
  """Converts a sentence's IOB2 tags to BIOES."""
  out: list[str] = []
  n = len(tags)
  for i, tag in enumerate(tags):
    prefix, kind = split_tag(tag)
    if prefix == "O":
      out.append("O")
      continue
    prev_kind = split_tag(tags[i - 1])[1] if i > 0 else ""
    begins = prefix == "B" or kind != prev_kind
    nxt_prefix, nxt_kind = split_tag(tags[i + 1]) if i + 1 < n else ("O", "")
    continues = nxt_prefix == "I" and nxt_kind == kind
    if begins:
      out.append(f"{'B' if continues else 'S'}-{kind}")
    else:
      out.append(f"{'I' if continues else 'E'}-{kind}")
  return out


def convert(tags: Sequence[str], source: str, target: str) -> list[str]:
  """Converts a sentence's tags between any two schemes (``target`` not ``'iob1'``)."""
  iob2 = to_iob2(tags, source)
  if target == "iob2":
    return iob2
  if target == "bioes":
    return iob2_to_bioes(iob2)
  raise ValueError(f"Unsupported target tag scheme {target!r}; expected 'iob2' or 'bioes'.")
