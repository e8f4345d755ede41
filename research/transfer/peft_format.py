"""LoRA adapters in the HF-PEFT format: what the ``peft`` library saves and loads.

A run's LoRA matrices are useless to the people who would use them unless they load where
everybody loads adapters: ``peft.PeftModel.from_pretrained(base_model, directory)``. That
directory holds two files:

- ``adapter_config.json``: ``peft_type`` ``LORA``, ``task_type`` (``SEQ_CLS``), ``r``,
  ``lora_alpha``, ``lora_dropout``, ``target_modules`` (HF module names: the short ``q_proj``
  form when every such module is targeted, else the full names), ``fan_in_fan_out`` (GPT-2's
  ``Conv1D`` layers), ``base_model_name_or_path`` and ``modules_to_save``: the classification
  head's module (``score`` on transformers' decoder ``*ForSequenceClassification``). The head is
  saved with the adapter: peft users keep losing it when they do not list it (peft issues #310,
  #1070), and an adapter without its head predicts nothing.
- ``adapter_model.safetensors``: ``base_model.model.<HF module>.lora_A.weight`` ``[r, in]`` and
  ``lora_B.weight`` ``[out, r]`` (ours are ``lora_a [in, r]`` and ``lora_b [r, out]``: transposed),
  and ``base_model.model.<head>.weight`` ``[labels, hidden]`` (+ ``.bias`` for a head with one).

The HF module of each of our LoRA modules comes from the family's ``weight_names`` (the
``*ForCausalLM`` names, whose prefix the ``*ForSequenceClassification`` model shares), so every
family that has an HF layout and a ``peft`` field is covered without naming any. Both
directions scale by ``lora_alpha / r`` (peft's default; rsLoRA, DoRA and per-module rank or alpha
patterns are refused on import). Import is loud: a tensor that maps to none of our parameters,
or a module of ours with no tensor, raises.

CLI (the run's ``best/`` params, else its latest checkpoint)::

  python -m research.transfer.peft_format export RUN_DIR OUT_DIR [--task NAME]
  python -m research.transfer.peft_format import ADAPTER_DIR CHECKPOINT

A BERT-like classifier needs ``--prefix bert. --head-module classifier`` (its names are the base
model's, and transformers calls its head ``classifier``; the decoders' defaults need neither).

``import`` reads an adapter onto the base checkpoint's architecture and prints the
``model.peft`` settings it implies and each tensor's destination.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from research import paths
from research.models import families
from research.models.config import PeftConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
HEAD_MODULE = "score"  # transformers' decoder *ForSequenceClassification head.
_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight")


def lora_module_names(cfg: Any, prefix: str = "") -> dict[str, str]:
  """Our projection's module path -> its HF module name, from the family's weight names
  (``encoder/layer_0/attention/query`` -> ``model.layers.0.self_attn.q_proj``), after
  ``prefix``: the task model's attribute for a family whose names are the base model's
  (``bert.`` for BertForSequenceClassification; the decoders' names already carry theirs)."""
  family = families.family_of(cfg)
  if family.weight_names is None:
    raise ValueError(f"the {family.name} family has no HF layout: its adapters cannot be shared")
  names = family.weight_names(cfg.replace(peft=None))
  return {
    p[: -len("/kernel")]: prefix + n[: -len(".weight")]
    for p, n in names.items()
    if p.endswith("/kernel") and n.endswith(".weight")
  }


def _stored_as_in_out(cfg: Any, module: str) -> bool:
  """Whether HF stores the module's weight ``[in, out]`` (GPT-2's ``Conv1D``): peft then needs
  ``fan_in_fan_out``. Read from the family's own tensor hook, not from its name."""
  probe = np.zeros((1, 2), np.float32)
  return families.family_of(cfg).to_hf_tensor(f"{module}/kernel", probe).shape == probe.shape


def _target_modules(targeted: list[str], every: list[str]) -> list[str]:
  """peft's ``target_modules``: short names (``q_proj``) when they select exactly ``targeted``
  among ``every`` HF module, else the full names (peft matches a name or a ``.name`` suffix)."""
  short = sorted({n.rsplit(".", 1)[-1] for n in targeted})
  covered = {n for n in every if n.rsplit(".", 1)[-1] in short}
  return short if covered == set(targeted) else sorted(targeted)


def export_adapter(
  out_dir: str | Path,
  cfg: Any,
  peft: PeftConfig,
  params: Mapping[str, Any],
  task: str,
  base_model: str = "",
  head_module: str = HEAD_MODULE,
  task_type: str = "SEQ_CLS",
  prefix: str = "",
) -> Path:
  """Writes the LoRA matrices and the head of ``task`` of ``params`` (a TaskModel tree) as a
  peft adapter directory, and returns it.

  Args:
    out_dir: the directory to write (created).
    cfg: the family config of the base model (its ``peft`` field is ignored).
    peft: the run's PeftConfig (method 'lora'): rank, alpha and dropout.
    params: ``{'encoder': ..., 'heads': {task: {'output': {'kernel', 'bias'}}}}``.
    task: the head that travels with the adapter, as ``modules_to_save``.
    base_model: ``base_model_name_or_path`` (the run's ``model.checkpoint``).
    head_module: the HF name of the head module (``classifier`` for BERT-like models).
    task_type: peft's task type.
    prefix: see :func:`lora_module_names` (``bert.`` for a BERT classifier).

  Raises:
    ValueError: no LoRA parameters, a LoRA module without an HF name, a missing head, or a
      non-zero head bias (transformers' decoder ``score`` has none: keep it frozen at 0, as
      configs/sst2_decoder.py does).
  """
  from safetensors.numpy import save_file

  if peft.method != "lora":
    raise ValueError(f"model.peft.method={peft.method!r}: only LoRA adapters have a peft format")
  if peft.use_dora:  # Writing A and B alone would silently drop the trained magnitudes.
    raise ValueError("model.peft.use_dora: DoRA adapters are not exported yet; merge instead")
  flat = {p: np.asarray(x) for p, x in paths.flatten(params).items()}
  modules = sorted(p[: -len("/lora_a")] for p in flat if p.endswith("/lora_a"))
  if not modules:
    raise ValueError("no lora_a/lora_b parameters to export (was the run trained with LoRA?)")
  names = lora_module_names(cfg, prefix)
  unnamed = [m for m in modules if m not in names]
  if unnamed:
    raise ValueError(f"LoRA modules without an HF name: {unnamed[:3]}")
  tensors: dict[str, np.ndarray] = {}
  for m in modules:
    tensors[f"{PREFIX}{names[m]}.lora_A.weight"] = flat[f"{m}/lora_a"].astype(np.float32).T
    tensors[f"{PREFIX}{names[m]}.lora_B.weight"] = flat[f"{m}/lora_b"].astype(np.float32).T
  head = f"heads/{task}/output"
  if f"{head}/kernel" not in flat:
    heads = sorted({p.split("/")[1] for p in flat if p.startswith("heads/")})
    raise ValueError(f"no head {task!r} with an output layer; heads: {heads}")
  tensors[f"{PREFIX}{head_module}.weight"] = flat[f"{head}/kernel"].astype(np.float32).T
  bias = flat.get(f"{head}/bias")
  if bias is not None and np.any(bias):
    if head_module == HEAD_MODULE:
      raise ValueError(
        f"{head}/bias is non-zero, but transformers' {HEAD_MODULE!r} layer has no bias: train "
        f"with optim.freeze=('{head}/bias',) so it stays 0"
      )
    tensors[f"{PREFIX}{head_module}.bias"] = bias.astype(np.float32)
  targeted = [names[m] for m in modules]
  config = dict(
    peft_type="LORA",
    task_type=task_type,
    r=peft.lora_rank,
    lora_alpha=peft.lora_alpha,
    lora_dropout=peft.lora_dropout,
    target_modules=_target_modules(targeted, list(names.values())),
    fan_in_fan_out=any(_stored_as_in_out(cfg, m) for m in modules),
    modules_to_save=[head_module],
    base_model_name_or_path=base_model,
    bias="none",
    use_rslora=False,
    use_dora=False,
    init_lora_weights=True,
    inference_mode=True,
  )
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS))
  return out


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
  """The adapter's ``adapter_config.json``, checked to be a plain LoRA we compute the same way.

  Raises:
    ValueError: no such file, another peft type, or rsLoRA / DoRA / rank or alpha patterns /
      LoRA on biases (computed differently from ``A B * alpha / r``).
  """
  file = Path(directory) / ADAPTER_CONFIG
  if not file.is_file():
    raise ValueError(f"{file}: not found; a peft adapter directory holds {ADAPTER_CONFIG}")
  config = json.loads(file.read_text())
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{file}: peft_type {config.get('peft_type')!r}; only LORA is read")
  unsupported = [
    k
    for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "lora_bias")
    if config.get(k)
  ]
  if config.get("bias", "none") != "none":
    unsupported.append(f"bias={config['bias']!r}")
  if unsupported:
    raise ValueError(f"{file}: {unsupported} not supported (plain LoRA only)")
  return config


def import_adapter(
  directory: str | Path, cfg: Any, task: str, head_module: str | None = None, prefix: str = ""
) -> tuple[PeftConfig, dict[str, Any]]:
  """A peft LoRA adapter as our ``model.peft`` and parameter leaves.

  Args:
    directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
    cfg: the base model's family config (from its checkpoint).
    task: the head name the saved head (``modules_to_save``) goes to.
    head_module: the head's HF module; default the config's single ``modules_to_save`` entry
      that the weights hold.
    prefix: see :func:`lora_module_names`.

  Returns:
    ``(peft config, tree)``: targets that select exactly the adapted modules, and a
    ``{'encoder': ...lora_a/lora_b, 'heads': {task: {'output': ...}}}`` tree to lay over the
    base params (:func:`with_adapter`); no head when the adapter saved none.

  Raises:
    ValueError: see :func:`read_adapter_config`; a tensor of an unknown module, a module with
      only one of A and B, or a tensor that maps to nothing.
  """
  from safetensors.numpy import load_file

  config = read_adapter_config(directory)
  tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
  ours = {hf_name: path for path, hf_name in lora_module_names(cfg, prefix).items()}
  flat: dict[str, np.ndarray] = {}
  used = set()
  for key, value in tensors.items():
    m = _LORA_KEY.fullmatch(key)
    if not m:
      continue
    if m.group(1) not in ours:
      raise ValueError(f"{directory}: {key}: module {m.group(1)!r} is not in this model")
    leaf = "lora_a" if m.group(2) == "A" else "lora_b"
    flat[f"{ours[m.group(1)]}/{leaf}"] = np.ascontiguousarray(value.astype(np.float32).T)
    used.add(key)
  modules = sorted({p.rsplit("/", 1)[0] for p in flat})
  half = [m for m in modules if f"{m}/lora_a" not in flat or f"{m}/lora_b" not in flat]
  if half:
    raise ValueError(f"{directory}: modules with only one of lora_A / lora_B: {half[:3]}")
  heads = [head_module] if head_module else list(config.get("modules_to_save") or [])
  for name in heads:
    weight = tensors.get(f"{PREFIX}{name}.weight")
    if weight is None:
      continue
    flat[f"heads/{task}/output/kernel"] = np.ascontiguousarray(weight.astype(np.float32).T)
    bias = tensors.get(f"{PREFIX}{name}.bias")
    width = weight.shape[0]
    flat[f"heads/{task}/output/bias"] = (
      np.zeros(width, np.float32) if bias is None else bias.astype(np.float32)
    )
    used.update({f"{PREFIX}{name}.weight", f"{PREFIX}{name}.bias"})
    break
  unused = sorted(set(tensors) - used)
  if unused:
    raise ValueError(f"{directory}: tensors that map to no parameter: {unused[:5]}")
  peft = PeftConfig(
    method="lora",
    lora_rank=int(config["r"]),
    lora_alpha=float(config["lora_alpha"]),
    lora_dropout=float(config.get("lora_dropout") or 0.0),
    lora_targets=tuple(re.escape(m) for m in modules),
  )
  return peft, paths.unflatten(flat)


def with_adapter(params: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict[str, Any]:
  """``params`` (a TaskModel tree built with the adapter's PeftConfig) with the adapter's
  leaves in place.

  Raises:
    ValueError: an adapter leaf the tree does not have, or of another shape.
  """
  flat, new = dict(paths.flatten(params)), paths.flatten(adapter)
  for path, value in new.items():
    if path not in flat:
      raise ValueError(f"adapter leaf {path} is not in the model (built with its PeftConfig?)")
    if tuple(np.shape(flat[path])) != tuple(value.shape):
      raise ValueError(f"{path}: adapter shape {value.shape}, model {np.shape(flat[path])}")
    flat[path] = np.asarray(value, np.asarray(flat[path]).dtype)
  return paths.unflatten(flat)


# --- the command line ----------------------------------------------------------------------


def run_params(run_dir: str | Path) -> Any:
  """A run's params as numpy: its ``best/`` (the best evaluation), else its newest checkpoint.

  The same orbax layout research.train.checkpoints writes; read here with orbax directly, as
  the transfer layer sits below the training code.

  Raises:
    FileNotFoundError: no checkpoint in the run.
  """
  import jax
  import orbax.checkpoint as ocp

  root = Path(run_dir).absolute()
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for sub, item in (("best", "params"), ("checkpoints", "state")):
    if not (root / sub).is_dir():
      continue
    manager = ocp.CheckpointManager(
      root / sub,
      options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={item: ocp.StandardCheckpointHandler()},
    )
    step = (manager.best_step() if sub == "best" else None) or manager.latest_step()
    if step is None:
      continue
    meta = manager.item_metadata(step)[item]
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    restored = manager.restore(
      step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)})
    )[item]
    return jax.tree.map(np.asarray, restored if item == "params" else restored["params"])
  raise FileNotFoundError(f"{root}: no orbax checkpoint under best/ or checkpoints/")


def export_run(
  run_dir: str | Path,
  out_dir: str | Path,
  task: str | None = None,
  head_module: str = HEAD_MODULE,
  prefix: str = "",
) -> Path:
  """:func:`export_adapter` of a training run: its config.json gives the checkpoint, family,
  overrides, PEFT settings and tasks; its params the matrices.

  Raises:
    ValueError: a run without LoRA, or several tasks and no ``task``.
  """
  from research.transfer import hf
  from research.transfer import peft as peft_lib

  run = json.loads((Path(run_dir) / "config.json").read_text())
  model = run["model"]
  cfg = hf.load_config(hf.resolve(model["checkpoint"]), model.get("family") or None)
  cfg = cfg.replace(**dict(model.get("encoder_overrides") or {}))
  tasks = list(run["tasks"])
  if task is None:
    if len(tasks) != 1:
      raise ValueError(f"the run has tasks {tasks}: name the one to export with --task")
    task = tasks[0]
  peft = peft_lib.from_config(model.get("peft"))
  params = run_params(run_dir)
  return export_adapter(
    out_dir, cfg, peft, params, task, model["checkpoint"], head_module, prefix=prefix
  )


def main(argv: list[str] | None = None) -> int:
  import argparse

  from research.transfer import hf

  parser = argparse.ArgumentParser(prog="python -m research.transfer.peft_format")
  sub = parser.add_subparsers(dest="command", required=True)
  export = sub.add_parser("export", help="a run's LoRA + head -> a peft adapter directory")
  export.add_argument("run_dir")
  export.add_argument("out_dir")
  export.add_argument("--task", default=None, help="the head to save (multi-task runs)")
  export.add_argument("--head-module", default=HEAD_MODULE, help="HF name of the head module")
  export.add_argument("--prefix", default="", help="task-model prefix of the names ('bert.')")
  imp = sub.add_parser("import", help="check a peft adapter against a base checkpoint")
  imp.add_argument("adapter_dir")
  imp.add_argument("checkpoint", help="the base model: an HF directory or hub id")
  imp.add_argument("--prefix", default="", help="task-model prefix of the names ('bert.')")
  args = parser.parse_args(argv)
  try:
    if args.command == "export":
      out = export_run(args.run_dir, args.out_dir, args.task, args.head_module, args.prefix)
      print(f"wrote {out / ADAPTER_CONFIG} and {out / ADAPTER_WEIGHTS}")
    else:
      cfg = hf.load_config(hf.resolve(args.checkpoint))
      peft, tree = import_adapter(args.adapter_dir, cfg, "task", prefix=args.prefix)
      for path, value in paths.flatten(tree).items():
        print(f"{path} {tuple(value.shape)}")
      print(
        f"model.peft: method=lora lora_rank={peft.lora_rank} lora_alpha={peft.lora_alpha} "
        f"lora_dropout={peft.lora_dropout} lora_targets={list(peft.lora_targets)}"
      )
  except (ValueError, FileNotFoundError, hf.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
