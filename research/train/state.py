"""The train state and how a run builds its model and first parameters.

``TrainState`` is a plain pytree (params, optimizer state, step, RNG, non-finite counters) so it
can be jitted, donated, sharded and checkpointed whole. Parameters are created already in
place: ``jax.eval_shape`` gives the shapes, then the init is jitted with ``out_shardings``.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from research.models.config import EncoderConfig
from research.models.heads import HeadConfig
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


def encoder_config(model_cfg: ml_collections.ConfigDict) -> EncoderConfig:
  """The encoder architecture: the checkpoint's, with ``model.encoder_overrides`` applied, and
  ``model.peft`` when its method is not 'none' (LoRA targets are checked to match)."""
  directory = hf.resolve(model_cfg.checkpoint)
  cfg = hf.load_config(directory)
  overrides = dict(model_cfg.get("encoder_overrides", {}) or {})
  if "dropout" in model_cfg:
    overrides.setdefault("hidden_dropout", model_cfg.dropout)
    overrides.setdefault("attention_dropout", model_cfg.dropout)
  cfg = cfg.replace(**overrides)
  peft = peft_lib.from_config(model_cfg.get("peft"))
  if peft.method == "none":
    return cfg
  if peft.method == "lora":
    peft_lib.lora_modules(cfg, peft)  # Raises on a target that matches no projection.
  return cfg.replace(peft=peft)


def apply_peft_rules(config: ml_collections.ConfigDict, peft: peft_lib.PeftConfig) -> None:
  """Sets ``optim.trainable`` to the PEFT method's rules when the run names none itself.

  Done here, where the model is built, so every trainer that builds its model through
  :func:`build_model` freezes the same way (the optimizer reads ``config.optim`` later).
  """
  if not tuple(config.optim.trainable):
    config.optim.trainable = peft_lib.trainable_rules(peft, tuple(config.tasks))


def build_model(
  config: ml_collections.ConfigDict, num_labels: dict[str, int]
) -> tuple[TaskModel, EncoderConfig]:
  """The TaskModel for ``config.tasks`` with ``num_labels[task]`` outputs per head.

  Seq2seq tasks get an EncoderDecoder instead (decoder: the encoder's architecture with
  ``model.decoder_overrides``; see research.models.seq2seq). With ``model.peft`` the encoder
  gets the method's parameters and, unless ``optim.trainable`` is set, ``optim.trainable``
  becomes the method's rules (a side effect on ``config``; see :func:`apply_peft_rules`).

  Raises:
    ValueError: ``model.peft`` on a seq2seq model (not wired for the decoder yet).
  """
  enc = encoder_config(config.model)
  seq2seq_run = any(t.kind == "seq2seq" for t in config.tasks.values())
  if enc.peft is not None:
    if seq2seq_run:
      raise ValueError(
        f"model.peft.method={enc.peft.method!r}: parameter-efficient transfer is wired for "
        "encoder TaskModels only, not seq2seq (the decoder's cached attention has no LoRA)"
      )
    apply_peft_rules(config, enc.peft)
  if seq2seq_run:
    from research.models import seq2seq

    model = seq2seq.make_model(
      enc,
      tuple(config.tasks),
      config.model.get("decoder_overrides", {}),
      dtype=compute_dtype(config.model.dtype),
      param_dtype=DTYPES[config.model.param_dtype],
      remat=config.model.remat,
    )
    return model, enc
  heads = {}
  for name, task in config.tasks.items():
    head = dict(task.get("head", {}) or {})
    heads[name] = HeadConfig(kind=task.kind, num_labels=num_labels[name], **head)
  model = make_task_model(
    enc,
    heads,
    dtype=compute_dtype(config.model.dtype),
    param_dtype=DTYPES[config.model.param_dtype],
    remat=config.model.remat,
  )
  return model, enc


def init_plan(config: ml_collections.ConfigDict) -> tuple[str, list[tuple[str, str | None]]]:
  """``('pretrained' | 'scratch', graft rules)``: ``model.init`` and ``model.graft_rules``, or
  those of a seq2seq init mode (``rnd2rnd``, ``bert2rnd``, ``bert2bert``) unless ``init_from``
  names the source (then ``model.graft_rules`` say what to take from it)."""
  from research.models import seq2seq

  if config.model.init in seq2seq.INIT_MODES and not config.get("init_from"):
    init, rules = seq2seq.init_plan(config.model.init)
    return init, list(rules)
  return config.model.init, [tuple(r) for r in config.model.graft_rules]


def init_fn(model: TaskModel, seq_len: int = 8):
  """A function ``rng -> params`` suitable for ``jax.eval_shape`` and ``jax.jit``."""

  def init(rng):
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return model.init(jax.random.wrap_key_data(rng), ids, jnp.ones_like(ids))["params"]

  return init
