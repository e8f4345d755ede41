"""The train state and how a run builds its model and first parameters.

``TrainState`` is a plain pytree (params, optimizer state, step, RNG, non-finite counters) so it
can be jitted, donated, sharded and checkpointed whole. Parameters are created already in
place: ``jax.eval_shape`` gives the shapes, then the init is jitted with ``out_shardings``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from research import tasks as task_lib
from research.models import families
from research.models.family import Config, Family
from research.models.task_model import TaskModel, make_task_model
from research.transfer import hf
from research.transfer import peft as peft_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. ``rng`` is raw uint32 key data (checkpoint-friendly)."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_streak: jax.Array  # consecutive skipped (non-finite) steps
  nonfinite_total: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    zero = lambda: jnp.zeros([], jnp.int32)  # Distinct buffers: the state is donated.
    return cls(zero(), params, tx.init(params), rng, zero(), zero(), tx)


def compute_dtype(name: str) -> Any:
  """'auto' is fp32 on CPU and bf16 on GPU/TPU."""
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r}: expected auto or one of {sorted(DTYPES)}")
  return DTYPES[name]


def model_family(model_cfg: ml_collections.ConfigDict) -> Family:
  """The run's model family: ``model.family`` when set, else the one that reads the checkpoint's
  config.json ``model_type`` (research.models.families)."""
  if model_cfg.family:
    return families.family_named(model_cfg.family)
  return families.family_of(hf.load_config(hf.resolve(model_cfg.checkpoint)))


def encoder_config(model_cfg: ml_collections.ConfigDict) -> Config:
  """The encoder architecture: the checkpoint's config.json read by the run's family
  (:func:`model_family`), with ``model.encoder_overrides`` applied, ``model.dropout`` on the
  family's dropout fields, and ``model.peft`` when its method is not 'none' (LoRA targets are
  checked to match).

  Raises:
    ValueError: an override that is no field of the family's config, or PEFT on a family
      without it.
  """
  directory = hf.resolve(model_cfg.checkpoint)
  cfg = hf.load_config(directory, model_cfg.family or None)
  fields = {f.name for f in dataclasses.fields(cfg)}
  overrides = dict(model_cfg.get("encoder_overrides", {}) or {})
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(
      f"model.encoder_overrides: {unknown} are not fields of {type(cfg).__name__}; "
      f"its fields: {sorted(fields)}"
    )
  if "dropout" in model_cfg:
    for key in ("hidden_dropout", "attention_dropout"):
      if key in fields:
        overrides.setdefault(key, model_cfg.dropout)
  cfg = cfg.replace(**overrides)
  peft = peft_lib.from_config(model_cfg.get("peft"))
  if peft.method == "none":
    return cfg
  if "peft" not in fields:
    raise ValueError(
      f"model.peft.method={peft.method!r}: {type(cfg).__name__} has no parameter-efficient "
      "variant; use method 'none'"
    )
  if peft.method == "lora":
    peft_lib.lora_modules(cfg, peft)  # Raises on a target that matches no projection.
  return cfg.replace(peft=peft)


def build_model(
  config: ml_collections.ConfigDict, num_labels: dict[str, int]
) -> tuple[TaskModel, Config]:
  """The TaskModel for ``config.tasks``: each task's head as its kind chooses it
  (``research.tasks.get(kind).head(task_cfg, num_labels[task])``).

  The encoder is the run's family's (:func:`encoder_config`): the checkpoint's own (BERT-like,
  MPNet...) or the one ``model.family`` names, such as the CNN.

  A kind that builds its own model does so instead: seq2seq tasks get an EncoderDecoder
  (decoder: the encoder's architecture with ``model.decoder_overrides``), or a pretrained
  encoder-decoder family's own model (see research.models.seq2seq). With ``model.peft`` the
  model gets the method's parameters (what the optimizer then trains:
  :func:`research.train.setup.optim_config`). ``config`` is not changed.

  Raises:
    ValueError: ``model.peft`` on an EncoderDecoder (its added decoder has no LoRA), or a kind
      that builds its own model beside tasks of other kinds.
  """
  enc = encoder_config(config.model)
  model_kw = dict(
    dtype=compute_dtype(config.model.dtype),
    param_dtype=DTYPES[config.model.param_dtype],
    remat=config.model.remat,
  )
  # Each task's kind chooses its head; a kind may build the whole model instead (seq2seq).
  kinds = {name: task_lib.get(task.kind) for name, task in config.tasks.items()}
  distinct = {k.name: k for k in kinds.values()}
  built = [
    m for k in distinct.values() if (m := k.build_model(config, enc, **model_kw)) is not None
  ]
  if built:
    if len(distinct) > 1:
      raise ValueError(
        f"tasks of kinds {sorted(distinct)}: a kind that builds its own model (e.g. seq2seq) "
        "cannot share a run with other kinds"
      )
    return built[0], enc
  heads = {name: kinds[name].head(task, num_labels[name]) for name, task in config.tasks.items()}
  return make_task_model(enc, heads, **model_kw), enc


def init_plan(config: ml_collections.ConfigDict) -> tuple[str, list[tuple[str, str | None]]]:
  """``('pretrained' | 'scratch', graft rules)``: ``model.init`` and ``model.graft_rules``, or
  those of a seq2seq init mode (``rnd2rnd``, ``bert2rnd``, ``bert2bert``) unless ``init_from``
  names the source (then ``model.graft_rules`` say what to take from it). Empty
  ``model.graft_rules`` mean the model family's default rules (:func:`model_family`)."""
  from research.models import seq2seq

  if config.model.init in seq2seq.INIT_MODES and not config.init_from:
    init, rules = seq2seq.init_plan(config.model.init)
    return init, list(rules)
  rules = [tuple(r) for r in config.model.graft_rules]
  if not rules:
    rules = [tuple(r) for r in model_family(config.model).graft_rules]
  return config.model.init, rules


def init_fn(model: TaskModel, seq_len: int = 8):
  """A function ``rng -> params`` suitable for ``jax.eval_shape`` and ``jax.jit``."""

  def init(rng):
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return model.init(jax.random.wrap_key_data(rng), ids, jnp.ones_like(ids))["params"]

  return init
