"""Devices: the mesh, the shardings of state and batches, and multi-host start-up.

Modes (``config.parallel.mode``), one step body for all of them:

- ``jit`` (default): one program over a ``jax.sharding.Mesh`` with axes ``(data, fsdp)``. The
  batch is split over every device; params and optimizer state are replicated, or with
  ``parallel.fsdp=k`` split k ways along the ``fsdp`` axis by the path rules
  ``parallel.fsdp_rules`` (the rule format of freezing: ``(regex, True)``, first match wins).
  XLA's SPMD partitioner inserts the all-gathers and reduce-scatters.
- ``pmap``: the classic data-parallel program, written as ``shard_map`` under ``jit`` (what
  ``jax.pmap`` lowers to in current JAX): every device runs the step on its rows with a
  replicated state, and the step ``psum``-s summed losses, weights and gradients over the
  mesh axes before the (replicated) optimizer update.

Axis types are ``Auto`` on purpose (``jax.make_mesh`` would default to ``Explicit``): shardings
are given at the jit boundary and XLA propagates them, so the model code needs no per-op
sharding annotations. Multi-host runs call :func:`maybe_initialize_distributed` first; the
mesh then spans every process's devices and each process feeds its own rows of the global
batch (:func:`global_batch`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
MODES = ("jit", "pmap")


def default_config() -> dict[str, Any]:
  """The ``config.parallel`` fields: plain data parallelism on every device of one process."""
  return dict(
    mode="jit",  # 'jit' (one program over the mesh) | 'pmap' (per-device step, same body)
    fsdp=1,  # devices on the fsdp axis: params and optimizer moments split over them
    fsdp_rules=((".*kernel", True), (".*embedding", True)),
    distributed=False,  # jax.distributed.initialize (multi-host)
    coordinator_address="",  # '' lets JAX detect SLURM / TPU pods
    num_processes=1,
    process_id=0,
  )


def _settings(cfg: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(default_config()) if cfg is None else cfg


def maybe_initialize_distributed(cfg: ml_collections.ConfigDict | None) -> None:
  """``jax.distributed.initialize`` when ``parallel.distributed`` is set.

  With no coordinator given, JAX auto-detects SLURM and TPU pod environments.
  """
  cfg = _settings(cfg)
  if not cfg.distributed:
    return
  kwargs = {}
  if cfg.coordinator_address:
    kwargs = dict(
      coordinator_address=cfg.coordinator_address,
      num_processes=cfg.num_processes,
      process_id=cfg.process_id,
    )
  jax.distributed.initialize(**kwargs)


def make_mesh(cfg: ml_collections.ConfigDict | None = None, devices=None) -> Mesh:
  """A ``(data, fsdp)`` mesh with ``parallel.fsdp`` devices on the fsdp axis.

  Args:
    cfg: ``config.parallel`` (``fsdp``, ``mode``); None for plain data parallelism.
    devices: the devices to use (default: every device of every process).

  Raises:
    ValueError: fsdp does not divide the device count, or fsdp > 1 with mode 'pmap'
      (which replicates the state by definition).
  """
  cfg = _settings(cfg)
  fsdp, mode = int(cfg.fsdp), cfg.mode
  if mode == "pmap" and fsdp > 1:
    raise ValueError("parallel.mode='pmap' replicates the state; use mode='jit' for fsdp")
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"parallel.fsdp={fsdp} does not divide the {n} devices")
  grid = np.asarray(devices).reshape(n // fsdp, fsdp)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch rows split over every device (both mesh axes)."""
  return NamedSharding(mesh, P(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """A value every device holds whole."""
  return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A global jax.Array per key from this process's rows (works on one process too)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  """Raises ValueError unless ``batch_size`` rows split evenly over the mesh's devices."""
  if batch_size % mesh.size:
    raise ValueError(f"{what}={batch_size} must divide by the {mesh.size} devices of the mesh")


def state_shardings(
  abstract_state: Any,
  mesh: Mesh,
  cfg: ml_collections.ConfigDict | None = None,
  default_rules: Sequence[tuple[str, Any]] = (),
):
  """Shardings for every leaf of the state (params, optimizer moments, counters).

  A leaf whose path matches ``cfg.fsdp_rules`` (or ``default_rules``, the model family's
  ``sharding_rules``, when those are empty) is split along its largest dimension that the
  fsdp axis divides (replicated when none does); every other leaf is replicated. Optimizer
  moments have the paths of their params under ``opt_state/...``, so the rules (``.*kernel``)
  shard them alike. With an fsdp axis of 1, or mode 'pmap', everything is replicated.

  Args:
    abstract_state: the state's shapes (``jax.eval_shape``) or the state itself.
    mesh: from :func:`make_mesh`.
    cfg: ``config.parallel``.
    default_rules: the rules used when ``cfg.fsdp_rules`` is empty (research.models.families:
      ``family_of(encoder config).sharding_rules``).

  Returns:
    A pytree of NamedShardings shaped like ``abstract_state``.
  """
  from research import paths

  rules = [tuple(r) for r in (cfg.get("fsdp_rules", ()) if cfg is not None else ())]
  rules = rules or [tuple(r) for r in default_rules]
  fsdp = mesh.shape["fsdp"]
  if cfg is not None and cfg.get("mode", "jit") == "pmap":
    fsdp = 1

  def spec(path: str, leaf: Any) -> NamedSharding:
    shape = getattr(leaf, "shape", ())
    if fsdp > 1 and rules and len(shape) >= 1 and paths.match(rules, path, False):
      # Shard the largest dimension that divides evenly; replicate otherwise.
      for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
          axes = [None] * len(shape)
          axes[dim] = "fsdp"
          return NamedSharding(mesh, P(*axes))
    return NamedSharding(mesh, P())

  return paths.map_with_path(spec, abstract_state)


def compile_train_step(
  make_step: Callable[[Any], Callable],
  mode: str,
  mesh: Mesh,
  state_sharding: Any,
  batch_sharding_: NamedSharding,
) -> Callable:
  """The train step compiled for ``parallel.mode``, donating the state.

  Args:
    make_step: ``axis_name -> step``; ``None`` for jit (XLA partitions the global step), the
      mesh's axis names for 'pmap', whose per-device step reduces with ``psum`` over them.
    mode: 'jit' (default) or 'pmap'.
    mesh: the device mesh (:func:`make_mesh`).
    state_sharding: shardings of the state (:func:`state_shardings`; replicated for 'pmap').
    batch_sharding_: the batch's sharding (:func:`batch_sharding`).

  Returns:
    ``step(state, batch) -> (state, metrics)``, jitted; metrics come back replicated.

  Raises:
    ValueError: an unknown mode, or a sharded state under 'pmap'.
  """
  out_shardings = (state_sharding, replicated(mesh))
  if mode == "jit":
    return jax.jit(
      make_step(None),
      in_shardings=(state_sharding, batch_sharding_),
      out_shardings=out_shardings,
      donate_argnums=(0,),
    )
  if mode == "pmap":
    if any(not s.is_fully_replicated for s in jax.tree.leaves(state_sharding)):
      raise ValueError("parallel.mode='pmap' needs a replicated state (fsdp=1)")
    # check_vma=False: the step reduces explicitly with psum. With vma checking on, JAX would
    # also insert a psum when differentiating the (replicated) params against per-device
    # losses, and the step's own psum would then count every device's gradient n times.
    per_device = jax.shard_map(
      make_step(mesh.axis_names),
      mesh=mesh,
      in_specs=(P(), batch_sharding_.spec),
      out_specs=(P(), P()),
      check_vma=False,
    )
    return jax.jit(
      per_device,
      in_shardings=(state_sharding, batch_sharding_),
      out_shardings=out_shardings,
      donate_argnums=(0,),
    )
  raise ValueError(f"parallel.mode={mode!r}: expected one of {MODES}")
