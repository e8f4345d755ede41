r"""The transfer ablation on SST-2: what to train of all-MiniLM-L6-v2, one command.

  python -m launch.local --config=configs/ablations/sst2_transfer.py --sweep --workdir=runs
  python -m launch.report runs/sst2_transfer        # report.md / report.csv / plots/*.png
  python -m research.main --config=configs/ablations/sst2_transfer.py:smoke --workdir=/tmp/abl

Nine points (``get_sweep``), one run each at the same budget (``steps`` x 32 sentences, linear
decay, max_length 64; SST-2 dev, 872 sentences), each method at its customary learning rate:

  full      every parameter, lr 1e-4
  probe     frozen encoder, a linear probe on the mean-pooled embeddings (what all-MiniLM-L6-v2
            was trained to produce; a probe on its untrained pooler is at chance), lr 1e-3
  bottom4   embeddings and layers 0-3 frozen, lr 1e-4
  llrd      layer-wise LR decay 0.75 from lr 2e-4 at the top
  unfreeze  gradual unfreezing (ULMFiT): top layer first, one more layer every steps/10
  lora      LoRA r=8 (alpha 16) on query and value, lr 1e-3
  adapters  Houlsby adapters (size 64) + LayerNorms, lr 1e-3
  bitfit    biases only, lr 1e-3
  scratch   the same architecture from random init, lr 1e-4

The report's table holds accuracy, trainable parameters, step time and peak memory per point;
``plots/sst2_transfer__sst2_accuracy_vs_trainable.png`` is accuracy against trainable
parameters. Variants: ``steps=N`` (default 400), ``smoke`` (a few steps; for the launcher
tests), ``tiny`` (committed fixture, 2-layer random encoder; for tests).
"""

from research import config_lib
from research.data.registry import default_data_config

VARIANTS = ("", "smoke", "tiny", "steps=1000")
ARGS = dict(smoke=False, tiny=False, steps=400)


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, **ARGS)
  c = config_lib.base_config()
  c.experiment = "sst2_transfer"
  c.tasks.sst2 = config_lib.task(
    "classification",
    default_data_config("sst2", max_length=64, buckets=(8, 12, 16, 24, 32, 48, 64)),
    pooling="pooler",
    dropout=0.1,
  )
  config_lib.finetune(c, steps=arg.steps, best_metric="sst2/accuracy", every=arg.steps)
  c.train.log_every = 25
  if arg.smoke:
    config_lib.smoke(c, steps=10, max_length=64, eval_examples=128)
  if arg.tiny:
    config_lib.make_tiny(c, "sst2", fixture="sst2", steps=10)
  return config_lib.lock(c)


def unfreeze_schedule(steps: int, layers: int) -> tuple[tuple[str, int], ...]:
  """ULMFiT-style: head, pooler and top layer from step 0, one more layer every steps/10."""
  every = max(1, steps // 10)
  rules = [(f"encoder/layer_{i}/.*", (layers - 1 - i) * every) for i in range(layers - 1)]
  return (*rules, ("encoder/embeddings/.*", (layers - 1) * every))


def get_sweep(arg: str | None = None):
  """The nine methods of the module docstring, for the same variant (``:steps=1000``)."""
  config = get_config(arg)
  layers = config.model.encoder_overrides.get("num_layers", 6)  # all-MiniLM-L6-v2: 6.

  bottom4 = ("encoder/embeddings/.*", "encoder/layer_[0-3]/.*")
  return config_lib.variants(
    "method",
    {
      "full": {},
      # all-MiniLM-L6-v2 was trained for mean-pooled embeddings; its pooler is untrained.
      "probe": {
        "optim.freeze": ("encoder/.*",),
        "optim.lr": 1e-3,
        "tasks.sst2.head.pooling": "mean",
      },
      "bottom4": {"optim.freeze": bottom4},
      "llrd": {"optim.llrd": 0.75, "optim.lr": 2e-4},
      "unfreeze": {"optim.unfreeze": unfreeze_schedule(config.train.steps, layers)},
      "lora": {"model.peft.method": "lora", "model.peft.lora_rank": 8, "optim.lr": 1e-3},
      "adapters": {"model.peft.method": "adapters", "optim.lr": 1e-3},
      "bitfit": {"model.peft.method": "bitfit", "optim.lr": 1e-3},
      "scratch": {"model.init": "scratch"},
    },
  )
