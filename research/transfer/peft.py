"""Parameter-efficient transfer: LoRA, bottleneck adapters and BitFit as config, not code paths.

Each method is two things the ordinary run already has: extra parameter subtrees in the
ordinary model (``lora_a``/``lora_b`` beside a projection's ``kernel``; ``attention_adapter``
and ``ffn_adapter`` inside each encoder layer; nothing for BitFit) and ``optim.trainable``
rules, so the optax freeze mask leaves everything else without optimizer state. The same train
step, checkpoints and grafting serve all methods; PEFT leaves are absent from an HF checkpoint,
so grafting leaves them at init, and their init makes the model equal to the base model.
The config (:class:`PeftConfig`, re-exported here) and the layers belong to the models layer
(research.models.config, research.models.peft_layers); this module holds what reads parameter
trees and configs: the trainable rules, parameter counts and LoRA merging.

- ``lora`` (Hu et al. 2021): ``y = x W + b + dropout(x) A B * alpha / rank`` on every projection
  whose module path fully matches one of ``lora_targets``; A is kaiming-uniform, B zeros.
  Trains A, B and the heads. :func:`merge_lora` folds A B into W for export.
- ``adapters`` (Houlsby et al. 2019; Pfeiffer et al. 2020): ``h + up(gelu(down(h)))`` with a
  zero ``up``, after the attention output and after the FFN (``houlsby``) or after the FFN
  only (``pfeiffer``). Trains the adapters, every encoder LayerNorm (as Houlsby et al. do) and
  the heads. Adapters have no counterpart in a plain HF BERT, so they cannot be exported.
- ``bitfit`` (Ben Zaken et al. 2022): trains every encoder bias (LayerNorm biases included) and
  the heads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from research import paths
from research.models.config import PeftConfig

LORA_LEAVES = ("lora_a", "lora_b")
ENCODER_NORMS = r"encoder/(.*/)?(layer_norm|attention_norm|output_norm)/(scale|bias)"


def from_config(cfg: Mapping[str, Any] | Any | None) -> PeftConfig:
  """A PeftConfig from ``config.model.peft`` (a ConfigDict or a mapping; None: method 'none').

  Raises:
    ValueError: an unknown field, method or placement.
  """
  if cfg is None:
    return PeftConfig()
  values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  known = {f.name for f in dataclasses.fields(PeftConfig)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"model.peft: unknown field(s) {unknown}; known: {sorted(known)}")
  if "lora_targets" in values and not isinstance(values["lora_targets"], str):
    values["lora_targets"] = tuple(values["lora_targets"])
  return PeftConfig(**values)


def trainable_rules(peft: PeftConfig, tasks: Sequence[str]) -> tuple[str, ...]:
  """The ``optim.trainable`` rules of ``peft.method``; everything else is frozen.

  The heads of ``tasks`` always train (they start at init). Adapters also train every encoder
  LayerNorm, following Houlsby et al.; BitFit's ``encoder/.*bias`` includes the LayerNorm
  biases. Other tasks' heads stay frozen.
  Method 'none' returns ``()``: no rules, everything trains.
  """
  if peft.method == "none":
    return ()
  heads = tuple(f"heads/{re.escape(t)}/.*" for t in tasks)
  own = {
    "lora": (r".*lora_(a|b)",),
    "adapters": (r".*adapter.*", ENCODER_NORMS),
    "bitfit": (r"encoder/.*bias",),
  }[peft.method]
  return own + heads


def dense_modules(cfg: Any) -> dict[str, tuple[int, int]]:
  """``{module path: (in, out)}`` of every linear projection (2-D ``kernel``) of ``cfg``'s encoder.

  Read from the family's module by ``jax.eval_shape`` (nothing is allocated), so every family
  with a ``peft`` field is covered by one definition: the BERT-like encoder's q/k/v/output,
  FFN, pooler and ELECTRA projection; a Llama's q/k/v/o and gate/up/down; GPT-2's fused qkv,
  output, intermediate and output (and an untied ``lm_head``). What LoRA targets are matched
  against and what :func:`analytic_trainable_count` sums over.
  """
  import jax
  import jax.numpy as jnp

  from research.models import families

  plain = cfg.replace(peft=None)  # The base architecture: no LoRA or adapter kernels.
  module = families.family_of(plain).encoder(plain)
  ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
  out = {}
  for path, leaf in paths.flatten(shapes).items():
    if path.endswith("/kernel") and len(leaf.shape) == 2:
      out[f"encoder/{path[: -len('/kernel')]}"] = tuple(leaf.shape)
  return out


def lora_modules(cfg: Any, peft: PeftConfig) -> dict[str, tuple[int, int]]:
  """The projections that get LoRA matrices, ``{module path: (in, out)}``.

  Raises:
    ValueError: a target regex matching no projection (usually a typo), naming it and the
      candidates (layer numbers written ``N``).
  """
  modules = dense_modules(cfg)
  unused = paths.unused_rules([(t, None) for t in peft.lora_targets], modules)
  if unused:
    candidates = sorted({re.sub(r"layer_\d+", "layer_N", p) for p in modules})
    raise ValueError(
      f"model.peft.lora_targets: {unused} match no projection; module paths look like "
      f"{next(iter(modules))!r}; candidates: {', '.join(candidates)}"
    )
  return {p: shape for p, shape in modules.items() if peft.is_lora_target(p)}


def analytic_trainable_count(cfg: Any, peft: PeftConfig, head_param_count: int) -> int:
  """Trainable parameters of ``peft`` on ``cfg`` by formula (H hidden, I intermediate, L layers).

  - lora: ``sum over targets of rank * (in + out)`` (2 r H per attention projection); any
    family with a ``peft`` field. The other methods' formulas are the BERT-like encoder's.
  - adapters: ``n L (2 H m + m + H)`` with ``n`` adapters per layer (2 houlsby, 1 pfeiffer),
    bottleneck ``m``, plus the LayerNorms ``2 E + 4 H L`` (E: embedding width, usually H).
  - bitfit: ``L (7 H + I) + E`` (q/k/v/output, FFN and LayerNorm biases; embedding LayerNorm),
    ``+ H`` for a pooler and ``+ H`` for an embedding projection.
  - none: every encoder parameter.
  Each plus ``head_param_count`` (heads always train).
  """
  if peft.method == "lora":
    own = sum(peft.lora_rank * (a + b) for a, b in lora_modules(cfg, peft).values())
    return own + head_param_count
  h, i, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  e = cfg.embedding_size or h  # The embedding LayerNorm's width.
  if peft.method == "adapters":
    m = peft.adapter_size
    adapters = len(peft.adapter_modules) * n_layers * (2 * h * m + m + h)
    own = adapters + 2 * e + 4 * h * n_layers
  elif peft.method == "bitfit":
    own = n_layers * (7 * h + i) + e + h * cfg.use_pooler + h * (cfg.embedding_size is not None)
  else:
    embeddings = e * (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) + 2 * e
    norms = 4 * h * n_layers
    own = embeddings + norms + sum(a * b + b for a, b in dense_modules(cfg).values())
  return own + head_param_count


def merge_lora(params: Mapping[str, Any], peft: PeftConfig) -> dict[str, Any]:
  """Folds every LoRA pair into its kernel (``W + A B * alpha / rank``) and drops the pairs.

  The result is the plain tree of the base architecture, ready for ``hf.save_pretrained`` or a
  model without PEFT; the arithmetic is fp32 at full precision, cast back to W's dtype.

  Raises:
    ValueError: a ``lora_a`` without its ``lora_b`` or its ``kernel``.
  """
  import jax
  import jax.numpy as jnp

  flat = dict(paths.flatten(params))
  for path in [p for p in flat if p.endswith("/lora_a")]:
    module = path[: -len("/lora_a")]
    if f"{module}/lora_b" not in flat or f"{module}/kernel" not in flat:
      raise ValueError(f"merge_lora: {module} has lora_a but no lora_b or kernel")
    a, b = flat.pop(path), flat.pop(f"{module}/lora_b")
    kernel = flat[f"{module}/kernel"]
    delta = jnp.dot(
      jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    merged = jnp.asarray(kernel, jnp.float32) + delta * jnp.float32(peft.lora_scale)
    flat[f"{module}/kernel"] = merged.astype(kernel.dtype)
  stray = [p for p in flat if p.rsplit("/", 1)[-1] in LORA_LEAVES]
  if stray:
    raise ValueError(f"merge_lora: lora_b without lora_a at {stray[:3]}")
  return paths.unflatten(flat)


def adapter_paths(leaf_paths: Iterable[str]) -> list[str]:
  """The adapter modules among ``leaf_paths`` (``encoder/layer_0/ffn_adapter/up/kernel`` gives
  ``encoder/layer_0/ffn_adapter``): what an export names when it refuses adapters."""
  found = (re.match(r"(.*?adapter)/", p) for p in leaf_paths)
  return sorted({m.group(1) for m in found if m})
