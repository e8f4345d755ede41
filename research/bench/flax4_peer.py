"""Worker for ``python -m research.bench.train_step --peer=flax4``; runs in ``.venv-flax4``.

transformers 5 removed its Flax models, so the transformers-4.57
``FlaxBertForSequenceClassification`` peer lives in its own venv (``make venv-flax4``) and
cannot import this package. The parent starts this file as a script with a JSON spec (model
dir, encoder overrides, batch, seq, dtype), then writes ``n`` on stdin for each round; the
worker answers with the mean seconds per step of those ``n`` steps. The step is the
usual Flax fine-tuning step: jitted, donated, ``optax.adamw`` with the same clipping, dropout on.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """The benchmark batch; research.bench.train_step.make_batch adds its example_mask to it."""
  rng = np.random.default_rng(seed)
  return {
    "input_ids": rng.integers(1000, min(vocab, 20000), (batch, seq), dtype=np.int32),
    "attention_mask": np.ones((batch, seq), np.int32),
    "token_type_ids": np.zeros((batch, seq), np.int32),
    "labels": rng.integers(0, 2, (batch,), dtype=np.int32),
  }


def main(spec_json: str) -> int:
  import transformers

  # The package's research/bench/timing.py, as a sibling of this script (its directory is
  # sys.path[0]); timing.py imports only the standard library at the top, for this worker.
  from timing import per_call

  spec = json.loads(spec_json)
  names = dict(num_layers="num_hidden_layers", num_heads="num_attention_heads")
  config = transformers.BertConfig.from_pretrained(spec["model"], num_labels=2)
  for key, value in spec["overrides"].items():
    setattr(config, names.get(key, key), value)
  dtype = jnp.dtype(spec["dtype"])
  cls = transformers.FlaxBertForSequenceClassification
  if spec["overrides"]:
    model = cls(config, dtype=dtype, seed=0)
  else:
    model = cls.from_pretrained(spec["model"], config=config, from_pt=True, dtype=dtype)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.01))
  batch = make_batch(spec["batch"], spec["seq"], config.vocab_size)
  labels = jnp.asarray(batch.pop("labels"))
  inputs = {k: jnp.asarray(v) for k, v in batch.items()}

  def loss_fn(params, rng):
    logits = model(**inputs, params=params, dropout_rng=rng, train=True).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(state, rng):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  step = jax.jit(step, donate_argnums=(0,))
  state = (model.params, tx.init(model.params))
  rng = jax.random.PRNGKey(0)

  def one() -> jax.Array:
    nonlocal state, rng
    rng, sub = jax.random.split(rng)
    state, loss = step(state, sub)
    return loss

  for line in sys.stdin:
    print(per_call(one, int(line)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
