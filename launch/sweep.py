"""Sweeps: turn one experiment config (and its `get_sweep()`) into named run points.

A config file in `configs/` may expose `get_sweep()` beside `get_config(arg)`. It returns
either

- a list of override dicts, each one run: `[{"optim.lr": 1e-5}, {"optim.lr": 3e-5}]`, or
- a dict of named axes whose cartesian product is the sweep:
  `{"optim.lr": [1e-5, 3e-5], "seed": [0, 1]}`.

The helpers `product`, `zipped`, `axis`, `seeds` and `variants` of `research.config_lib` (there so
that configs need nothing from `launch/`) build the same lists explicitly; an axis
may carry a short display name, and labels for values that make poor directory names:
`axis("optim.freeze", {"none": (), "bottom4": ("encoder/layer_[0-3]/.*",)}, name="freeze")`.
Values in a dict of axes may be such a label -> value dict too. Keys are dotted config
paths, with or without the `config.` prefix. Seeds are an ordinary axis: every key whose last
component is `seed` is treated as the seed axis, so the report can average over it.

Each point becomes one run in `<root>/<experiment>/<point-name>`, where the point name is made
from the swept values (`lr=1e-05,seed=0`), and one command line:
`python -m research.main --config=configs/x.py:variant --workdir=... --config.optim.lr=1e-05`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from research import config_lib
from research.config_lib import TAG, Axis, as_sweep, axis, product, strip_prefix, value_id

# The trainer calls jax.distributed.initialize() (SLURM / TPU pod auto-detection) when this
# config field is true; the launchers set it for multi-process runs.
DISTRIBUTED_KEY = "parallel.distributed"

# Files the launcher writes next to the trainer's own outputs in each point's workdir.
POINT_FILE = "launch.json"
RESULTS_FILE = "results.json"
LOG_FILE = "launch.log"

Overrides = dict[str, Any]


# ----------------------------------------------------------------------------- points


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep.

  Attributes:
    name: directory name of the run (unique within the experiment).
    overrides: dotted config key -> value (without the `config.` prefix).
    group: the point's name without its seed, used to average seeds in reports.
    seed: the seed value, if the sweep has a seed axis.
    index: position in the sweep (SLURM array index).
  """

  name: str
  overrides: Overrides
  group: str
  seed: Any = None
  index: int = 0


def is_seed_key(key: str) -> bool:
  """True for config keys that hold a random seed (`seed`, `train.seed`, `data_seed`...)."""
  return key.rsplit(".", 1)[-1].endswith("seed")


def format_value(value: Any) -> str:
  """Formats a value for the command line the way `ml_collections.config_flags` parses it.

  Args:
    value: a Python scalar, tuple/list, or None.

  Returns:
    The string after `--config.key=`.
  """
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  if value is None:
    return "None"
  return str(value)


def _name_value(value: Any) -> str:
  if isinstance(value, float):
    text = f"{value:g}"
  elif isinstance(value, (list, tuple)):
    text = "-".join(_name_value(v) for v in value)
  else:
    text = str(value)
  # Keep names filesystem- and shell-friendly: no slashes, spaces or quotes.
  return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


def _short_names(keys: Sequence[str], named: Mapping[str, str]) -> dict[str, str]:
  """Short display names: last key component unless that is ambiguous."""
  short = {k: named.get(k, k.rsplit(".", 1)[-1]) for k in keys}
  counts: dict[str, int] = {}
  for s in short.values():
    counts[s] = counts.get(s, 0) + 1
  return {k: (s if counts[s] == 1 else k) for k, s in short.items()}


def make_points(
  overrides: Sequence[Mapping[str, Any]],
  names: Mapping[str, str] | None = None,
  labels: Mapping[str, Mapping[str, str]] | None = None,
  hidden: Iterable[str] = (),
) -> list[Point]:
  """Names a list of override dicts as sweep points.

  Only keys whose values differ between points appear in the names; a sweep of one point is
  named `default`.

  Args:
    overrides: one dict per point.
    names: optional short display names per key.
    labels: optional labels per key and value id (see `Sweep`).
    hidden: keys left out of the names (set by a `variants` part, which names them).

  Returns:
    The points, in order.

  Raises:
    ValueError: if two points get the same name (duplicate override sets).
  """
  dicts = [{strip_prefix(k): v for k, v in o.items()} for o in overrides]
  keys: list[str] = []
  for d in dicts:
    keys.extend(k for k in d if k not in keys)
  hidden = set(hidden)
  varying = [k for k in keys if k not in hidden and len({value_id(d.get(k)) for d in dicts}) > 1]
  short = _short_names(
    varying, {**{k: k[len(TAG) :] for k in keys if k.startswith(TAG)}, **(names or {})}
  )
  labels = labels or {}

  def label(k: str, v: Any) -> str:
    return _name_value(labels.get(k, {}).get(value_id(v), v))

  points, seen = [], set()
  for i, d in enumerate(dicts):
    parts = [f"{short[k]}={label(k, d[k])}" for k in varying if k in d]
    group_parts = [p for k, p in zip([k for k in varying if k in d], parts) if not is_seed_key(k)]
    name = ",".join(parts) or "default"
    if name in seen:
      raise ValueError(f"duplicate sweep point {name!r}: {d}")
    seen.add(name)
    seed = next((d[k] for k in d if is_seed_key(k)), None)
    config_overrides = {k: v for k, v in d.items() if not k.startswith(TAG)}
    points.append(Point(name, config_overrides, ",".join(group_parts) or "default", seed, i))
  return points


def expand(spec: Any) -> list[Point]:
  """Expands whatever `get_sweep()` returned into points.

  Args:
    spec: a list of override dicts (or a `Sweep` from `product` / `zipped`), a dict of
      axes (key -> list of values, or dict label -> value; their product), an `Axis`, or a
      list of `Axis` objects (product).

  Returns:
    The points.

  Raises:
    TypeError: for anything else.
  """
  if isinstance(spec, Axis):
    spec = [spec]
  if isinstance(spec, Mapping):
    spec = [
      axis(k, v if isinstance(v, (list, tuple, range, Mapping)) else [v]) for k, v in spec.items()
    ]
  if isinstance(spec, Sequence) and spec and all(isinstance(a, Axis) for a in spec):
    spec = product(*spec)
  if isinstance(spec, Sequence) and all(isinstance(d, Mapping) for d in spec):
    sw = as_sweep(spec)
    return make_points(list(sw), sw.names, sw.labels, sw.hidden)
  raise TypeError(f"get_sweep() must return a list of dicts or a dict of axes, got {spec!r}")


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class ConfigRef:
  """A `--config` argument: `configs/x.py[:variant]`.

  Attributes:
    path: the config file.
    arg: the variant string after the colon, or None.
  """

  path: Path
  arg: str | None

  @classmethod
  def parse(cls, text: str) -> ConfigRef:
    """Parses `path[:arg]`.

    Raises:
      FileNotFoundError: if the file does not exist.
    """
    path, _, arg = text.partition(":")
    p = Path(path)
    if not p.is_file():
      raise FileNotFoundError(f"config file not found: {path}")
    return cls(p, arg or None)

  def __str__(self) -> str:
    return f"{self.path}:{self.arg}" if self.arg else str(self.path)

  @property
  def experiment(self) -> str:
    """Directory name of the experiment: the file stem, plus `_<variant>` if any."""
    base = self.path.stem
    return f"{base}_{_name_value(self.arg)}" if self.arg else base

  def module(self) -> Any:
    """Imports the config file as a module (no `sys.path` changes)."""
    return config_lib.load_module(self.path)


def _call_with_optional_arg(fn, arg: str | None):
  params = inspect.signature(fn).parameters
  return fn(arg) if params else fn()


def sweep_points(ref: ConfigRef, use_sweep: bool, validate: bool = True) -> list[Point]:
  """Returns the points to run for a config: its sweep, or the single default point.

  Args:
    ref: the config reference.
    use_sweep: whether to expand `get_sweep()`; otherwise one point named `default`.
    validate: check every override key against `get_config(arg)` so typos fail before any
      job is submitted.

  Raises:
    AttributeError: if `use_sweep` and the config has no `get_sweep`.
    KeyError: if an override key is not in the config.
  """
  mod = ref.module()
  if not use_sweep:
    return [Point("default", {}, "default")]
  if not hasattr(mod, "get_sweep"):
    raise AttributeError(f"{ref.path} has no get_sweep()")
  points = expand(_call_with_optional_arg(mod.get_sweep, ref.arg))
  if validate and hasattr(mod, "get_config"):
    config = _call_with_optional_arg(mod.get_config, ref.arg)
    for p in points:
      for key in p.overrides:
        config_lib.check_key(config, key)
  return points


def config_has_key(ref: ConfigRef, key: str) -> bool:
  """True if `get_config(arg)` of the referenced config has the dotted `key`."""
  mod = ref.module()
  if not hasattr(mod, "get_config"):
    return False
  try:
    config_lib.check_key(_call_with_optional_arg(mod.get_config, ref.arg), key)
  except KeyError:
    return False
  return True


# ----------------------------------------------------------------------------- commands


def point_workdir(root: str | os.PathLike, ref: ConfigRef, point: Point) -> str:
  """Returns `<root>/<experiment>/<point-name>` (URL roots such as `gs://b/runs` kept intact)."""
  root = os.fspath(root)
  if "://" in root:
    return f"{root.rstrip('/')}/{ref.experiment}/{point.name}"
  return str(Path(root) / ref.experiment / point.name)


def trainer_args(
  ref: ConfigRef, point: Point, workdir: str | os.PathLike, extra: Sequence[str] = ()
) -> list[str]:
  """Returns the trainer's arguments for one point (without the interpreter and module).

  Args:
    ref: the config reference.
    point: the sweep point.
    workdir: the point's workdir.
    extra: extra `--config.x=v` flags applied to every point (before the point's own).
  """
  args = [f"--config={ref}", f"--workdir={workdir}", *extra]
  args += [f"--config.{k}={format_value(v)}" for k, v in point.overrides.items()]
  return args


def write_point_file(workdir: Path, ref: ConfigRef, point: Point) -> None:
  """Writes `launch.json` (experiment, point, group, seed, overrides) into the workdir."""
  workdir.mkdir(parents=True, exist_ok=True)
  info = {
    "experiment": ref.experiment,
    "config": str(ref),
    "point": point.name,
    "group": point.group,
    "seed": point.seed,
    "overrides": point.overrides,
  }
  (workdir / POINT_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")


def is_done(workdir: Path) -> bool:
  """True when the trainer has written `results.json` into the workdir."""
  return (workdir / RESULTS_FILE).is_file()
