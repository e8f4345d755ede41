"""How a run gets its first TrainState: checks, shapes, optimizer and shardings, then restore or
create.

Shared by every trainer (fine-tuning, multi-task, meta-learning), so they check, resume and
graft the same way. :func:`check_config` is the one place where a config's values, batch
divisibility, init sources and data splits are checked, before the program builds anything or
the run writes a file. The order of sources: the workdir's own checkpoint -> ``resume_from``
(another run's exact state) -> ``init_from`` or the pretrained checkpoint, grafted into fresh
params -> scratch.
Params are created in place: ``jax.eval_shape`` gives the shapes, the init is jitted with
``out_shardings``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import optax

from research import errors, optim
from research.train import checkpoints as ckpt_lib
from research.train import parallel
from research.train.state import TrainState, encoder_config, init_plan, model_family
from research.transfer import hf
from research.transfer import peft as peft_lib


@dataclasses.dataclass
class StatePlan:
  """What a run's state will be, before any of it exists.

  Attributes:
    tx: the optax chain; optim: the ``config.optim`` it was built from (:func:`optim_config`);
      summary: its printed group summary.
    abstract_params: the params' shapes.
    shardings: a TrainState of shardings; abstract: of sharded ShapeDtypeStructs.
    create: ``rng -> TrainState`` (params from the init, optimizer state, RNG).
    rng: the raw key data ``create`` is called with.
  """

  tx: optax.GradientTransformation
  optim: ml_collections.ConfigDict
  summary: list[str]
  abstract_params: Any
  shardings: Any
  abstract: Any
  create: Callable[[jax.Array], TrainState]
  rng: jax.Array


# Range checks of single values: (key, allowed?, what is allowed). Zero has a meaning for some:
# train.steps=0 evaluates only; eval_every=0 / checkpoint_every=0 turn those off.
RANGES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
  ("train.steps", lambda v: v >= 0, ">= 0 (0: evaluate only)"),
  ("train.grad_accum", lambda v: v >= 1, ">= 1"),
  ("train.log_every", lambda v: v >= 1, ">= 1"),
  ("train.eval_every", lambda v: v >= 0, ">= 0 (0: no evaluation during training)"),
  ("train.checkpoint_every", lambda v: v >= 0, ">= 0 (0: no checkpoints)"),
  ("train.max_to_keep", lambda v: v >= 1, ">= 1"),
  ("train.nonfinite_patience", lambda v: v >= 1, ">= 1"),
  ("train.progress_every_s", lambda v: v >= 0, ">= 0 (0: a line every log step)"),
  ("optim.lr", lambda v: v >= 0, ">= 0"),
  ("optim.warmup_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
  ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
  ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
  ("optim.clip_norm", lambda v: v >= 0, ">= 0 (0: no clipping)"),
)
# The batch sizes a program splits row by row over the devices. A program not listed reads
# train.batch_size and eval.batch_size, as the supervised one does.
BATCH_FIELDS = {"meta": ("meta.episodes_per_batch", "meta.eval_episodes_per_batch")}
DEFAULT_BATCH_FIELDS = ("train.batch_size", "eval.batch_size")
INIT_MODES = ("pretrained", "scratch")  # Plus the seq2seq modes (research.models.seq2seq).


def _value(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Rejects a config no run can use, before the program builds or the run writes anything.

  The loop calls this first, so a nonsense value fails in one line instead of as an opaque
  error mid-run (``batch_size=0``: a ZeroDivisionError) or not at all (``steps=-5``: an eval
  of the untrained model), and a split or file the first evaluation would read fails before
  the interval before it is trained and lost. Checks that need the model stay in the program's
  ``build``.

  Args:
    config: the run's config.
    mesh: the devices batches are split over.

  Raises:
    research.errors.UsageError: a value out of range, a batch size that does not split over
      the devices, an unknown ``model.init``, a split the data set does not have; the message
      names the key, its value and what is allowed.
    research.errors.RunError: an ``init_from`` / ``resume_from`` that holds nothing to start
      from, or a split whose raw file is missing; the message names the directory or file.
    FileNotFoundError, research.data.builders.common.InputError: missing or malformed raw data.
  """
  for key, allowed, what in RANGES:
    value = _value(config, key)
    if isinstance(value, numbers.Real) and not allowed(value):
      raise errors.UsageError(f"{key}={value}: must be {what}")
  fields = BATCH_FIELDS.get(config.program, DEFAULT_BATCH_FIELDS)
  for key in fields:
    value = _value(config, key)
    if value < 1:
      raise errors.UsageError(f"{key}={value}: must be >= 1")
    rows = parallel.batch_devices(mesh)  # A tensor-parallel group shares its rows.
    if value % rows:
      raise errors.UsageError(
        f"{key}={value}: must be a multiple of the devices the batch is split over, {rows} "
        "(data x fsdp; each gets the same number of rows)"
      )
  tcfg = config.train
  if "train.batch_size" in fields and tcfg.batch_size % tcfg.grad_accum:
    raise errors.UsageError(
      f"train.batch_size={tcfg.batch_size}: must divide by train.grad_accum={tcfg.grad_accum}"
    )
  if tcfg.best_mode not in ("max", "min"):
    raise errors.UsageError(f"train.best_mode={tcfg.best_mode!r}: must be 'max' or 'min'")
  profile = tuple(tcfg.get("profile_steps", (0, 0)))
  if len(profile) != 2 or not all(isinstance(x, int) and x >= 0 for x in profile):
    raise errors.UsageError(
      f"train.profile_steps={profile}: must be (first, stop), two step numbers >= 0"
    )
  from research.models import seq2seq

  modes = (*INIT_MODES, *seq2seq.INIT_MODES)
  if config.model.init not in modes:
    raise errors.UsageError(f"model.init={config.model.init!r}: must be one of {list(modes)}")
  check_sources(config)
  from research.data import sources

  check_packing(config)
  for name, task in config.tasks.items():
    named = task.data.get("splits")
    if named is None:  # A task whose data is not a registered data set.
      continue
    splits = {f"tasks.{name}.data.splits.eval": named.eval}
    if int(tcfg.steps) > 0:
      splits[f"tasks.{name}.data.splits.train"] = named.train
    sources.check_splits(task.data, splits)


def check_packing(config: ml_collections.ConfigDict) -> None:
  """Raises for a packed task whose head cannot read packed rows: the encoder's ``pooler``
  (it reads position 0 of a row, one example of several) or a CRF (its transitions would cross
  examples). The model would refuse too, but only once built, after the data is prepared.

  Raises:
    research.errors.UsageError: naming the task's head key and the fix.
  """
  from research import tasks as task_lib

  for name, task in config.tasks.items():
    if not task.data.get("packing", False):
      continue
    head = task_lib.get(task.kind).head(task, 2)
    where = f"tasks.{name}.data.packing=True"
    if getattr(head, "layout", "") != "token" and getattr(head, "pooling", "") == "pooler":
      raise errors.UsageError(
        f"{where} with tasks.{name}.head.pooling='pooler': the encoder's pooler reads a row's "
        "first token only; use 'cls', 'mean' or 'last'"
      )
    if getattr(head, "crf", False):
      raise errors.UsageError(
        f"{where} with tasks.{name}.head.crf=True: CRF transitions would cross the examples of "
        "a row; train the CRF unpacked"
      )


def _has_step(directory: Path) -> bool:
  """Whether an orbax directory holds a finished ``<step>/`` (a killed save leaves ``*-tmp``)."""
  return directory.is_dir() and any(c.name.isdigit() and c.is_dir() for c in directory.iterdir())


def _is_run(directory: Path) -> bool:
  """Whether ``directory`` is a run's workdir (rather than an HF checkpoint directory)."""
  if any((directory / n).exists() for n in ("checkpoints", "best", "metrics.jsonl")):
    return True
  try:  # A run that failed early leaves only its config.json, which is not an HF one.
    fields = json.loads((directory / hf.CONFIG).read_text())
  except (OSError, ValueError):
    return False
  return isinstance(fields, dict) and "model_type" not in fields and "tasks" in fields


def check_sources(config: ml_collections.ConfigDict) -> None:
  """Raises unless ``resume_from`` and a local ``init_from`` (or the ``model.checkpoint``
  grafted without one) hold something to start from.

  Hub ids (``owner/name``) are left to :func:`research.transfer.hf.resolve`, which may fetch.

  Raises:
    research.errors.RunError: naming the key, the directory and what is missing.
  """
  if config.resume_from:
    where = Path(config.resume_from).expanduser()
    problem = (
      "no such directory"
      if not where.is_dir()
      else "no checkpoints/ in it (not a run directory)"
      if not (where / "checkpoints").is_dir()
      else "its checkpoints/ holds no step (that run saved none)"
      if not _has_step(where / "checkpoints")
      else None
    )
    if problem:
      raise errors.RunError(
        f"resume_from={where}: {problem}; resume_from continues another run's workdir from its "
        "checkpoints/<step>/ (to start from a run's or HF checkpoint's params, use init_from)"
      )
  allow_pickle = bool(config.model.get("allow_pickle", False))
  source = config.init_from
  if not source:
    from research.models import seq2seq

    mode = config.model.init
    grafted = mode == "pretrained" or (
      mode in seq2seq.INIT_MODES and seq2seq.init_plan(mode)[0] == "pretrained"
    )
    if grafted and Path(config.model.checkpoint).expanduser().is_dir():
      hf.check_weights(Path(config.model.checkpoint).expanduser(), allow_pickle)
    return
  where = Path(source).expanduser()
  if where.is_dir() and _is_run(where):
    if not (_has_step(where / "best") or _has_step(where / "checkpoints")):
      raise errors.RunError(
        f"init_from={where}: a run directory with no checkpoint (best/ and checkpoints/ hold no "
        "step; did that run fail before saving one?); give a run that saved a checkpoint, or an "
        "HF checkpoint directory"
      )
  elif where.is_dir():
    if not (where / hf.CONFIG).is_file():
      raise errors.RunError(
        f"init_from={where}: neither an HF checkpoint directory (no {hf.CONFIG}) nor a run "
        "directory (no best/ or checkpoints/)"
      )
    hf.check_weights(where, allow_pickle)
  elif not where.exists() and (str(source).startswith((".", "/", "~")) or source.count("/") > 1):
    raise errors.RunError(
      f"init_from={source}: no such directory; give a run's workdir, an HF checkpoint directory "
      "or a hub id (owner/name)"
    )


def optim_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.optim`` as the optimizer applies it: with ``model.peft`` on and no
  ``optim.trainable`` rules of the run's own, the method's rules (only its parameters and the
  heads train). A copy; ``config`` itself is never changed.
  """
  peft = peft_lib.from_config(config.model.peft)
  if peft.method == "none" or tuple(config.optim.trainable):
    return config.optim
  out = copy.deepcopy(config.optim)
  kinds = {task.kind for task in config.tasks.values()}
  if kinds == {"seq2seq"} and model_family(config.model).seq2seq is not None:
    # A pretrained encoder-decoder (research.models.seq2seq.FamilySeq2Seq) has no heads: its
    # output layer is the family's own. BitFit then trains every bias of both stacks and
    # ``final_logits_bias`` (the output layer's), as Ben Zaken et al. train all biases.
    # Adapters train every norm of both stacks (the decoder's too), as Houlsby et al. do.
    rules = peft_lib.trainable_rules(peft, ())
    if peft.method == "bitfit":
      rules = (r".*bias",)
    elif peft.method == "adapters":
      rules = (r".*adapter.*", peft_lib.SEQ2SEQ_NORMS)
    out.trainable = rules
    return out
  out.trainable = peft_lib.trainable_rules(peft, tuple(config.tasks))
  return out


def plan_state(
  config: ml_collections.ConfigDict,
  init: Callable[[jax.Array], Any],
  mesh: jax.sharding.Mesh,
  total_steps: int,
) -> StatePlan:
  """Shapes, optimizer and shardings of the state ``init`` (``rng -> params``) starts."""
  rng = jax.random.key_data(jax.random.key(config.seed))
  abstract_params = jax.eval_shape(init, rng)
  optim_cfg = optim_config(config)
  tx, summary = optim.build(optim_cfg, abstract_params, total_steps)
  create = lambda r: TrainState.create(
    init(r), tx, jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(r), 1))
  )
  abstract = jax.eval_shape(create, rng)
  shardings = parallel.state_shardings(
    abstract,
    mesh,
    config.parallel,
    default_rules=model_family(config.model).sharding_rules,
    model_config=encoder_config(config.model),  # Head counts for the tensor-parallel rules.
  )
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  return StatePlan(tx, optim_cfg, summary, abstract_params, shardings, abstract, create, rng)


def graft_source(config: ml_collections.ConfigDict) -> tuple[Any, str] | None:
  """Params to graft (``init_from`` or the pretrained checkpoint), or None for scratch."""
  source = config.init_from
  allow_pickle = bool(config.model.get("allow_pickle", False))
  if source and any((Path(source) / d).is_dir() for d in ("best", "checkpoints")):
    params, where = ckpt_lib.load_params(source)
    return params, f"run checkpoint {where}"
  if source:  # An HF checkpoint directory or hub id.
    _, params = hf.load_pretrained(source, allow_pickle=allow_pickle)
    return params, f"HF checkpoint {source}"
  init, _ = init_plan(config)
  if init == "pretrained":
    _, params = hf.load_pretrained(config.model.checkpoint, allow_pickle=allow_pickle)
    return params, f"HF checkpoint {config.model.checkpoint}"
  if init != "scratch":
    raise ValueError(
      f"model.init={config.model.init!r}: expected pretrained, scratch or a seq2seq init mode"
    )
  return None


def first_state(
  plan: StatePlan,
  config: ml_collections.ConfigDict,
  ckpts: ckpt_lib.Checkpoints,
  log: Callable[[str], None],
  report_path: Path | None,
) -> tuple[TrainState, dict, str]:
  """``(state, input-iterator state, origin)``: restored, or created and grafted.

  Args:
    plan: from :func:`plan_state`.
    config: the run's config (``resume_from``, ``init_from``, ``model.*`` graft settings).
    ckpts: the workdir's checkpoints.
    log: prints a line (the graft summary).
    report_path: where the graft report is saved (None: not saved, e.g. on other processes).
  """
  if ckpts.latest_step() is not None:
    try:
      state, data_state, step = ckpts.restore_newest_intact(plan.abstract, log)
    except ckpt_lib.CheckpointMismatchError as e:
      workdir = Path(ckpts.latest.directory).parent
      raise ckpt_lib.CheckpointMismatchError(
        f"{workdir} holds a run of another model ({e}); give this run another --workdir, or "
        f"run that one with its own config ({workdir / 'config.json'})"
      ) from e
    return state, data_state, f"resumed from {ckpts.latest.directory}/{step}"
  if config.resume_from:
    manager = ckpt_lib.Checkpoints(config.resume_from).latest
    try:
      state, data_state = ckpt_lib.restore_state(manager, plan.abstract)
    except ckpt_lib.CheckpointMismatchError as e:
      raise ckpt_lib.CheckpointMismatchError(
        f"resume_from={config.resume_from} holds a run of another model ({e}); resume_from "
        "needs the same model (init_from grafts what fits)"
      ) from e
    return state, data_state, f"resumed from {config.resume_from}"
  state = jax.jit(plan.create, out_shardings=plan.shardings)(plan.rng)
  source = graft_source(config)
  if source is None:
    return state, {}, "scratch"
  # peft's graft: a plain graft, except that a QLoRA base is quantised after loading.
  params, report = peft_lib.graft(
    state.params,
    source[0],
    init_plan(config)[1],
    strict=config.model.strict_graft,
    reinit_on_mismatch=tuple(config.model.reinit_on_mismatch),
  )
  opt_state = jax.jit(plan.tx.init, out_shardings=plan.shardings.opt_state)(params)
  log(report.summary())
  if report_path is not None:
    report.save(report_path)
  return state.replace(params=params, opt_state=opt_state), {}, f"grafted from {source[1]}"
