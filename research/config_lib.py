"""Helpers shared by the experiment configs in configs/.

Configs stay one file per experiment with ``get_config(arg)``; what they share lives here:
the variant-string parser, the default fields of every run, and locking (so a misspelt
``--config.optim.lrr=1`` fails instead of silently adding a field).
"""

from __future__ import annotations

import ast
from typing import Any

import ml_collections

from research import optim
from research.data.registry import default_data_config

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``'smoke,init=scratch,seed=3'`` into a ConfigDict over ``defaults``.

  A bare word sets a boolean flag of that name; ``key=value`` values are Python literals when
  they parse as such, else strings. Unknown keys raise, naming the known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise KeyError(f"unknown config variant {key!r}; known: {sorted(defaults)}")
    if not _:
      out[key] = True
      continue
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with defaults; experiment configs fill in and override."""
  c = ml_collections.ConfigDict()
  c.experiment = ""
  c.seed = 0
  c.model = dict(
    checkpoint=MINILM,  # HF directory or hub id; also the tokenizer.
    init="pretrained",  # 'pretrained' | 'scratch'
    dtype="auto",  # compute dtype: 'auto' (fp32 on CPU, bf16 on GPU/TPU), 'float32', ...
    param_dtype="float32",
    remat=False,
    dropout=0.1,
    encoder_overrides={},  # EncoderConfig fields, e.g. {'num_layers': 2} for a tiny model.
    graft_rules=(("encoder/(.*)", r"encoder/\1"),),
    reinit_on_mismatch=(),
    strict_graft=False,
    # Parameter-efficient transfer (research.transfer.peft); method 'none' trains everything.
    peft=dict(
      method="none",  # 'none' | 'lora' | 'adapters' | 'bitfit'
      lora_rank=8,
      lora_alpha=16.0,  # The LoRA update is A @ B * lora_alpha / lora_rank.
      lora_dropout=0.0,
      lora_targets=(r"encoder/layer_\d+/attention/(query|value)",),  # Module path regexes.
      adapter_size=64,
      adapter_placement="houlsby",  # 'houlsby' (after attention and FFN) | 'pfeiffer' (FFN)
    ),
  )
  c.init_from = ""  # another run's workdir or an HF checkpoint to graft from (see DESIGN.md).
  c.resume_from = ""  # another run's workdir to resume exactly (state + input position).
  c.tasks = ml_collections.ConfigDict()
  c.train = dict(
    steps=1000,
    batch_size=32,
    grad_accum=1,
    log_every=50,
    eval_every=500,
    checkpoint_every=500,
    max_to_keep=2,
    best_metric="",
    best_mode="max",
    nonfinite_patience=5,
    progress=True,
  )
  c.eval = dict(batch_size=64)
  c.optim = optim.default_config()
  c.parallel = dict(
    mode="jit",
    fsdp=1,
    fsdp_rules=((".*kernel", True), (".*embedding", True)),
    distributed=False,
    coordinator_address="",
    num_processes=1,
    process_id=0,
  )
  return c


def task(kind: str, data: ml_collections.ConfigDict, **head: Any) -> ml_collections.ConfigDict:
  """One entry of ``config.tasks``: its kind, data set and head options."""
  return ml_collections.ConfigDict(dict(kind=kind, data=data, head=head))


def fixture_data(name: str) -> dict[str, Any]:
  """Data fields that point a data set at its tiny committed copy under tests/fixtures/data.

  Prepared into its own tfds directory so it never shadows the real data set's preparation.
  """
  from research.data.locations import repo_root

  root = repo_root()
  return dict(
    manual_dir=str(root / "tests" / "fixtures" / "data" / name),
    data_dir=str(root / ".tfds" / "fixtures"),
    verify_checksums=False,
  )


TINY_ENCODER = dict(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64)


def make_tiny(config: ml_collections.ConfigDict, task: str, fixture: str, steps: int) -> None:
  """Turns ``config`` into its ``tiny`` variant: a random 2-layer encoder trained on the
  committed fixture of ``task``, the whole real trainer in seconds on CPU (for tests)."""
  config.model.init = "scratch"
  config.model.encoder_overrides = TINY_ENCODER
  config.tasks[task].data.update(fixture_data(fixture), max_length=32, buckets=(32,))
  config.train.update(
    steps=steps,
    batch_size=8,
    log_every=5,
    eval_every=steps,
    checkpoint_every=10,
    progress=False,
  )
  config.eval.batch_size = 8


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config (no new fields) and returns it."""
  config.lock()
  return config


def finetune(c: ml_collections.ConfigDict, steps: int, best_metric: str, every: int = 500) -> None:
  """The fine-tuning recipe the experiments share: batches of 32, AdamW at 1e-4 with 6% warmup
  and linear decay, weight decay 0.01; eval and checkpoint every ``every`` steps."""
  c.train.update(
    steps=steps,
    batch_size=32,
    log_every=50,
    eval_every=every,
    checkpoint_every=every,
    best_metric=best_metric,
  )
  c.optim.update(lr=1e-4, warmup_fraction=0.06, weight_decay=0.01, schedule="linear")


def smoke(c: ml_collections.ConfigDict, steps: int = 20) -> None:
  """A ``smoke`` variant's schedule: a few steps of 8, one eval and checkpoint at the end."""
  c.train.update(steps=steps, batch_size=8, log_every=5, eval_every=steps, checkpoint_every=steps)


def ner_task(dataset: str, crf: bool = False) -> ml_collections.ConfigDict:
  """A CoNLL-style NER task: a token-classification head (optionally a CRF) on ``dataset``.

  Fine buckets keep padding near 23% (CoNLL-2003 sentences: median ~20 sub-tokens).
  """
  buckets = (16, 24, 32, 40, 48, 64, 96, 128)
  data = default_data_config(dataset, max_length=128, buckets=buckets)
  return task("tagging", data, dropout=0.1, crf=crf)


def ner_experiment(
  arg: ml_collections.ConfigDict, experiment: str, task_name: str, dataset: str
) -> ml_collections.ConfigDict:
  """A CoNLL-style NER run of :func:`ner_task` (1500 steps x 32 sentences, lr 1e-4).

  ``arg`` holds the variants every NER config offers: ``smoke``, ``tiny``, ``crf``, ``init``.
  """
  c = base_config()
  c.experiment = experiment
  c.model.init = arg.init
  c.tasks[task_name] = ner_task(dataset, crf=arg.crf)
  finetune(c, steps=1500, best_metric=f"{task_name}/f1")
  c.eval.batch_size = 64
  if arg.smoke:  # Under a minute: 20 small steps, 256 eval sentences.
    smoke(c)
    data = c.tasks[task_name].data
    data.update(max_length=64, buckets=(32, 64))
    data.splits.eval = f"{data.splits.eval}[:256]"
  if arg.tiny:
    make_tiny(c, task_name, fixture=dataset, steps=10)
  return c
