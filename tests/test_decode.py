"""Decoding: the key/value cache changes nothing, beam size 1 is greedy, beam search beats greedy
where it should, EOS and padding are handled (``pytest -k decode``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import paths
from research.models import decoding, seq2seq
from research.models.config import EncoderConfig

# EOS is a token this random model emits at different positions (see the fixture), so some
# rows stop at once, some midway, some run to MAX_LEN.
BOS, EOS, PAD, MAX_LEN = 1, 127, 0, 10


@pytest.fixture(scope="module")
def tiny_model():
  """A random 1-layer encoder-decoder, sharpened so decoded tokens vary with the source."""
  enc = EncoderConfig.tiny(num_layers=1, hidden_dropout=0.0, attention_dropout=0.0)
  model = seq2seq.make_model(enc, ("mt",))
  ids = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), ids, jnp.ones_like(ids))["params"]
  sharpen = lambda p, x: x * 20 if p.endswith(("kernel", "embedding")) else x
  params = paths.map_with_path(sharpen, params)
  rng = np.random.default_rng(0)
  src = rng.integers(5, 128, (6, 10)).astype(np.int32)
  mask = np.ones_like(src)
  mask[1, 6:] = mask[3, 3:] = 0
  batch = dict(input_ids=src * mask, attention_mask=mask, token_type_ids=np.zeros_like(src))
  return model, params, batch


def _generate(model, params, batch, eos, **kw):
  g = decoding.make_generate(model, "mt", max_length=MAX_LEN, bos=BOS, eos=eos, pad=PAD, **kw)
  return jax.device_get(g(params, batch))


def test_decode_cached_equals_uncached(tiny_model):
  model, params, batch = tiny_model
  for beam in (1, 3):
    out = {c: _generate(model, params, batch, EOS, beam_size=beam, cache=c) for c in (True, False)}
    np.testing.assert_array_equal(out[True]["tokens"], out[False]["tokens"], err_msg=f"{beam=}")
    np.testing.assert_allclose(out[True]["scores"], out[False]["scores"], rtol=1e-5)
    stops = [list(r).index(EOS) if EOS in r else MAX_LEN for r in out[True]["tokens"]]
    assert min(stops) < MAX_LEN == max(stops), stops  # Rows that stop and rows that do not,
    assert beam > 1 or 0 < sorted(stops)[1] < MAX_LEN, stops  # one midway (greedy).
    for row, stop in zip(out[True]["tokens"], stops):
      assert (row[stop + 1 :] == PAD).all(), row  # Padding after EOS.
    assert len({tuple(r) for r in out[True]["tokens"]}) > 2  # Outputs depend on the source.


def test_decode_beam_size_1_equals_greedy(tiny_model):
  model, params, batch = tiny_model
  b = batch["input_ids"].shape[0]

  def run(params, batch, search):
    step_fn, state, static = decoding.prepare(
      model, params, batch, "mt", beam_size=1, max_length=MAX_LEN, pad=PAD
    )
    common = dict(batch_size=b, max_length=MAX_LEN, bos=BOS, eos=EOS, pad=PAD)
    if search == "greedy":
      return decoding.greedy(step_fn, state, static, **common)
    return decoding.beam_search(step_fn, state, static, beam_size=1, alpha=0.6, **common)

  run = jax.jit(run, static_argnums=2)
  greedy, beam = run(params, batch, "greedy"), run(params, batch, "beam")
  np.testing.assert_array_equal(np.asarray(greedy["tokens"]), np.asarray(beam["tokens"]))
  assert (np.asarray(greedy["tokens"]) == EOS).any()


# A Markov chain over 5 tokens (0 pad, 1 BOS, 2 EOS, 3 'a', 4 'b'): greedy takes 'a' (0.55) and
# then wanders; 'b' (0.45) is followed by EOS with probability 0.99.
TABLE = np.array(
  [
    [0.01, 0.01, 0.94, 0.02, 0.02],  # after pad
    [0.0, 0.0, 0.0, 0.55, 0.45],  # after BOS
    [0.2, 0.2, 0.2, 0.2, 0.2],  # after EOS
    [0.0, 0.0, 0.32, 0.34, 0.34],  # after 'a'
    [0.0, 0.0, 0.99, 0.005, 0.005],  # after 'b'
  ]
)


def _markov_step(tokens, index, state, static, beam_rows):
  del index, static, beam_rows
  # The state counts steps per row, a stand-in for a cache the search carries along.
  return jnp.log(jnp.asarray(TABLE, jnp.float32) + 1e-9)[tokens], state + 1


def test_decode_beam_search_finds_the_likelier_translation():
  common = dict(batch_size=1, max_length=6, bos=1, eos=2, pad=0)
  greedy = decoding.greedy(_markov_step, jnp.zeros((1,)), None, **common)
  # Greedy: 'a' then 'a'/'b' (0.34 each, the lower id wins) until EOS is likelier.
  assert greedy["tokens"][0].tolist()[:2] == [3, 3]
  beam = decoding.beam_search(_markov_step, jnp.zeros((4,)), None, beam_size=4, alpha=0.0, **common)
  assert beam["tokens"][0].tolist() == [4, 2, 0, 0, 0, 0]  # 'b' EOS, then padding.
  np.testing.assert_allclose(beam["scores"][0], np.log(0.45) + np.log(0.99), rtol=1e-5)
  assert beam["scores"][0] > greedy["scores"][0]


def test_decode_length_penalty_and_max_length():
  common = dict(batch_size=1, bos=1, eos=2, pad=0)
  # max_length 1: nothing finishes; the best alive beam is returned as it is.
  short = decoding.beam_search(
    _markov_step, jnp.zeros((2,)), None, beam_size=2, max_length=1, **common
  )
  assert short["tokens"][0].tolist() == [3]
  # alpha > 0 divides by ((5 + length) / 6) ** alpha.
  out = decoding.beam_search(
    _markov_step, jnp.zeros((2,)), None, beam_size=2, max_length=4, alpha=1.0, **common
  )
  assert out["tokens"][0].tolist()[:2] == [4, 2]
  np.testing.assert_allclose(out["scores"][0], (np.log(0.45) + np.log(0.99)) / (7 / 6), rtol=1e-5)
  assert decoding.strip(np.array([[4, 5, 2, 0], [4, 5, 6, 7]]), eos=2) == [[4, 5], [4, 5, 6, 7]]
