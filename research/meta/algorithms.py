"""MAML, FOMAML, ANIL, iMAML, Reptile, Meta-SGD, ProtoNet and fine-tuning on one episode.

A :class:`MetaLearner` holds the model, the head (task) that classifies an episode's ``n_way``
classes, and the algorithm's settings. Its per-episode functions take the parameter tree
``{'encoder', 'heads', ['inner_lr']}`` and one episode (``support_*`` / ``query_*`` arrays,
no leading episode axis); research.meta.steps ``vmap``-s them over a batch of episodes.

- ``maml`` / ``fomaml`` / ``anil``: :meth:`MetaLearner.query_loss` adapts the ``inner`` paths on
  the support set with :func:`research.meta.inner.sgd_adapt` and returns the query loss; its
  gradient is the meta-gradient (second order unless ``first_order``). ANIL is MAML whose inner
  paths are the head's: the encoder then runs once per episode, outside the inner loop.
- ``imaml`` (Rajeswaran et al. 2019): the inner loop minimises the support loss plus
  ``imaml.lam/2 |phi - theta|^2`` (:func:`research.meta.inner.proximal_adapt`) and the
  meta-gradient is implicit, ``(I + H/lam)^-1`` of the query gradient by conjugate gradient: no
  backpropagation through the inner steps, so their number does not cost memory. The same
  proximal loop adapts at evaluation.
- ``reptile``: :meth:`MetaLearner.reptile_direction` is ``params - adapted`` on the episode's
  examples, which the outer optimizer takes as its gradient (outer SGD with lr ``eps`` gives
  Reptile's ``params + eps * (adapted - params)``).
- ``protonet``: query logits are minus squared distances to the support class means of the
  pooled encoder embeddings.
- ``finetune``: no meta-training; at evaluation, the inner paths are fine-tuned on the support
  set with an optax optimizer from the (pretrained) parameters.

``head_init`` sets the head each episode starts from: ``'learned'`` (the meta-learned head),
``'zeros'`` (the zero trick: episode labels are random, so a zero head is permutation-invariant)
or ``'proto'`` (Proto-MAML: rows ``2 c_k``, bias ``-|c_k|^2`` from the support prototypes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from research.meta import inner
from research.models.heads import pool
from research.models.task_model import TaskModel

ALGORITHMS = ("maml", "fomaml", "anil", "imaml", "reptile", "protonet", "finetune")
HEAD_INITS = ("learned", "zeros", "proto")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
Episode = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one meta-learning run does (static: closed over by the jitted steps)."""

  algorithm: str
  inner: tuple[str, ...]
  inner_steps: int
  inner_lr: float
  eval_inner_steps: int
  first_order: bool
  remat: bool
  episode_loop: str
  hvp: str
  meta_sgd: bool
  head_init: str
  finetune_steps: int
  finetune_lr: float
  finetune_head_init: str
  imaml_lam: float = 1.0
  imaml_cg_steps: int = 5

  def __post_init__(self):
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f"meta.algorithm={self.algorithm!r}: expected one of {ALGORITHMS}")
    if self.episode_loop not in ("vmap", "scan"):
      raise ValueError(f"meta.episode_loop={self.episode_loop!r}: expected 'vmap' or 'scan'")
    if self.hvp not in ("reverse", "forward"):
      raise ValueError(f"meta.hvp={self.hvp!r}: expected 'reverse' or 'forward'")
    if self.algorithm == "imaml" and (self.meta_sgd or self.imaml_lam <= 0):
      raise ValueError(
        "meta.algorithm='imaml' needs meta.imaml.lam > 0 and learns no inner learning rates "
        f"(meta_sgd={self.meta_sgd}, lam={self.imaml_lam})"
      )
    for name in ("head_init", "finetune_head_init"):
      if getattr(self, name) not in HEAD_INITS:
        raise ValueError(f"meta.{name}={getattr(self, name)!r}: expected one of {HEAD_INITS}")

  @property
  def meta_trains(self) -> bool:
    """finetune and protonet are baselines on the pretrained encoder (no meta-training)."""
    return self.algorithm not in ("finetune", "protonet")

  @property
  def head_only(self) -> bool:
    """The inner loop touches only heads/...: the encoder runs once per episode."""
    return all(p.startswith("heads/") for p in self.inner)


def default_config() -> dict[str, Any]:
  """The ``config.meta`` fields with defaults (experiment configs override); the one place
  they are written: :func:`settings_from_config` reads every field."""
  return dict(
    algorithm="maml",  # maml | fomaml | anil | imaml | reptile | protonet | finetune
    inner=(),  # path regexes that adapt in the inner loop; () = the algorithm's default
    inner_steps=5,
    inner_lr=0.01,
    eval_inner_steps=10,
    first_order=False,
    remat_inner=False,
    episode_loop="vmap",  # vmap | scan: the episodes of a meta-batch in parallel or in turn
    hvp="reverse",  # reverse | forward: second-order term by autodiff, or custom-VJP HVPs
    meta_sgd=False,
    head_init="zeros",  # learned | zeros | proto
    n_way=5,
    k_shot=1,
    q_query=5,
    episodes_per_batch=4,
    eval_episodes_per_batch=8,
    valid_episodes=0,
    test_episodes=600,
    test_seed=1234,
    # Cross-data-set meta-transfer: the meta-test episodes come from the meta-test classes of
    # this registered intent data set ('' = the task's own data; meta-train and meta-valid stay
    # on the task's). Its default data config, with the task data's max_length and buckets, then
    # test_data_overrides (e.g. config_lib.fixture_data(name) to read a committed fixture).
    test_data="",
    test_data_overrides={},
    finetune=dict(steps=20, lr=1e-4, head_init="zeros"),
    # iMAML: proximal strength and conjugate-gradient steps of the implicit meta-gradient.
    imaml=dict(lam=1.0, cg_steps=5),
  )


def settings_from_config(meta_cfg: Any) -> Settings:
  """:class:`Settings` from ``config.meta``; ``inner=()`` takes the algorithm's default."""
  algorithm = meta_cfg.algorithm
  patterns = tuple(meta_cfg.inner) or (("heads/.*",) if algorithm == "anil" else (".*",))
  return Settings(
    algorithm=algorithm,
    inner=patterns,
    inner_steps=meta_cfg.inner_steps,
    inner_lr=meta_cfg.inner_lr,
    eval_inner_steps=meta_cfg.eval_inner_steps,
    first_order=algorithm in ("fomaml", "reptile") or meta_cfg.first_order,
    remat=meta_cfg.remat_inner,
    episode_loop=meta_cfg.episode_loop,
    hvp=meta_cfg.hvp,
    meta_sgd=meta_cfg.meta_sgd,
    head_init=meta_cfg.head_init,
    finetune_steps=meta_cfg.finetune.steps,
    finetune_lr=meta_cfg.finetune.lr,
    finetune_head_init=meta_cfg.finetune.head_init,
    imaml_lam=meta_cfg.imaml.lam,
    imaml_cg_steps=meta_cfg.imaml.cg_steps,
  )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def model_params(params: dict[str, Any]) -> dict[str, Any]:
  """The TaskModel's part of the tree (without Meta-SGD's ``inner_lr``)."""
  return {k: v for k, v in params.items() if k != "inner_lr"}


class MetaLearner:
  """Per-episode losses and evaluations of one algorithm on one TaskModel head.

  ``frozen``: paths of the parameters the outer optimizer never moves (``optim.freeze`` /
  ``optim.trainable``, e.g. the base weights under a LoRA inner loop). The meta-step stops their
  gradient, so the meta-gradient is not computed for them at all: with a frozen encoder
  only the LoRA/head cotangents flow back, not the base weights' (the memory of a
  base-size second-order step).
  """

  def __init__(self, model: TaskModel, task: str, settings: Settings, frozen: Iterable[str] = ()):
    self.model, self.task, self.s = model, task, settings
    self.frozen = frozenset(frozen)
    self.encoder = model.encoder_module()
    self.head = model.head_module(task)
    self.head_config = self.head.config

  # --- Forward pieces. --------------------------------------------------------------------
  def encode(self, params: dict[str, Any], episode: Episode, prefix: str) -> dict[str, Any]:
    ids, mask, types = (episode[f"{prefix}{k}"] for k in INPUTS)
    return self.encoder.apply({"params": params["encoder"]}, ids, mask, types)

  def logits(self, params: dict[str, Any], feats: dict[str, Any], mask: jax.Array) -> jax.Array:
    return self.head.apply({"params": params["heads"][self.task]}, feats, mask)

  def embed(self, feats: dict[str, Any], mask: jax.Array) -> jax.Array:
    return pool(feats, mask, self.head_config.pooling).astype(jnp.float32)

  def prototypes(self, emb: jax.Array, labels: jax.Array, n_way: int) -> jax.Array:
    onehot = jax.nn.one_hot(labels, n_way, dtype=emb.dtype)  # [M, N]
    return (onehot.T @ emb) / jnp.maximum(onehot.sum(0), 1.0)[:, None]

  def episode_head(self, params: dict[str, Any], feats, mask, labels, n_way: int, how=None):
    """The parameters with the head this episode starts from (``how``, default head_init)."""
    head = params["heads"][self.task]
    how = how or self.s.head_init
    if how == "learned":
      return params
    if how == "zeros":
      head = jax.tree.map(jnp.zeros_like, head)
    else:  # proto: a linear layer that scores 2 c.x - |c|^2, i.e. -|x - c|^2 up to |x|^2.
      protos = self.prototypes(self.embed(feats, mask), labels, n_way)
      kernel = head["output"]["kernel"]
      head = {
        "output": {
          "kernel": (2.0 * protos.T).astype(kernel.dtype),
          "bias": -jnp.sum(protos**2, -1).astype(kernel.dtype),
        }
      }
    return {**params, "heads": {**params["heads"], self.task: head}}

  # --- Adaptation. ------------------------------------------------------------------------
  def adapt(self, params, episode: Episode, steps: int, *, prefix: str = "support_"):
    """Adapts the inner paths on ``prefix`` examples; returns ``(adapted params, losses)``."""
    n_way = self.n_way(episode)
    p = model_params(params)
    labels, mask = episode[f"{prefix}labels"], episode[f"{prefix}attention_mask"]
    feats = self.encode(p, episode, prefix)
    p = self.episode_head(p, feats, mask, labels, n_way)
    fast, rest = inner.split(p, self.s.inner)
    if self.s.head_only:  # ANIL: features fixed inside the loop.
      loss_fn = lambda w: cross_entropy(self.logits(inner.merge(w, rest), feats, mask), labels)
    else:
      loss_fn = lambda w: cross_entropy(
        self._forward(inner.merge(w, rest), episode, prefix), labels
      )
    if self.s.algorithm == "imaml":
      fast, losses = inner.proximal_adapt(
        loss_fn,
        fast,
        self.s.inner_lr,
        steps,
        lam=self.s.imaml_lam,
        cg_steps=self.s.imaml_cg_steps,
      )
      return inner.merge(fast, rest), losses
    lrs = inner.fast_lrs(params, fast, self.s.inner_lr)
    fast, losses = inner.sgd_adapt(
      loss_fn,
      fast,
      lrs,
      steps,
      first_order=self.s.first_order,
      remat=self.s.remat,
      hvp=self.s.hvp,
    )
    return inner.merge(fast, rest), losses

  def _forward(self, p, episode: Episode, prefix: str) -> jax.Array:
    mask = episode[f"{prefix}attention_mask"]
    return self.logits(p, self.encode(p, episode, prefix), mask)

  @staticmethod
  def n_way(episode: Episode) -> int:
    """Episode classes: the number of distinct labels (static: from ``classes``' shape)."""
    return int(episode["classes"].shape[-1])

  # --- Meta-objectives. -------------------------------------------------------------------
  def query_loss(self, params, episode: Episode) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MAML-family objective: query loss after adapting on the support set."""
    if self.s.algorithm == "protonet":
      return self._protonet(params, episode)
    adapted, losses = self.adapt(params, episode, self.s.inner_steps)
    logits = self._query_logits(adapted, episode)
    loss = cross_entropy(logits, episode["query_labels"])
    aux = {"loss": loss, "accuracy": accuracy(logits, episode["query_labels"])}
    if losses.shape[0]:
      aux["support_loss_before"] = losses[0]
    return loss, aux

  def _query_logits(self, adapted, episode: Episode) -> jax.Array:
    return self._forward(adapted, episode, "query_")

  def _protonet(self, params, episode: Episode):
    logits = self.protonet_logits(params, episode)
    loss = cross_entropy(logits, episode["query_labels"])
    return loss, {"loss": loss, "accuracy": accuracy(logits, episode["query_labels"])}

  def protonet_logits(self, params, episode: Episode) -> jax.Array:
    p = model_params(params)
    emb = lambda prefix: self.embed(
      self.encode(p, episode, prefix), episode[f"{prefix}attention_mask"]
    )
    protos = self.prototypes(emb("support_"), episode["support_labels"], self.n_way(episode))
    q = emb("query_")
    return -jnp.sum((q[:, None, :] - protos[None]) ** 2, -1)

  def reptile_direction(self, params, episode: Episode) -> tuple[Any, dict[str, jax.Array]]:
    """``params - adapted`` after ``inner_steps`` SGD steps on support + query (zero elsewhere).

    Meta-train episodes' query examples are data of the task too, so Reptile trains on both.
    """
    both = {
      f"support_{k}": jnp.concatenate([episode[f"support_{k}"], episode[f"query_{k}"]])
      for k in (*INPUTS, "labels")
    }
    joint = {**episode, **both}
    adapted, losses = self.adapt(params, joint, self.s.inner_steps)
    adapted = jax.lax.stop_gradient(adapted)
    p = model_params(params)
    direction = jax.tree.map(lambda a, b: a - b, p, adapted)
    if self.s.head_init != "learned":  # The stored head is never used: leave it alone.
      head = direction["heads"][self.task]
      direction["heads"] = {**direction["heads"], self.task: jax.tree.map(jnp.zeros_like, head)}
    if "inner_lr" in params:
      direction["inner_lr"] = jax.tree.map(jnp.zeros_like, params["inner_lr"])
    loss = losses[0] if losses.shape[0] else jnp.zeros([])
    return direction, {"loss": loss}

  # --- Evaluation. ------------------------------------------------------------------------
  def evaluate(self, params, episode: Episode) -> jax.Array:
    """Query accuracy of the algorithm on one (held-out) episode."""
    if self.s.algorithm == "protonet":
      return accuracy(self.protonet_logits(params, episode), episode["query_labels"])
    if self.s.algorithm == "finetune":
      adapted = self.finetune(params, episode)
    else:
      adapted, _ = self.adapt(params, episode, self.s.eval_inner_steps)
    return accuracy(self._query_logits(adapted, episode), episode["query_labels"])

  def finetune(self, params, episode: Episode):
    """Fine-tuning baseline: Adam on the support set over the inner paths, from ``params``."""
    p = model_params(params)
    labels, mask = episode["support_labels"], episode["support_attention_mask"]
    feats = self.encode(p, episode, "support_")
    p = self.episode_head(p, feats, mask, labels, self.n_way(episode), self.s.finetune_head_init)
    fast, rest = inner.split(p, self.s.inner)
    loss_fn = lambda w: cross_entropy(
      self._forward(inner.merge(w, rest), episode, "support_"), labels
    )
    fast, _ = inner.optax_adapt(
      loss_fn, fast, optax.adam(self.s.finetune_lr), self.s.finetune_steps
    )
    return inner.merge(fast, rest)
