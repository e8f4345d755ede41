"""NER metrics: our entity-level scores equal seqeval's on the same predictions."""

import numpy as np
import pytest

from research.tasks import tagging

seqeval_metrics = pytest.importorskip("seqeval.metrics")


def random_sequences(rng, n, scheme_tags):
  return [list(rng.choice(scheme_tags, size=rng.integers(1, 15))) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_seqeval_agreement_on_random_iob_sequences(seed):
  rng = np.random.default_rng(seed)
  tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "I-MISC"]
  gold = random_sequences(rng, 200, tags)
  pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in seq] for seq in gold]
  ours = tagging.entity_scores(gold, pred)
  assert abs(ours["f1"] - seqeval_metrics.f1_score(gold, pred)) < 1e-9
  assert abs(ours["precision"] - seqeval_metrics.precision_score(gold, pred)) < 1e-9
  assert abs(ours["recall"] - seqeval_metrics.recall_score(gold, pred)) < 1e-9
  report = seqeval_metrics.classification_report(gold, pred, output_dict=True)
  for kind, scores in ours["per_type"].items():
    if kind in report:
      assert abs(scores["f1"] - report[kind]["f1-score"]) < 1e-9, kind


def test_seqeval_agreement_bioes():
  rng = np.random.default_rng(7)
  tags = ["O", "O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "E-LOC", "S-LOC"]
  gold = random_sequences(rng, 200, tags)
  pred = [[t if rng.random() < 0.6 else rng.choice(tags) for t in seq] for seq in gold]
  assert abs(tagging.entity_scores(gold, pred)["f1"] - seqeval_metrics.f1_score(gold, pred)) < 1e-9


def test_first_subword_decoding_and_metrics():
  names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
  labels = np.array([[-100, 1, -100, 2, 0, 3, -100], [-100, 0, 3, 4, -100, -100, -100]])
  pred = np.array([[0, 1, 4, 2, 0, 3, 0], [0, 0, 3, 0, 1, 1, 1]])
  out = tagging.metrics({"label": pred}, {"labels": labels, "example_mask": np.ones(2)}, names)
  # Gold: [PER(0-1), LOC(3)], [LOC(1-2)]; predicted: [PER(0-1), LOC(3)], [LOC(1)].
  assert out["precision"] == 2 / 3 and out["recall"] == 2 / 3
  assert out["per_type"]["PER"]["f1"] == 1.0 and out["accuracy"] == 6 / 7


def test_crf_likelihood_normalises_and_viterbi_is_the_argmax():
  import itertools

  import jax
  import jax.numpy as jnp

  from research.tasks import crf

  rng = np.random.default_rng(0)
  k, w = 3, 4
  em = jnp.asarray(rng.normal(size=(2, w, k)), jnp.float32)
  trans = jnp.asarray(rng.normal(size=(k, k)), jnp.float32)
  start, end = jnp.asarray(rng.normal(size=k)), jnp.asarray(rng.normal(size=k))
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
  for row, length in ((0, 4), (1, 2)):
    paths = list(itertools.product(range(k), repeat=length))
    tags = jnp.array([list(p) + [0] * (w - length) for p in paths])
    em_rows = jnp.repeat(em[row : row + 1], len(paths), axis=0)
    mask_rows = jnp.repeat(mask[row : row + 1], len(paths), axis=0)
    ll = crf.log_likelihood(em_rows, tags, mask_rows, trans, start, end)
    np.testing.assert_allclose(jax.nn.logsumexp(ll), 0.0, atol=1e-5)  # Probabilities sum to 1.
    best = paths[int(jnp.argmax(ll))]
    path = crf.viterbi(em, mask, trans, start, end)[row]
    assert tuple(int(t) for t in path[:length]) == best
    assert all(int(t) == 0 for t in path[length:])


def test_crf_head_trains_and_decodes_on_word_positions():
  import jax
  import jax.numpy as jnp
  import optax

  from research.models.config import EncoderConfig
  from research.models.heads import HeadConfig
  from research.models.task_model import init_params, make_task_model

  model = make_task_model(EncoderConfig.tiny(), {"ner": HeadConfig("tagging", 3, crf=True)})
  params = init_params(model, jax.random.key(0))
  assert set(params["heads"]["ner"]) == {"output", "crf_transitions", "crf_start", "crf_end"}
  ids = jnp.array([[1, 5, 6, 7, 2, 0], [1, 8, 9, 2, 0, 0]])
  batch = {
    "input_ids": ids,
    "attention_mask": (ids > 0).astype(jnp.int32),
    "labels": jnp.array([[-100, 1, -100, 2, -100, -100], [-100, 0, 1, -100, -100, -100]]),
    "example_mask": jnp.ones(2),
  }

  def loss_fn(p):
    out = model.apply({"params": p}, ids, batch["attention_mask"])["ner"]
    total, weight = tagging.loss(out, batch)
    return total / weight

  tx = optax.adam(0.01)
  grad_fn = jax.jit(jax.grad(loss_fn))
  state = tx.init(params)
  for _ in range(50):
    grads = grad_fn(params)
    updates, state = tx.update(grads, state)
    params = optax.apply_updates(params, updates)
  out = model.apply({"params": params}, ids, batch["attention_mask"])["ner"]
  pred = tagging.predict(out, batch)["label"]
  keep = batch["labels"] != -100
  np.testing.assert_array_equal(pred[keep], batch["labels"][keep])


def test_ner_trainer_end_to_end_with_crf(tmp_path):
  from train_util import load_config_module

  from research.train.trainer import train_and_evaluate

  config = load_config_module("conll03_minilm").get_config("tiny,crf")
  results = train_and_evaluate(config, str(tmp_path))
  scores = results["eval"]["conll03"]
  assert {"f1", "precision", "recall", "accuracy", "per_type"} <= set(scores)
  assert set(scores["per_type"]) <= {"PER", "LOC", "ORG", "MISC"}
  assert results["init"] == "scratch" and (tmp_path / "labels.json").is_file()
