"""Devices: the mesh, the shardings of state and batches, and multi-host start-up.

The default parallel mode is ``jit`` over a ``jax.sharding.Mesh`` with a ``data`` axis: the
batch is split along it, params and optimizer state are replicated (``fsdp`` shards them by
path rules). Axis types are ``Auto``: shardings are given at the jit boundary and XLA
propagates them, which is what the train step needs (no per-op annotations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def maybe_initialize_distributed(cfg: ml_collections.ConfigDict | None) -> None:
  """``jax.distributed.initialize`` when ``parallel.distributed`` is set.

  With no coordinator given, JAX auto-detects SLURM and TPU pod environments.
  """
  if cfg is None or not cfg.get("distributed", False):
    return
  kwargs = {}
  if cfg.get("coordinator_address"):
    kwargs = dict(
      coordinator_address=cfg.coordinator_address,
      num_processes=cfg.num_processes,
      process_id=cfg.process_id,
    )
  jax.distributed.initialize(**kwargs)


def make_mesh(cfg: ml_collections.ConfigDict | None = None) -> Mesh:
  """A ``(data, fsdp)`` mesh over all devices; ``parallel.fsdp`` devices on the fsdp axis."""
  fsdp = int(cfg.get("fsdp", 1)) if cfg is not None else 1
  n = jax.device_count()
  if n % fsdp:
    raise ValueError(f"parallel.fsdp={fsdp} does not divide the {n} devices")
  devices = np.asarray(jax.devices()).reshape(n // fsdp, fsdp)
  return Mesh(devices, ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch rows split over every device (both mesh axes)."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A global jax.Array per key from this process's rows (works on one process too)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  if batch_size % mesh.size:
    raise ValueError(f"{what}={batch_size} must divide by the {mesh.size} devices of the mesh")


def state_shardings(abstract_state: Any, mesh: Mesh, cfg: ml_collections.ConfigDict | None = None):
  """Shardings for every leaf of the state: replicated, or fsdp-sharded by path rules."""
  from research import paths

  rules = [tuple(r) for r in (cfg.get("fsdp_rules", ()) if cfg is not None else ())]
  fsdp = mesh.shape["fsdp"]

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
  make_step: Callable[[str | None], Callable],
  mode: str,
  mesh: Mesh,
  state_sharding: Any,
  batch_sharding_: NamedSharding,
) -> Callable:
  """The train step compiled for ``parallel.mode``, donating the state.

  Args:
    make_step: ``axis_name -> step``; ``None`` for jit (XLA partitions the global step),
      an axis name for per-device modes that reduce with ``psum``.
    mode: 'jit' (default).
    mesh, state_sharding, batch_sharding_: where state and batches live.
  """
  if mode == "jit":
    return jax.jit(
      make_step(None),
      in_shardings=(state_sharding, batch_sharding_),
      out_shardings=(state_sharding, replicated(mesh)),
      donate_argnums=(0,),
    )
  raise ValueError(f"parallel.mode={mode!r}: expected 'jit'")
