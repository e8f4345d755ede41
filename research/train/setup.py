"""How a run gets its first TrainState: shapes, optimizer and shardings, then restore or create.

Shared by every trainer (fine-tuning, multi-task, meta-learning), so they resume and graft the
same way. The order: the workdir's own checkpoint -> ``resume_from`` (another run's exact
state) -> ``init_from`` or the pretrained checkpoint, grafted into fresh params -> scratch.
Params are created in place: ``jax.eval_shape`` gives the shapes, the init is jitted with
``out_shardings``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import optax

from research import optim
from research.train import checkpoints as ckpt_lib
from research.train import parallel
from research.train.state import TrainState, init_plan, model_family
from research.transfer import graft as graft_lib
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


def optim_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.optim`` as the optimizer applies it: with ``model.peft`` on and no
  ``optim.trainable`` rules of the run's own, the method's rules (only its parameters and the
  heads train). A copy; ``config`` itself is never changed.
  """
  peft = peft_lib.from_config(config.model.peft)
  if peft.method == "none" or tuple(config.optim.trainable):
    return config.optim
  out = copy.deepcopy(config.optim)
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
    abstract, mesh, config.parallel, default_rules=model_family(config.model).sharding_rules
  )
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  return StatePlan(tx, optim_cfg, summary, abstract_params, shardings, abstract, create, rng)


def graft_source(config: ml_collections.ConfigDict) -> tuple[Any, str] | None:
  """Params to graft (``init_from`` or the pretrained checkpoint), or None for scratch."""
  source = config.init_from
  if source and any((Path(source) / d).is_dir() for d in ("best", "checkpoints")):
    params, where = ckpt_lib.load_params(source)
    return params, f"run checkpoint {where}"
  if source:  # An HF checkpoint directory or hub id.
    _, params = hf.load_pretrained(source)
    return params, f"HF checkpoint {source}"
  init, _ = init_plan(config)
  if init == "pretrained":
    _, params = hf.load_pretrained(config.model.checkpoint)
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
    state, data_state, step = ckpts.restore_newest_intact(plan.abstract, log)
    return state, data_state, f"resumed from {ckpts.latest.directory}/{step}"
  if config.resume_from:
    manager = ckpt_lib.Checkpoints(config.resume_from).latest
    state, data_state = ckpt_lib.restore_state(manager, plan.abstract)
    return state, data_state, f"resumed from {config.resume_from}"
  state = jax.jit(plan.create, out_shardings=plan.shardings)(plan.rng)
  source = graft_source(config)
  if source is None:
    return state, {}, "scratch"
  params, report = graft_lib.graft(
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
