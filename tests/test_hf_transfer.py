"""HF import/export: parity with transformers (PyTorch), round trip, real MiniLM, bad input."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from hf_tiny import make_checkpoint, padded_batch, torch_hidden

from research import paths
from research.models.encoder import Encoder
from research.transfer import hf

MODEL_TYPES = ["bert", "roberta", "xlm-roberta", "distilbert", "electra"]


def our_hidden(directory, ids, mask):
  cfg, params = hf.load_pretrained(directory)
  out = Encoder(cfg).apply({"params": params["encoder"]}, jnp.asarray(ids), jnp.asarray(mask))
  return np.asarray(out["hidden_states"])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_parity_with_transformers_on_padded_batch(model_type, tmp_path):
  directory = make_checkpoint(model_type, tmp_path / model_type)
  cfg = hf.load_config(directory)
  ids, mask = padded_batch(cfg.pad_token_id)
  ours, theirs = our_hidden(directory, ids, mask), torch_hidden(directory, ids, mask)
  valid = mask.astype(bool)
  assert np.max(np.abs(ours[valid] - theirs[valid])) < 1e-5


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "electra"])
def test_round_trip_save_pretrained_loads_in_transformers(model_type, tmp_path):
  source = make_checkpoint(model_type, tmp_path / "src", seed=1)
  cfg, params = hf.load_pretrained(source)
  # Perturb so the test cannot pass by re-reading the source file.
  wiggle = lambda _, x: (x + 0.01 * np.sin(np.arange(x.size)).reshape(x.shape)).astype(x.dtype)
  params = paths.map_with_path(wiggle, params)
  out = hf.save_pretrained(tmp_path / "out", cfg, params)
  ids, mask = padded_batch(cfg.pad_token_id)
  ours = np.asarray(
    Encoder(cfg).apply({"params": params["encoder"]}, jnp.asarray(ids), jnp.asarray(mask))[
      "hidden_states"
    ]
  )
  theirs = torch_hidden(out, ids, mask)
  valid = mask.astype(bool)
  assert np.max(np.abs(ours[valid] - theirs[valid])) < 1e-5
  # And our loader reads back exactly what was written.
  _, again = hf.load_pretrained(out)
  for p, x in paths.flatten(params).items():
    np.testing.assert_array_equal(paths.flatten(again)[p], x, err_msg=p)


def test_task_model_prefix_and_unused_heads_are_handled(tmp_path):
  import torch
  import transformers
  from hf_tiny import tiny_config

  torch.manual_seed(0)
  model = transformers.BertForSequenceClassification(tiny_config("bert")).eval()
  model.save_pretrained(tmp_path)
  _cfg, params = hf.load_pretrained(tmp_path)
  np.testing.assert_allclose(
    params["encoder"]["embeddings"]["word_embeddings"]["embedding"],
    model.bert.embeddings.word_embeddings.weight.detach().numpy(),
  )
  assert "heads" not in params


def test_minilm_verify_cli(minilm_dir, capsys):
  assert hf.main(["verify", str(minilm_dir)]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  key, value = last.split("=")
  assert key == "max_abs_diff" and float(value) <= 1e-4


def test_minilm_inspect_cli(minilm_dir, capsys):
  assert hf.main(["inspect", str(minilm_dir)]) == 0
  out = capsys.readouterr().out
  assert "encoder/layer_5/attention/query/kernel" in out
  assert "22,713,216 parameters" in out  # all-MiniLM-L6-v2 with its pooler.


def test_minilm_sentence_embeddings_rank_paraphrase_first(minilm_dir):
  import transformers

  cfg, params = hf.load_pretrained(minilm_dir)
  tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  texts = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar.",
    "The stock market fell sharply on Monday.",
  ]
  enc = tok(texts, padding=True, return_tensors="np")
  out = Encoder(cfg).apply(
    {"params": params["encoder"]},
    jnp.asarray(enc["input_ids"]),
    jnp.asarray(enc["attention_mask"]),
  )["hidden_states"]
  m = enc["attention_mask"][..., None]
  emb = np.array((out * m).sum(1) / m.sum(1))
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  paraphrase, unrelated = emb[0] @ emb[1], emb[0] @ emb[2]
  assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)


def test_hub_id_resolves_offline_package(minilm_dir):
  assert hf.resolve("sentence-transformers/all-MiniLM-L6-v2").resolve() == minilm_dir.resolve()


def test_hub_id_resolves_through_huggingface_hub_cache(tmp_path, monkeypatch):
  # The real hub cache layout: models--org--name/{refs/main, snapshots/<rev>/...}.
  rev = "0123456789abcdef0123456789abcdef01234567"
  repo = tmp_path / "hub" / "models--acme--tiny-bert"
  make_checkpoint("bert", repo / "snapshots" / rev)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(rev)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  import huggingface_hub.constants as c

  monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
  cfg, params = hf.load_pretrained("acme/tiny-bert")
  assert cfg.hidden_size == 32 and "encoder" in params


def test_unknown_hub_id_offline_fails_clearly():
  with pytest.raises(hf.CheckpointError, match="acme/does-not-exist"):
    hf.resolve("acme/does-not-exist")


# --- bad input: one-line errors naming the file and the problem --------------------------


def test_directory_without_config_json(tmp_path):
  with pytest.raises(hf.CheckpointError, match=r"config\.json: not found"):
    hf.load_pretrained(tmp_path)


def test_truncated_safetensors(tmp_path):
  directory = make_checkpoint("bert", tmp_path / "m")
  weights = directory / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
  with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: cannot read") as e:
    hf.load_pretrained(directory)
  assert "\n" not in str(e.value)


def test_unknown_model_type(tmp_path):
  directory = make_checkpoint("bert", tmp_path / "m")
  cfg = json.loads((directory / "config.json").read_text())
  cfg["model_type"] = "xlnet"
  (directory / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.CheckpointError, match=r"config\.json: unknown model_type 'xlnet'"):
    hf.load_pretrained(directory)


def test_config_that_does_not_fit_the_weights(tmp_path):
  directory = make_checkpoint("bert", tmp_path / "m")
  cfg = json.loads((directory / "config.json").read_text())
  cfg["intermediate_size"] = 40
  (directory / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(
    hf.CheckpointError,
    match=r"intermediate\.dense\.bias' has shape \(37,\) but config\.json implies \(40,\)",
  ):
    hf.load_pretrained(directory)


def test_pickle_refused_unless_opted_in(tmp_path):
  import torch

  directory = make_checkpoint("bert", tmp_path / "m")
  from safetensors.torch import load_file

  torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
  (directory / "model.safetensors").unlink()
  with pytest.raises(hf.CheckpointError, match="refusing to unpickle"):
    hf.load_pretrained(directory)
  cfg, _params = hf.load_pretrained(directory, allow_pickle=True)
  assert cfg.num_layers == 2


def test_cli_reports_error_on_one_line(tmp_path, capsys):
  assert hf.main(["inspect", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "config.json" in err and "\n" not in err


def test_sharded_safetensors_index(tmp_path):
  from safetensors.numpy import load_file, save_file

  directory = make_checkpoint("bert", tmp_path / "m")
  tensors = load_file(directory / "model.safetensors")
  names = sorted(tensors)
  half = len(names) // 2
  shards = {
    "model-00001-of-00002.safetensors": names[:half],
    "model-00002-of-00002.safetensors": names[half:],
  }
  for file, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, directory / file)
  (directory / "model.safetensors").unlink()
  index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index))
  _cfg, _params = hf.load_pretrained(directory)
  ids, mask = padded_batch(0)
  valid = mask.astype(bool)
  diff = our_hidden(directory, ids, mask)[valid] - torch_hidden(directory, ids, mask)[valid]
  assert np.max(np.abs(diff)) < 1e-5


def test_tokenizer_is_the_class_autotokenizer_picks_and_loads_without_pytorch(minilm_dir):
  import subprocess
  import sys

  import transformers

  ours, auto = (
    hf.load_tokenizer(minilm_dir),
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir)),
  )
  assert type(ours) is type(auto)
  pair = (["A man plays a guitar.", "Short."], ["Someone strums one.", "A longer second text."])
  assert ours(*pair, padding=True) == auto(*pair, padding=True)  # token type ids included
  # AutoTokenizer's config lookup imports PyTorch (when installed); the run's start does not.
  code = (
    "import sys; from pathlib import Path; from research.transfer import hf; "
    f"hf.load_tokenizer(Path({str(minilm_dir)!r})); print('torch' in sys.modules)"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_tokenizer_config_that_is_not_json_names_the_file(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(hf.CheckpointError, match=r"tokenizer_config\.json: not a JSON object"):
    hf.load_tokenizer(tmp_path)
