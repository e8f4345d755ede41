"""Helpers shared by the experiment configs in configs/, and the one way to load them.

Configs stay one file per experiment with ``get_config(arg)``; what they share lives here:
the variant-string parser, the default fields of every run, locking (so a misspelt
``--config.optim.lrr=1`` fails instead of silently adding a field), loading a config file by
path (the CLI, the launchers and the tests all do it), and the builders of ``get_sweep()``, so
that configs need nothing from ``launch/``.

Importing this module stays cheap (ml_collections only): the launchers import it, and so do
their stand-in trainers, once per subprocess. What needs jax (``optim``, the data registry) is
imported inside the functions that use it.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import itertools
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

from research import errors

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``'smoke,init=scratch,seed=3'`` into a ConfigDict over ``defaults``.

  A bare word sets a boolean flag of that name; ``key=value`` values are Python literals when
  they parse as such, else strings.

  Raises:
    research.errors.UnknownKeyError: (a KeyError) an unknown key, naming the known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise errors.UnknownKeyError(f"unknown config variant {key!r}; known: {sorted(defaults)}")
    if not _:
      out[key] = True
      continue
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with defaults; experiment configs fill in and override.

  Each block's defaults are written once, beside the code that reads the block (``optim``,
  ``parallel``, ``multitask``, ``meta``, the PEFT dataclass); this assembles them.
  """
  from research import optim
  from research.meta import algorithms as meta_algorithms
  from research.models.config import PeftConfig
  from research.train import multitask, parallel

  c = ml_collections.ConfigDict()
  c.experiment = ""
  c.program = "supervised"  # the training program: 'supervised' | 'meta' (research.train.loop)
  # Modules imported before the run (and by predict mode, from config.json): plug-ins such as
  # task kinds defined outside research/ that register themselves on import (on PYTHONPATH).
  c.imports = ()
  c.seed = 0
  c.model = dict(
    checkpoint=MINILM,  # HF directory or hub id; also the tokenizer.
    family="",  # '': the family that reads the checkpoint's config.json; or a registered name
    init="pretrained",  # 'pretrained' | 'scratch'
    dtype="auto",  # compute dtype: 'auto' (fp32 on CPU, bf16 on GPU/TPU), 'float32', ...
    param_dtype="float32",
    remat=False,
    dropout=0.1,
    encoder_overrides={},  # EncoderConfig fields, e.g. {'num_layers': 2} for a tiny model.
    graft_rules=(("encoder/(.*)", r"encoder/\1"),),
    reinit_on_mismatch=(),
    strict_graft=False,
    # Read a checkpoint's pytorch_model.bin pickle (torch.load(weights_only=True)) when it has
    # no safetensors; off because unpickling runs code from the file: opt in for trusted files.
    allow_pickle=False,
    # Parameter-efficient transfer: research.models.config.PeftConfig's fields and defaults
    # (method 'none' trains everything; 'lora' | 'adapters' | 'bitfit').
    peft=dataclasses.asdict(PeftConfig()),
  )
  c.init_from = ""  # another run's workdir or an HF checkpoint to graft from (docs/design.md).
  c.resume_from = ""  # another run's workdir to resume exactly (state + input position).
  c.tasks = ml_collections.ConfigDict()
  c.train = dict(
    steps=1000,
    batch_size=32,
    grad_accum=1,
    log_every=50,
    eval_every=500,
    checkpoint_every=500,
    max_to_keep=2,
    best_metric="",
    best_mode="max",
    nonfinite_patience=5,
    progress=True,  # a bar on a terminal; else a plain line every progress_every_s seconds
    progress_every_s=60.0,
    profile_steps=(0, 0),  # (first, stop): steps [first, stop) traced into <workdir>/profile
  )
  c.eval = dict(batch_size=64)
  c.optim = optim.default_config()
  c.parallel = parallel.default_config()
  c.multitask = multitask.default_config()  # read only when config.tasks has several tasks
  c.meta = meta_algorithms.default_config()  # read only by program='meta'
  return c


def task(kind: str, data: ml_collections.ConfigDict, **head: Any) -> ml_collections.ConfigDict:
  """One entry of ``config.tasks``: its kind, data set and head options."""
  return ml_collections.ConfigDict(dict(kind=kind, data=data, head=head))


def fixture_data(name: str) -> dict[str, Any]:
  """Data fields that point a data set at its tiny committed copy under tests/fixtures/data.

  Prepared into its own tfds directory, ``<tfds dir>/fixtures`` (``$RESEARCH_TFDS_DIR`` or
  ``<repo>/.tfds``), so it never shadows the real data set's preparation, and so a checkout
  that cannot be written (or a test run that wants its own copy) moves it with the variable.
  """
  from research.data.locations import repo_root, tfds_dir

  return dict(
    manual_dir=str(repo_root() / "tests" / "fixtures" / "data" / name),
    data_dir=str(tfds_dir() / "fixtures"),
    verify_checksums=False,
  )


TINY_ENCODER = dict(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64)


def make_tiny(config: ml_collections.ConfigDict, task: str, fixture: str, steps: int) -> None:
  """Turns ``config`` into its ``tiny`` variant: a random 2-layer encoder trained on the
  committed fixture of ``task``, the whole real trainer in seconds on CPU (for tests)."""
  config.model.init = "scratch"
  config.model.encoder_overrides = TINY_ENCODER
  config.tasks[task].data.update(fixture_data(fixture), max_length=32, buckets=(32,))
  config.train.update(
    steps=steps,
    batch_size=8,
    log_every=5,
    eval_every=steps,
    checkpoint_every=10,
    progress=False,
  )
  config.eval.batch_size = 8


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config (no new fields) and returns it."""
  config.lock()
  return config


def finetune(c: ml_collections.ConfigDict, steps: int, best_metric: str, every: int = 500) -> None:
  """The fine-tuning recipe the experiments share: batches of 32, AdamW at 1e-4 with 6% warmup
  and linear decay, weight decay 0.01; eval and checkpoint every ``every`` steps."""
  c.train.update(
    steps=steps,
    batch_size=32,
    log_every=50,
    eval_every=every,
    checkpoint_every=every,
    best_metric=best_metric,
  )
  c.optim.update(lr=1e-4, warmup_fraction=0.06, weight_decay=0.01, schedule="linear")


def smoke(
  c: ml_collections.ConfigDict, steps: int = 20, max_length: int = 0, eval_examples: int = 0
) -> None:
  """A ``smoke`` variant's schedule: a few steps of 8, one eval and checkpoint at the end.

  Each task keeps one bucket, ``max_length`` (which also cuts its rows) or else its largest: a
  handful of steps would otherwise compile the train and eval steps once per bucket they
  happen to draw, which is most of a smoke run's time (bucketing and its compile-once-per-shape
  behaviour have tests of their own). ``eval_examples`` keeps the first examples of each eval
  split.
  """
  c.train.update(steps=steps, batch_size=8, log_every=5, eval_every=steps, checkpoint_every=steps)
  for task in c.get("tasks", {}).values():
    data = task.get("data", {})
    if max_length:
      data.update(max_length=max_length, buckets=(max_length,))
    elif data.get("buckets"):
      data.buckets = (max(data.buckets),)
    if eval_examples:
      data.splits.eval = f"{data.splits.eval}[:{eval_examples}]"


def ner_task(dataset: str, crf: bool = False) -> ml_collections.ConfigDict:
  """A CoNLL-style NER task: a token-classification head (optionally a CRF) on ``dataset``.

  Fine buckets keep padding near 23% (CoNLL-2003 sentences: median ~20 sub-tokens).
  """
  from research.data.registry import default_data_config

  buckets = (16, 24, 32, 40, 48, 64, 96, 128)
  data = default_data_config(dataset, max_length=128, buckets=buckets)
  return task("tagging", data, dropout=0.1, crf=crf)


def pair_experiment(
  arg: str | None,
  experiment: str,
  kind: str,
  task_name: str,
  epochs: int,
  batches_per_epoch: int,
  best_metric: str,
) -> ml_collections.ConfigDict:
  """A sentence-pair run (STS-B, MRPC): MiniLM as a cross-encoder, mean-pooled head, the
  fine-tuning recipe for ``epochs`` epochs of 32, one evaluation per epoch.

  ``arg`` takes the variants every pair config offers: ``smoke``, ``tiny``, ``init``.
  """
  from research.data.registry import default_data_config

  arg = parse_arg(arg, smoke=False, tiny=False, init="pretrained")
  c = base_config()
  c.experiment = experiment
  c.model.init = arg.init
  c.tasks[task_name] = task(kind, default_data_config(task_name), pooling="mean", dropout=0.1)
  steps = epochs * batches_per_epoch
  finetune(c, steps=steps, best_metric=f"{task_name}/{best_metric}", every=batches_per_epoch)
  if arg.smoke:
    smoke(c, max_length=64, eval_examples=256)
  if arg.tiny:
    make_tiny(c, task_name, fixture=task_name, steps=20)
  return lock(c)


def ner_experiment(
  arg: ml_collections.ConfigDict, experiment: str, task_name: str, dataset: str
) -> ml_collections.ConfigDict:
  """A CoNLL-style NER run of :func:`ner_task` (1500 steps x 32 sentences, lr 1e-4).

  ``arg`` holds the variants every NER config offers: ``smoke``, ``tiny``, ``crf``, ``init``.
  """
  c = base_config()
  c.experiment = experiment
  c.model.init = arg.init
  c.tasks[task_name] = ner_task(dataset, crf=arg.crf)
  finetune(c, steps=1500, best_metric=f"{task_name}/f1")
  c.eval.batch_size = 64
  if arg.smoke:  # Under a minute: 20 small steps, 256 eval sentences.
    smoke(c, max_length=64, eval_examples=256)
  if arg.tiny:
    make_tiny(c, task_name, fixture=dataset, steps=10)
  return c


def translation_experiment(
  arg: ml_collections.ConfigDict,
  experiment: str,
  model: Mapping[str, Any],
  vocab: Mapping[str, Any],
  steps: int,
  warmup: int,
  tiny_init: str = "rnd2rnd",
) -> ml_collections.ConfigDict:
  """A Multi30k en->de run: the protocol every model in the translation comparison shares, so
  that the configs differ only in their model (``model``: ``config.model`` fields, set first
  so ``tiny`` can shrink them) and source/target vocabularies (``vocab``).

  Label smoothing 0.1; beam-4 and greedy decoding (alpha 0.6, 64 tokens); ``steps`` of 128
  pairs, eval and checkpoint every 1000, best ``bleu``; AdamW (0.9, 0.98), eps 1e-9, weight
  decay 1e-4, inverse-square-root schedule after ``warmup`` steps. ``arg`` holds the variants
  every translation config offers: ``smoke`` (10 steps, 64 val sentences decoded greedily),
  ``tiny`` (a random 2-layer model with a 1-layer decoder initialised as ``tiny_init``, a BPE
  of 300, the committed fixture), ``lr``, ``seed``, ``steps``. Returns the config unlocked.
  """
  from research.data.registry import default_data_config

  c = base_config()
  c.experiment = experiment
  c.seed = arg.seed
  c.model.update(model)
  c.tasks.multi30k = task("seq2seq", default_data_config("multi30k"))
  c.tasks.multi30k.vocab = dict(vocab)
  c.tasks.multi30k.loss = dict(label_smoothing=0.1)
  c.tasks.multi30k.decode = dict(beam_sizes=(4, 1), alpha=0.6, max_length=64)
  c.train.update(
    steps=steps,
    batch_size=128,
    log_every=100,
    eval_every=1000,
    checkpoint_every=1000,
    best_metric="multi30k/bleu",
  )
  c.optim.update(
    lr=arg.lr,
    b2=0.98,
    eps=1e-9,
    weight_decay=1e-4,
    schedule="rsqrt",
    warmup_steps=warmup,
    warmup_fraction=0.0,
  )
  c.eval.batch_size = 128
  if arg.smoke:
    smoke(c, steps=10, eval_examples=64)  # Decoding all 1,014 took minutes.
    c.optim.warmup_steps = 5
    c.tasks.multi30k.decode = dict(beam_sizes=(1,), alpha=0.6, max_length=16)
  if arg.tiny:
    make_tiny(c, "multi30k", fixture="multi30k", steps=10)
    c.model.init = tiny_init
    c.model.decoder_overrides = {"num_layers": 1}
    c.tasks.multi30k.vocab.update(size=300, min_frequency=1)
    c.tasks.multi30k.data.target_max_length = 32
    c.tasks.multi30k.decode = dict(beam_sizes=(2, 1), alpha=0.6, max_length=8)
    c.optim.warmup_steps = 3
  if arg.steps:
    c.train.update(steps=arg.steps, eval_every=arg.steps, checkpoint_every=arg.steps)
  return c


def pretrained_translation(
  arg: ml_collections.ConfigDict, experiment: str, family: str, checkpoint: str
) -> ml_collections.ConfigDict:
  """Multi30k en->de fine-tuning of a pretrained encoder-decoder (T5, BART, Marian) under the
  protocol of :func:`translation_experiment`: every weight from ``arg.checkpoint`` (default
  ``checkpoint``, an HF directory or hub id of ``family``), its own tokenizer on both sides,
  its decoder start token. Without the weights, ``tiny`` (the committed fixture) and ``smoke``
  (10 steps on the real data) train a random model of the family's tiny shape on MiniLM's
  tokenizer, so the whole path runs anywhere; ``smoke,checkpoint=DIR`` is the smoke schedule
  on real weights. Returns the config unlocked.
  """
  model = dict(checkpoint=arg.checkpoint or checkpoint, init="pretrained")
  c = translation_experiment(arg, experiment, model, dict(target="pretrained"), 4000, 500)
  c.tasks.multi30k.vocab = dict(target="pretrained")
  c.model.init = "pretrained"  # translation_experiment's tiny sets a BERT2RND mode.
  c.model.graft_rules = ()  # The family's own: the whole model from the checkpoint.
  if (arg.tiny or arg.smoke) and not arg.checkpoint:
    c.model.update(checkpoint=MINILM, family=family, init="scratch")
  c.model.encoder_overrides = {}  # Assigned: make_tiny's EncoderConfig sizes are not T5's.
  c.model.decoder_overrides = {}  # The family's decoder is the checkpoint's.
  return c


# ----------------------------------------------------------------------------- loading


def load_module(path: str | os.PathLike) -> Any:
  """Imports a config file as a module, without touching ``sys.path``.

  Config files are not a package (``configs/`` has no ``__init__``), so every caller (the CLI,
  the launchers, the tests) loads them by path; the module is registered in ``sys.modules``
  under a private name so that dataclasses and pickling inside it work.

  Args:
    path: the config file.

  Returns:
    The executed module.
  """
  name = "_config_" + os.fspath(path).removesuffix(".py").replace(os.sep, "_").replace(".", "_")
  spec = importlib.util.spec_from_file_location(name, path)
  assert spec and spec.loader, path
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``get_config(variant)`` of a ``--config`` argument ``path[:variant]``.

  Args:
    spec: e.g. ``configs/sst2_minilm.py:smoke`` (no variant: ``get_config(None)``).
  """
  path, _, variant = spec.partition(":")
  return load_module(path).get_config(variant or None)


def check_key(config: Any, dotted: str, shown_as: str | None = None) -> None:
  """Raises KeyError unless the dotted key names a field of ``config``.

  Overrides of a locked config come from the command line and from sweeps; both should fail
  before a run starts, and say which keys would have been valid at the level that went wrong.

  Args:
    config: a ConfigDict (or nested dicts).
    dotted: e.g. ``optim.lr``.
    shown_as: how the message names the override (default: ``dotted``).

  Raises:
    research.errors.UnknownKeyError: (a KeyError) naming the key and the valid ones.
  """
  node, walked = config, []
  for key in dotted.split("."):
    if not hasattr(node, "keys") or key not in node:
      where = ".".join(walked) or "<top level>"
      valid = sorted(node.keys()) if hasattr(node, "keys") else []
      raise errors.UnknownKeyError(
        f"unknown config key {key!r} in {shown_as or dotted}; valid keys under {where}: {valid}"
      )
    node, walked = node[key], [*walked, key]


# ----------------------------------------------------------------------------- sweeps
# ``get_sweep()`` beside ``get_config(arg)`` returns overrides built with these; launch.sweep
# names the points and turns them into runs.

TAG = "@"  # Override keys starting with this name a point; they are not config keys.


def value_id(value: Any) -> str:
  """A hashable identity for an override value (tuples, dicts, floats alike)."""
  return json.dumps(value, default=str)


def strip_prefix(key: str) -> str:
  """``config.optim.lr`` -> ``optim.lr``: sweep keys may carry the command line's prefix."""
  return key[len("config.") :] if key.startswith("config.") else key


class Sweep(list):
  """A list of override dicts that also remembers axis display names and value labels.

  Attributes:
    names: config key -> short name used in point names.
    labels: config key -> {value id -> label}, for values that do not make good names
      (tuples of regexes, nested dicts).
    hidden: keys set by `variants`, left out of point names (the variant names them).
  """

  def __init__(self, points=(), names=None, labels=None, hidden=()):
    super().__init__(points)
    self.names: dict[str, str] = dict(names or {})
    self.labels: dict[str, dict[str, str]] = {k: dict(v) for k, v in (labels or {}).items()}
    self.hidden: set[str] = set(hidden)


@dataclasses.dataclass(frozen=True)
class Axis:
  """One named sweep axis: a config key and the values it takes.

  Attributes:
    key: dotted config path, e.g. `optim.lr`.
    values: the values, in order.
    name: short name used in point names; defaults to the key's last component.
    labels: optional label per value, used in point names instead of the value.
  """

  key: str
  values: tuple[Any, ...]
  name: str | None = None
  labels: tuple[str, ...] | None = None

  def points(self) -> Sweep:
    """Returns one override dict per value (with this axis' name and labels attached)."""
    labels = {}
    if self.labels:
      labels = {self.key: {value_id(v): lab for v, lab in zip(self.values, self.labels)}}
    names = {self.key: self.name} if self.name else {}
    return Sweep([{self.key: v} for v in self.values], names, labels)


Part = Axis | Mapping[str, Any] | Sequence[Mapping[str, Any]]


def axis(key: str, values: Iterable[Any] | Mapping[str, Any], name: str | None = None) -> Axis:
  """Returns an `Axis` over `values` of the config key `key`.

  Args:
    key: dotted config path (`optim.lr` or `config.optim.lr`).
    values: the values to sweep, in order; or a dict label -> value, where the labels name
      the points (`{"none": (), "bottom4": ("encoder/layer_[0-3]/.*",)}`).
    name: short display name for point names (default: last component of `key`).
  """
  if isinstance(values, Mapping):
    return Axis(strip_prefix(key), tuple(values.values()), name, tuple(values))
  return Axis(strip_prefix(key), tuple(values), name)


def seeds(values: Iterable[int] | int, key: str = "seed") -> Axis:
  """Returns a seed axis: `seeds(3)` is seeds 0, 1, 2; `seeds([7, 8])` is 7 and 8.

  Args:
    values: a count, or the explicit seeds.
    key: the config key holding the seed.
  """
  vals = range(values) if isinstance(values, int) else values
  return axis(key, vals, name="seed")


def variants(name: str, points: Mapping[str, Mapping[str, Any]]) -> Sweep:
  """Named variants, each a set of overrides: ``variants("method", {"lora": {...}, ...})``.

  The points are named ``method=lora`` etc. rather than by every key they set, which is what
  an ablation over methods that each change several fields wants. Combine with `product` /
  `seeds` as any other part.
  """
  out = [
    {TAG + name: label, **{strip_prefix(k): v for k, v in o.items()}} for label, o in points.items()
  ]
  hidden = {strip_prefix(k) for o in points.values() for k in o}
  return Sweep(out, hidden=hidden)


def as_sweep(part: Part) -> Sweep:
  """Any part (an axis, one override dict, a list of them) as a `Sweep`."""
  if isinstance(part, Axis):
    return part.points()
  if isinstance(part, Sweep):
    return part
  if isinstance(part, Mapping):
    return Sweep([dict(part)])
  return Sweep([dict(p) for p in part])


def _merge_meta(sweeps: Sequence[Sweep], points: list[dict[str, Any]]) -> Sweep:
  out = Sweep(points)
  for sw in sweeps:
    out.hidden |= sw.hidden
    out.names.update(sw.names)
    for k, labels in sw.labels.items():
      out.labels.setdefault(k, {}).update(labels)
  return out


def product(*parts: Part) -> Sweep:
  """Returns the cartesian product of axes (or lists of override dicts).

  Args:
    *parts: `Axis` objects, single override dicts, or lists of override dicts (including
      the results of `product` / `zipped`).

  Returns:
    One merged override dict per combination, the first part varying slowest.
  """
  sweeps = [as_sweep(p) for p in parts]
  out = []
  for combo in itertools.product(*sweeps):
    merged: dict[str, Any] = {}
    for d in combo:
      merged.update({strip_prefix(k): v for k, v in d.items()})
    out.append(merged)
  return _merge_meta(sweeps, out)


def zipped(*parts: Part) -> Sweep:
  """Returns the element-wise zip of axes of equal length (e.g. lr paired with warmup).

  Raises:
    ValueError: if the parts differ in length.
  """
  sweeps = [as_sweep(p) for p in parts]
  if len({len(x) for x in sweeps}) > 1:
    raise ValueError(f"zipped axes differ in length: {[len(x) for x in sweeps]}")
  points = [{strip_prefix(k): v for d in combo for k, v in d.items()} for combo in zip(*sweeps)]
  return _merge_meta(sweeps, points)
