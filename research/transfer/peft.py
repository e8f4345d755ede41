"""Parameter-efficient transfer: LoRA, bottleneck adapters and BitFit as config, not code paths.

Each method is two things the ordinary run already has: extra parameter subtrees in the
ordinary model (``lora_a``/``lora_b`` beside a projection's ``kernel``; ``attention_adapter``
and ``ffn_adapter`` inside each encoder layer; nothing for BitFit) and ``optim.trainable``
rules, so the optax freeze mask leaves everything else without optimizer state. The same train
step, checkpoints and grafting serve all methods; PEFT leaves are absent from an HF checkpoint,
so grafting leaves them at init, and their init makes the model equal to the base model.
The config (:class:`PeftConfig`, re-exported here) and the layers belong to the models layer
(research.models.config, research.models.peft_layers); this module holds what reads parameter
trees and configs: the trainable rules, parameter counts, LoRA merging and the graft that
quantises a QLoRA base after loading.

- ``lora`` (Hu et al. 2021): ``y = x W + b + dropout(x) A B * alpha / rank`` on every projection
  whose module path fully matches one of ``lora_targets``; A is kaiming-uniform, B zeros.
  Trains A, B and the heads. :func:`merge_lora` folds A B into W for export.
- ``adapters`` (Houlsby et al. 2019; Pfeiffer et al. 2020): ``h + up(gelu(down(h)))`` with a
  zero ``up``, after the attention output and after the FFN (``houlsby``) or after the FFN
  only (``pfeiffer``). Trains the adapters, every encoder LayerNorm (as Houlsby et al. do) and
  the heads; on a pretrained encoder-decoder, every norm of both stacks (:data:`SEQ2SEQ_NORMS`,
  research.train.setup.optim_config), with the decoder's cross-attention adapted too.
  Adapters have no counterpart in a plain HF model, so they cannot be exported.
- ``bitfit`` (Ben Zaken et al. 2022): trains every encoder bias (LayerNorm biases included) and
  the heads.

Two options build on LoRA (``method='lora'``), as peft and bitsandbytes have them:

- ``use_dora`` (Liu et al. 2024): a target also trains ``lora_magnitude`` [out], and computes
  ``x m (W + s A B) / ||W + s A B||_c`` with the column norm detached, as peft's DoRA; the
  magnitude starts at ``||W||_c`` of the loaded kernel (:func:`graft` sets it after loading).
- ``quantize='nf4'`` (QLoRA, Dettmers et al. 2023): every projection of the families' layers
  stores its frozen kernel as ``kernel_nf4`` (4-bit NormalFloat codes, absmaxes quantised again
  to 8 bits) and dequantises it inside the matmul; :func:`graft` quantises a loaded float
  kernel after loading it, and the train step takes no gradient of the integer leaves.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from research import paths
from research.models.config import PeftConfig

LORA_LEAVES = ("lora_a", "lora_b", "lora_magnitude")
NF4 = "kernel_nf4"  # A QLoRA projection's stored kernel: research.models.peft_layers.nf4_quantize.
ENCODER_NORMS = r"encoder/(.*/)?(layer_norm|attention_norm|output_norm)/(scale|bias)"
# Every norm of both stacks of a pretrained encoder-decoder (T5's RMS scales, BART's
# LayerNorms): what adapters train beside themselves there, as Houlsby et al. train every norm.
SEQ2SEQ_NORMS = r"(encoder|decoder)/(.*/)?\w*norm/(scale|bias)"


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

  LoRA trains ``lora_a``/``lora_b`` and DoRA's ``lora_magnitude``; a QLoRA base
  (``kernel_nf4``) is never trainable.
  The heads of ``tasks`` always train (they start at init). Adapters also train every encoder
  LayerNorm, following Houlsby et al.; BitFit's ``encoder/.*bias`` includes the LayerNorm
  biases. Other tasks' heads stay frozen.
  Method 'none' returns ``()``: no rules, everything trains.
  """
  if peft.method == "none":
    return ()
  heads = tuple(f"heads/{re.escape(t)}/.*" for t in tasks)
  own = {
    "lora": (r".*lora_(a|b|magnitude)",),
    "adapters": (r".*adapter.*", ENCODER_NORMS),
    "bitfit": (r"encoder/.*bias",),
  }[peft.method]
  return own + heads


def dense_modules(cfg: Any) -> dict[str, tuple[int, int]]:
  """``{module path: (in, out)}`` of every linear projection (2-D ``kernel``) of ``cfg``'s
  encoder, or of its whole model for a pretrained encoder-decoder family (``Family.seq2seq``).

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
  family = families.family_of(plain)
  # An encoder-decoder family's whole model (its paths already start with encoder/, decoder/):
  # its decoder's self- and cross-attention are targets too. A superset for a classifier on
  # its encoder alone, which then simply has no decoder layers to put LoRA on.
  whole = family.seq2seq is not None and not getattr(plain, "encoder_only", False)
  module = (family.seq2seq if whole else family.encoder)(plain)
  ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
  out = {}
  for path, leaf in paths.flatten(shapes).items():
    if path.endswith("/kernel") and len(leaf.shape) == 2:
      module_path = path[: -len("/kernel")] if whole else f"encoder/{path[: -len('/kernel')]}"
      if module_path.startswith(("encoder/", "decoder/")):  # Not a whole model's lm_head.
        out[module_path] = tuple(leaf.shape)
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

  - lora: ``sum over targets of rank * (in + out)`` (2 r H per attention projection), ``+ out``
    with DoRA (the magnitude); any family with a ``peft`` field. The other methods' formulas
    are the BERT-like encoder's.
  - adapters: ``n L (2 H m + m + H)`` with ``n`` adapters per layer (2 houlsby, 1 pfeiffer),
    bottleneck ``m``, plus the LayerNorms ``2 E + 4 H L`` (E: embedding width, usually H);
    an encoder-decoder family's whole model: :func:`seq2seq_adapter_count`.
  - bitfit: ``L (7 H + I) + E`` (q/k/v/output, FFN and LayerNorm biases; embedding LayerNorm),
    ``+ H`` for a pooler and ``+ H`` for an embedding projection.
  - none: every encoder parameter.
  Each plus ``head_param_count`` (heads always train).
  """
  if peft.method == "adapters" and _seq2seq(cfg):
    return seq2seq_adapter_count(cfg, peft) + head_param_count
  if peft.method == "lora":
    own = sum(
      peft.lora_rank * (a + b) + b * peft.use_dora for a, b in lora_modules(cfg, peft).values()
    )
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


def _seq2seq(cfg: Any) -> bool:
  """Whether ``cfg`` is a pretrained encoder-decoder family with a decoder (its counts are
  the whole model's, as :func:`dense_modules`' are, even for a classifier on its encoder)."""
  from research.models import families

  family = families.family_of(cfg.replace(peft=None))
  return family.seq2seq is not None and not getattr(cfg, "encoder_only", False)


def seq2seq_adapter_count(cfg: Any, peft: PeftConfig) -> int:
  """Trainable parameters of ``adapters`` on a pretrained encoder-decoder (T5, BART, Marian).

  ``(2 H m + m + H)`` per adapter: ``n`` per encoder layer and ``n`` per decoder layer, plus
  one on each decoder cross-attention with Houlsby's placement; plus every norm of both stacks
  (:data:`SEQ2SEQ_NORMS`), read by ``jax.eval_shape`` as the families' norms differ (RMS
  scales or LayerNorms, embedding and final norms or not).
  """
  import math

  import jax
  import jax.numpy as jnp

  from research.models import families

  plain = cfg.replace(peft=None)
  ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  module = families.family_of(plain).seq2seq(plain)
  shapes = paths.flatten(jax.eval_shape(module.init, jax.random.key(0), ids)["params"])
  norms = sum(math.prod(v.shape) for p, v in shapes.items() if re.fullmatch(SEQ2SEQ_NORMS, p))
  # ``num_layers`` is the encoder's in both config types; the decoder's is named per family.
  decoder_layers = getattr(cfg, "decoder_layers", None) or cfg.num_decoder_layers
  cross = decoder_layers * ("attention_adapter" in peft.adapter_modules)
  count = len(peft.adapter_modules) * (cfg.num_layers + decoder_layers) + cross
  h, m = cfg.hidden_size, peft.adapter_size
  return count * (2 * h * m + m + h) + norms


def merge_lora(params: Mapping[str, Any], peft: PeftConfig) -> dict[str, Any]:
  """Folds every LoRA pair into its kernel (``W + A B * alpha / rank``) and drops the pairs.

  With DoRA the folded kernel is DoRA's ``m * (W + s A B) / ||W + s A B||_c`` (the magnitude
  dropped with the pair); an NF4 kernel (QLoRA), LoRA target or not, is dequantised to fp32
  first. The result is
  the plain tree of the base architecture, ready for ``hf.save_pretrained`` or a model without
  PEFT; the arithmetic is fp32 at full precision, cast back to W's dtype.

  Raises:
    ValueError: a ``lora_a`` without its ``lora_b`` or its kernel.
  """
  import jax
  import jax.numpy as jnp

  from research.models import peft_layers

  flat = dict(paths.flatten(params))
  for module in sorted({p[: -len(f"/{NF4}/codes")] for p in flat if p.endswith(f"/{NF4}/codes")}):
    stored = {k: flat.pop(f"{module}/{NF4}/{k}") for k in ("codes", "absmax", "scale", "offset")}
    flat[f"{module}/kernel"] = peft_layers.nf4_dequantize(stored, peft_layers.nf4_shape(stored))
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
    magnitude = flat.pop(f"{module}/lora_magnitude", None)
    if magnitude is not None:
      merged = merged * (jnp.asarray(magnitude, jnp.float32) / peft_layers.column_norm(merged))
    flat[f"{module}/kernel"] = merged.astype(kernel.dtype)
  stray = [p for p in flat if p.rsplit("/", 1)[-1] in LORA_LEAVES]
  if stray:
    raise ValueError(f"merge_lora: lora_b or lora_magnitude without lora_a at {stray[:3]}")
  return paths.unflatten(flat)


def graft(
  target: Any, source: Any, rules: Sequence[tuple[str, str | None]], **kw: Any
) -> tuple[Any, Any]:
  """research.transfer.graft's ``graft``, for trees with a QLoRA base or DoRA magnitudes.

  A float source kernel (an HF checkpoint, a LoRA run) is grafted as usual into a float twin
  of each ``kernel_nf4`` and only then quantised (:func:`~research.models.peft_layers.
  nf4_quantize`), so quantising always follows loading and the report names the source leaf;
  a source that holds NF4 kernels itself (a QLoRA run) is grafted leaf for leaf. A DoRA
  magnitude the source did not provide is set to the column norms of its grafted kernel (as the
  model computes it: dequantised when stored in NF4), which is what the layer's init computes
  from its random kernel and what peft's DoRA starts from. Without either the call is plain
  ``graft``. Arguments and errors as ``graft``'s (``kw``: ``strict``, ``reinit_on_mismatch``).
  """
  import jax
  import numpy as np

  from research.models import peft_layers
  from research.transfer import graft as graft_lib

  flat = paths.flatten(target)
  quantised = sorted({p[: -len(f"/{NF4}/codes")] for p in flat if p.endswith(f"/{NF4}/codes")})
  if any(p.endswith(f"/{NF4}/codes") for p in paths.flatten(source)):
    quantised = []  # A QLoRA run's params: its codes graft as they are.
  magnitudes = [p for p in flat if p.endswith("/lora_magnitude")]
  if not quantised and not magnitudes:
    return graft_lib.graft(target, source, rules, **kw)
  shapes = {m: peft_layers.nf4_shape({"codes": flat[f"{m}/{NF4}/codes"]}) for m in quantised}
  twin = {p: v for p, v in flat.items() if not any(p.startswith(f"{m}/{NF4}/") for m in quantised)}
  for module, shape in shapes.items():  # Zero-strided: no memory until a kernel is grafted.
    twin[f"{module}/kernel"] = np.broadcast_to(np.zeros((), np.float32), shape)
  grafted, report = graft_lib.graft(paths.unflatten(twin), source, rules, **kw)
  done = paths.flatten(grafted)
  moved = {t for t, _ in report.transferred}
  kernels: dict[str, Any] = {}  # The kernel each module computes with, for DoRA's norm.
  out: dict[str, Any] = {}
  for module in quantised:
    key = f"{module}/kernel"
    if key in moved:
      stored = peft_layers.nf4_quantize(np.asarray(done.pop(key)))
      for k, v in stored.items():
        out[f"{module}/{NF4}/{k}"] = jax.device_put(v, flat[f"{module}/{NF4}/{k}"].sharding)
      kernels[module] = peft_layers.nf4_dequantize(stored, shapes[module])
      report.transferred = [
        (f"{module}/{NF4}" if t == key else t, s) for t, s in report.transferred
      ]
    else:
      done.pop(key)
      report.left_at_init = [f"{module}/{NF4}" if t == key else t for t in report.left_at_init]
  for path in magnitudes:
    module = path[: -len("/lora_magnitude")]
    kernel = kernels.get(module)
    if kernel is None and f"{module}/kernel" in moved:
      kernel = done[f"{module}/kernel"]
    if path in moved or kernel is None:
      continue
    norm = peft_layers.column_norm(jax.numpy.asarray(kernel, jax.numpy.float32))
    out[path] = jax.device_put(norm.astype(flat[path].dtype), flat[path].sharding)
  merged = {**flat, **{p: v for p, v in done.items() if p in flat}, **out}
  return paths.map_with_path(lambda p, _: merged[p], target), report


def adapter_paths(leaf_paths: Iterable[str]) -> list[str]:
  """The adapter modules among ``leaf_paths`` (``encoder/layer_0/ffn_adapter/up/kernel`` gives
  ``encoder/layer_0/ffn_adapter``): what an export names when it refuses adapters."""
  found = (re.match(r"(.*?adapter)/", p) for p in leaf_paths)
  return sorted({m.group(1) for m in found if m})
