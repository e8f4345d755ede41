"""The registry of model families: the one place that lists them and the one way to find them.

Code outside a family's module reaches the family only through these lookups (research.transfer
reads and writes HF checkpoints with them, research.train builds models with them); none of it
compares a family's or a model type's name. A family comes from:

- :func:`family_for` ``(model_type)``: the family that reads an HF ``config.json`` of that type
  (``bert``, ``xlm-roberta`` and ``electra`` all give the BERT-like family);
- :func:`family_named` ``(name)``: by its own name, what ``model.family`` in a config selects
  (a family no checkpoint describes, such as ``cnn``, is chosen this way);
- :func:`family_of` ``(config)``: the family of a config dataclass instance.

Built-in families are registered below; :func:`register_family` adds another (see
docs/extending.md, "Adding a model family").
"""

from __future__ import annotations

from typing import Any

from research.models import bert, cnn, mpnet
from research.models.decoder_only import gpt2, llama
from research.models.encoder_decoder import bart, marian, t5
from research.models.family import Family

_BY_NAME: dict[str, Family] = {}
_BY_MODEL_TYPE: dict[str, Family] = {}
_BY_CONFIG_TYPE: dict[type, Family] = {}


def register_family(family: Family) -> Family:
  """Adds ``family`` to the registry and returns it.

  Raises:
    ValueError: its name, one of its model types or its config type is already registered to
      another family.
  """
  clashes = [f"name {family.name!r}"] if family.name in _BY_NAME else []
  clashes += [f"model_type {t!r}" for t in family.model_types if t in _BY_MODEL_TYPE]
  if family.config_type in _BY_CONFIG_TYPE:
    clashes.append(f"config type {family.config_type.__name__}")
  if clashes:
    raise ValueError(f"family {family.name!r}: already registered: {', '.join(clashes)}")
  _BY_NAME[family.name] = family
  _BY_MODEL_TYPE.update(dict.fromkeys(family.model_types, family))
  _BY_CONFIG_TYPE[family.config_type] = family
  return family


def family_names() -> tuple[str, ...]:
  """The registered families' names, in registration order."""
  return tuple(_BY_NAME)


def model_types() -> tuple[str, ...]:
  """Every HF ``model_type`` some family reads, sorted."""
  return tuple(sorted(_BY_MODEL_TYPE))


def family_for(model_type: str | None, source: str = "config.json") -> Family:
  """The family that reads HF checkpoints of ``model_type``.

  Raises:
    ValueError: no family reads it, naming ``source`` and the supported types.
  """
  if model_type not in _BY_MODEL_TYPE:
    raise ValueError(
      f"{source}: unknown model_type {model_type!r}; supported: {list(model_types())}"
    )
  return _BY_MODEL_TYPE[model_type]


def family_named(name: str) -> Family:
  """The family called ``name`` (``model.family`` in a config).

  Raises:
    ValueError: no such family, naming the registered ones.
  """
  if name not in _BY_NAME:
    raise ValueError(f"model.family={name!r}: no such family; registered: {list(_BY_NAME)}")
  return _BY_NAME[name]


def family_of(config: Any) -> Family:
  """The family whose config dataclass ``config`` is.

  Raises:
    TypeError: ``config`` is no registered family's config.
  """
  family = _BY_CONFIG_TYPE.get(type(config))
  if family is None:
    raise TypeError(f"{type(config).__name__} is not the config of a registered model family")
  return family


for _family in (bert.FAMILY, mpnet.FAMILY, cnn.FAMILY, gpt2.FAMILY, *llama.FAMILIES, t5.FAMILY):
  register_family(_family)
for _family in (*bart.FAMILIES, marian.FAMILY):
  register_family(_family)
