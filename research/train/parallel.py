"""Devices: the mesh, the shardings of state and batches, and multi-host start-up.

Modes (``config.parallel.mode``), one step body for all of them:

- ``jit`` (default): one program over a ``jax.sharding.Mesh`` with axes ``(data, fsdp,
  tensor)``. The batch is split over ``data`` and ``fsdp``; the devices of one ``tensor`` group
  see the same rows. Params and optimizer state are replicated, or split over ``fsdp``
  (``parallel.fsdp=k``) and ``tensor`` (``parallel.tensor=k``, Megatron-style) by path rules
  (:func:`state_shardings`). XLA's SPMD partitioner inserts the all-gathers, reduce-scatters
  and all-reduces.
- ``pmap``: the classic data-parallel program, written as ``shard_map`` under ``jit`` (what
  ``jax.pmap`` lowers to in current JAX): every device runs the step on its rows with a
  replicated state, and the step ``psum``-s summed losses, weights and gradients over the
  mesh axes before the (replicated) optimizer update.

Axis types are ``Auto`` on purpose (``jax.make_mesh`` would default to ``Explicit``): shardings
are given at the jit boundary and XLA propagates them, so the model code needs no per-op
sharding annotations. Any sharding of the state is a layout, not a different computation: the
rules decide memory and communication, never the numbers. Multi-host runs call
:func:`maybe_initialize_distributed` first; the mesh then spans every process's devices and each
process feeds its own rows of the global batch (:func:`global_batch`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # Batch rows are split over these; a tensor group shares rows.
MODES = ("jit", "pmap")


def default_config() -> dict[str, Any]:
  """The ``config.parallel`` fields: plain data parallelism on every device of one process."""
  return dict(
    mode="jit",  # 'jit' (one program over the mesh) | 'pmap' (per-device step, same body)
    fsdp=1,  # devices on the fsdp axis: params and optimizer moments split over them
    tensor=1,  # devices on the tensor axis: Megatron-style splits of heads and MLP width
    # Sharding rules (state_shardings); empty: the model family's sharding_rules.
    fsdp_rules=(),
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
  """A ``(data, fsdp, tensor)`` mesh; the data axis takes the devices fsdp and tensor leave.

  ``tensor`` is the innermost (fastest-varying) axis, so a tensor group is made of neighbouring
  devices (one host's, on a GPU node the NVLink-connected ones): its all-reduces run every
  layer, the fsdp and data collectives once per step.

  Args:
    cfg: ``config.parallel`` (``fsdp``, ``tensor``, ``mode``); None for plain data parallelism.
    devices: the devices to use (default: every device of every process).

  Raises:
    ValueError: fsdp * tensor does not divide the device count, or fsdp or tensor > 1 with
      mode 'pmap' (which replicates the state by definition).
  """
  cfg = _settings(cfg)
  fsdp, tensor, mode = int(cfg.fsdp), int(cfg.get("tensor", 1)), cfg.mode
  if mode == "pmap" and (fsdp > 1 or tensor > 1):
    raise ValueError(
      "parallel.mode='pmap' replicates the state; use mode='jit' for fsdp or tensor > 1"
    )
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or tensor < 1 or n % (fsdp * tensor):
    raise ValueError(
      f"parallel.fsdp={fsdp} * parallel.tensor={tensor} does not divide the {n} devices"
    )
  grid = np.asarray(devices).reshape(n // (fsdp * tensor), fsdp, tensor)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch rows split over the data and fsdp axes, the same rows on every tensor device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_devices(mesh: Mesh) -> int:
  """How many ways a batch's rows are split: the product of the data and fsdp axes."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def replicated(mesh: Mesh) -> NamedSharding:
  """A value every device holds whole."""
  return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A global jax.Array per key from this process's rows (works on one process too)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  """Raises ValueError unless ``batch_size`` rows split evenly over the batch axes."""
  n = batch_devices(mesh)
  if batch_size % n:
    raise ValueError(
      f"{what}={batch_size} must divide by the {n} row shards of the mesh (data * fsdp)"
    )


def _largest_free_dim(shape: Sequence[int], taken: Sequence[list], size: int) -> int | None:
  """The largest dimension with no axis on it yet that ``size`` divides, or None."""
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if not taken[dim] and shape[dim] % size == 0:
      return dim
  return None


def _resolve(
  rule: str, spec: Sequence[Any], shape: Sequence[int], mesh: Mesh, model_config: Any
) -> P:
  """A rule's per-dimension spec turned into the PartitionSpec this leaf can take.

  Each entry is None, an axis name, or a tuple of them (one dimension over several axes, major
  first); an axis name may end in ``:field``, a field of the model's config (``num_heads``) that
  the axis must divide as well, so a split keeps whole heads. An axis that does not divide its
  dimension (or field) is left out, so odd sizes (a vocabulary of 50257) fall back to
  replication; ``fsdp`` then goes to the largest free dimension it divides, as ``True`` does.
  A spec of another rank than the leaf (a factored optimizer statistic at a param's path) keeps
  only that fsdp fallback. Axes of size 1 are dropped.
  """
  taken: list[list[str]] = [[] for _ in shape]
  wanted = set()
  for dim, entry in enumerate(spec):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    for name in names:
      axis, _, field = str(name).partition(":")
      if axis not in mesh.shape:
        raise ValueError(f"sharding rule {rule!r}: unknown mesh axis {axis!r} (axes: {AXES})")
      if axis in wanted:
        raise ValueError(f"sharding rule {rule!r}: axis {axis!r} named twice in {spec!r}")
      wanted.add(axis)
      size = mesh.shape[axis]
      if size == 1 or len(spec) != len(shape):
        continue
      if field:
        units = getattr(model_config, field, None)
        if not isinstance(units, int):
          raise ValueError(
            f"sharding rule {rule!r}: {name!r} needs the model config's {field!r} "
            f"(state_shardings(..., model_config=)); got {type(model_config).__name__}"
          )
        if units % size:
          continue
      already = int(np.prod([mesh.shape[a] for a in taken[dim]]))
      if shape[dim] % (already * size) == 0:
        taken[dim].append(axis)
  fsdp = mesh.shape.get("fsdp", 1)
  if "fsdp" in wanted and fsdp > 1 and not any("fsdp" in t for t in taken):
    dim = _largest_free_dim(shape, taken, fsdp)
    if dim is not None:
      taken[dim].append("fsdp")
  return _spec([None if not t else t[0] if len(t) == 1 else tuple(t) for t in taken])


def _spec(axes: list[Any]) -> P:
  """A PartitionSpec without trailing Nones (so a replicated leaf's spec is ``P()``)."""
  while axes and axes[-1] is None:
    axes = axes[:-1]
  return P(*axes)


def state_shardings(
  abstract_state: Any,
  mesh: Mesh,
  cfg: ml_collections.ConfigDict | None = None,
  default_rules: Sequence[tuple[str, Any]] = (),
  model_config: Any = None,
):
  """Shardings for every leaf of the state (params, optimizer moments, counters).

  The rules are ``cfg.fsdp_rules``, or when those are empty ``default_rules`` (the model
  family's ``sharding_rules``): ``(regex, value)`` pairs over leaf paths, first match wins
  (research.paths). A value is

  - ``True``: split the leaf's largest dimension that the fsdp axis divides over ``fsdp`` (the
    original FSDP rule; nothing goes on ``tensor``);
  - a PartitionSpec-like tuple, one entry per dimension: None, an axis name (``"fsdp"``,
    ``"tensor"``) or a tuple of them; ``"tensor:num_heads"`` splits only when the tensor axis
    also divides that field of ``model_config``, so every device holds whole heads. Entries
    that do not divide are dropped (see :func:`_resolve`);
  - False / None, or no matching rule: replicated.

  Optimizer moments have the paths of their params under ``opt_state/...``, so rules written as
  ``.*attention/query/kernel`` shard them alike. Under mode 'pmap' everything is replicated.

  Args:
    abstract_state: the state's shapes (``jax.eval_shape``) or the state itself.
    mesh: from :func:`make_mesh`.
    cfg: ``config.parallel``.
    default_rules: the rules used when ``cfg.fsdp_rules`` is empty (research.models.families:
      ``family_of(encoder config).sharding_rules``).
    model_config: the model's config (its ``num_heads``, ``num_kv_heads`` ...), for rules that
      name a field; only needed when such a rule meets an axis of size > 1.

  Returns:
    A pytree of NamedShardings shaped like ``abstract_state``.

  Raises:
    ValueError: a rule names an unknown axis or the same axis twice, or names a field that
      ``model_config`` lacks.
  """
  from research import paths

  rules = [tuple(r) for r in (cfg.get("fsdp_rules", ()) if cfg is not None else ())]
  rules = rules or [tuple(r) for r in default_rules]
  compiled = paths.compile_rules(rules)
  if cfg is not None and cfg.get("mode", "jit") == "pmap":
    compiled = []
  fsdp = mesh.shape.get("fsdp", 1)

  def spec(path: str, leaf: Any) -> NamedSharding:
    shape = tuple(getattr(leaf, "shape", ()))
    hit = next(((p.pattern, v) for p, v in compiled if p.fullmatch(path)), None)
    if hit is None or not shape:
      return NamedSharding(mesh, P())
    rule, value = hit
    if isinstance(value, str):
      raise ValueError(f"sharding rule {rule!r}: expected True or a tuple per dim, got {value!r}")
    if isinstance(value, (tuple, list)):
      return NamedSharding(mesh, _resolve(rule, value, shape, mesh, model_config))
    if not value:
      return NamedSharding(mesh, P())
    # True: the original FSDP rule, the largest dimension the fsdp axis divides.
    dim = _largest_free_dim(shape, [[] for _ in shape], fsdp) if fsdp > 1 else None
    axes = [None] * len(shape)
    if dim is not None:
      axes[dim] = "fsdp"
    return NamedSharding(mesh, _spec(axes))

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
      raise ValueError("parallel.mode='pmap' needs a replicated state (fsdp=tensor=1)")
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
