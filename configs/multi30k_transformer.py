r"""Multi30k en->de: the standard small Transformer trained from scratch (the baseline to beat).

  python -m research.main --config=configs/multi30k_transformer.py --workdir=runs/m30k_transformer
  python -m research.main --config=configs/multi30k_transformer.py:smoke --workdir=/tmp/m30k_tf
  python -m launch.local --config=configs/multi30k_transformer.py --sweep --workdir=runs
  python -m launch.local --config=configs/multi30k_transformer.py:lr=1e-3 --sweep --workdir=runs
  python -m launch.report runs/multi30k_transformer
  python -m research.main --mode=predict --workdir=runs/m30k_transformer --input=sentences.en.txt

The recipe of small Transformers on Multi30k / IWSLT: 3 encoder + 3 decoder layers of width
256 (4 heads, feed-forward 1024), one byte-level BPE of 8,000 tokens shared by English and
German (``tasks.multi30k.vocab``: trained on the training split only, cased, kept in the run
directory as ``target_tokenizer.json``), dropout 0.3 (attention 0.1), label smoothing 0.1,
AdamW (0.9, 0.98) with the inverse-square-root schedule (``optim.schedule='rsqrt'``), batches
of 128 sentence pairs. The model is the BERT-like family at random init (``model.init=
rnd2rnd``: MiniLM's config.json as the template, resized by ``model.encoder_overrides``; the
decoder copies the encoder's shape). Evaluation on ``val`` (1,014 sentences): teacher-forced NLL
and token accuracy, then beam-4 and greedy decoding scored with cased sacreBLEU (13a) and chrF
against the original references, with their signatures and the length ratio in results.json;
``best/`` keeps the best ``bleu`` (beam 4).

Budget: 4,000 steps of 128 sentence pairs (STEPS; 17.7 epochs of the 29,000 pairs), 500 warmup
steps, evaluations at steps 1000-4000. Sized for <= 2 h on the project's 2-core CPU: each
bucket's steady-state step, weighted by how often an epoch uses it (16 tokens 56%, 24 35%,
32 8%, 64 2%), costs 2.5 CPU-seconds, so 1.3-1.6 s with both cores and 1.4-1.8 h for 4,000
steps, plus about 10 min of compiling and evaluating (docs/results.md). On a shared machine it
takes longer (6.0 s per step at load average 7-12). ``get_sweep()`` is the learning-rate sweep
(three peak lrs, seed 0); with ``:lr=X`` it is seeds 0 and 1 at that lr.
configs/multi30k_bert2rnd.py compares warm-starting at the same steps and protocol.

Variants (comma-separated): ``smoke`` (10 steps on the real data, 64 val sentences decoded
greedily; under a minute), ``tiny`` (a 2-layer width-32 model and a BPE of 300 on the committed
fixture; seconds, for tests), ``lr=X`` (peak learning rate), ``seed=N``, ``steps=N``.
Checkpoint averaging is not wired (the loop keeps the best and the latest state only).
Reached (lr 1e-3, seed 0, 4,000 steps, 1.9 h on 2 CPU cores): cased val BLEU 39.07 beam 4
(37.71 greedy), chrF 62.04 (docs/results.md, "Multi30k en→de translation").
"""

from research import config_lib

STEPS = 4000
WARMUP = 500
LR = 1e-3
LRS = (5e-4, 1e-3, 2e-3)  # The sweep: peak lrs of the inverse-square-root schedule.
WIDTH = dict(hidden_size=256, num_heads=4, intermediate_size=1024, num_layers=3)
VOCAB = dict(target="bpe", source="joint", size=8000, min_frequency=2)

VARIANTS = ("", "smoke", "tiny", "lr=5e-4", "seed=1", "smoke,seed=1")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, tiny=False, lr=LR, seed=0, steps=0)
  model = dict(
    init="rnd2rnd",
    dropout=0.3,
    encoder_overrides=dict(WIDTH, attention_dropout=0.1, max_position_embeddings=128),
    decoder_overrides={},  # EncoderConfig fields of the decoder (default: the encoder's).
  )
  c = config_lib.translation_experiment(arg, "multi30k_transformer", model, VOCAB, STEPS, WARMUP)
  return config_lib.lock(c)


def get_sweep(arg: str | None = None):
  """The protocol, one command each (both compared at STEPS steps, in docs/results.md):

  - no variant: the lr sweep, ``optim.lr`` in LRS at seed 0 (3 runs);
  - ``:lr=X`` (the best of the sweep): seeds 0 and 1 at that lr, averaged by launch.report
    (seed 0 repeats the sweep's run at that lr: the same config, so the same numbers).
  """
  chosen = config_lib.parse_arg(arg, smoke=False, tiny=False, lr=None, seed=0, steps=0).lr
  if chosen is None:
    return {"optim.lr": list(LRS)}
  return {"seed": [0, 1]}
