r"""SST-2 sentiment on a decoder-only LM (Llama / Qwen2 / Gemma / GPT-2) with LoRA r=16 on q/v.

  python -m research.main --config=configs/sst2_decoder.py --workdir=runs/sst2_qwen_lora
  python -m research.main --config=configs/sst2_decoder.py:checkpoint=/data/Llama-3.2-1B \
    --workdir=runs/sst2_llama_lora
  python -m research.main --config=configs/sst2_decoder.py:tiny --workdir=/tmp/sst2_decoder_tiny

The classification head reads the last real token's hidden state (``pooling='last'``, as
transformers' *ForSequenceClassification, either padding side); the frozen base gets LoRA
matrices on every layer's query and value projections (rank 16, alpha 32, dropout 0.05), and
only they and the head's kernel train (``optim.trainable`` left empty: the run derives LoRA's
rules; the head's bias stays 0, as transformers' bias-free ``score`` layer). Share the adapter
and head in the format the ``peft`` library loads:
``python -m research.transfer.peft_format export RUN_DIR OUT_DIR``.
The model's family comes from the checkpoint's config.json, so ``checkpoint=`` takes any HF
directory or hub id of a registered decoder family (default ``Qwen/Qwen2.5-0.5B``; e.g.
``meta-llama/Llama-3.2-1B``, whose tokenizer has no pad token: give it one before training).
The LoRA targets are paths: GPT-2 fuses q/k/v, so on GPT-2 set
``--config.model.peft.lora_targets='("encoder/layer_\d+/attention/qkv",)'``.

Variants (comma-separated): ``tiny`` (a random 2-layer Llama on MiniLM's tokenizer and the
committed SST-2 fixture, made in-process, seconds on CPU; for tests), ``tiny,checkpoint=DIR``
(the tiny schedule on the fixture from the weights in DIR), ``peft=none`` (full fine-tuning,
for comparison), ``peft=qlora`` (QLoRA: the same LoRA over a base whose every projection is
stored in NF4 with double-quantised scales, quantised after loading), ``peft=dora`` (DoRA: LoRA
plus a trained magnitude per output column), ``checkpoint=ID``. No ``smoke`` variant: a smoke
run means real weights, and no decoder checkpoint ships with the offline packages here; the
default and ``checkpoint=`` variants need the weights (downloaded or local). Not yet run on
real weights: no numbers.
"""

from research import config_lib
from research.data.registry import default_data_config

VARIANTS = (
  "",
  "tiny",
  "tiny,peft=none",
  "tiny,peft=qlora",
  "tiny,peft=dora",
  "peft=qlora",
  "checkpoint=meta-llama/Llama-3.2-1B",
  "peft=none",
)
DEFAULT_CHECKPOINT = "Qwen/Qwen2.5-0.5B"
LORA_VARIANTS = ("lora", "qlora", "dora")  # qlora: the same LoRA over an NF4 base.
# A 2-layer, 32-wide Llama with grouped-query attention (4 query heads over 2 key/value heads).
TINY_LLAMA = dict(
  num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64
)


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, tiny=False, checkpoint="", peft="lora")
  c = config_lib.base_config()
  c.experiment = "sst2_decoder"
  c.model.checkpoint = arg.checkpoint or DEFAULT_CHECKPOINT
  c.model.dropout = 0.0  # The decoders pretrain without dropout; LoRA has its own.
  lora = arg.peft in LORA_VARIANTS
  if lora:
    c.model.peft.update(
      method="lora",
      lora_rank=16,
      lora_alpha=32.0,
      lora_dropout=0.05,
      lora_targets=(r"encoder/layer_\d+/attention/(query|value)",),
      use_dora=arg.peft == "dora",
      quantize="nf4" if arg.peft == "qlora" else "none",
    )
  elif arg.peft != "none":
    raise ValueError(f"peft={arg.peft!r}: expected one of {(*LORA_VARIANTS, 'none')}")
  c.tasks.sst2 = config_lib.task(
    "classification", default_data_config("sst2"), pooling="last", dropout=0.0
  )
  config_lib.finetune(c, steps=2000, best_metric="sst2/accuracy")
  # transformers' decoder *ForSequenceClassification `score` has no bias: keeping ours at its
  # initial 0 makes the head exactly that layer, so the peft-format export carries it whole.
  c.optim.freeze = (r"heads/sst2/output/bias",)
  if lora:
    c.optim.update(lr=2e-4, weight_decay=0.0)  # The usual LoRA recipe: higher lr, no decay.
  if arg.tiny:
    config_lib.make_tiny(c, "sst2", fixture="sst2", steps=10)
    c.optim.lr = 1e-3
    if arg.checkpoint:  # The tiny schedule from real (or test-made) weights.
      c.model.init = "pretrained"
      c.model.encoder_overrides = {}  # Assigned: update() would merge make_tiny's sizes in.
    else:  # A random Llama in-process: MiniLM gives the tokenizer and the vocabulary size.
      c.model.update(checkpoint=config_lib.MINILM, family="llama", encoder_overrides=TINY_LLAMA)
  return config_lib.lock(c)
