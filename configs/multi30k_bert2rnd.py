r"""Multi30k en->de translation: an encoder-decoder warm-started from all-MiniLM-L6-v2.

  python -m research.main --config=configs/multi30k_bert2rnd.py --workdir=runs/m30k_bert2rnd
  python -m research.main --config=configs/multi30k_bert2rnd.py:init=rnd2rnd --workdir=runs/m30k_r
  python -m research.main --config=configs/multi30k_bert2rnd.py:smoke --workdir=/tmp/m30k_smoke
  python -m research.main --mode=predict --workdir=runs/m30k_bert2rnd --input=sentences.en.txt

The init mode is one field, ``model.init`` (``--config.model.init=bert2bert`` works too):
``bert2rnd`` (encoder from MiniLM, decoder at init; Rothe et al. 2020), ``rnd2rnd`` (scratch)
or ``bert2bert`` (decoder self-attention/FFN/embeddings copied from the encoder layers,
cross-attention new); the graft report in the run directory lists what came from where.
Source and target share MiniLM's (uncased) WordPiece vocabulary; the output layer is tied to
the decoder's word embeddings. Training: teacher forcing with label smoothing
(``tasks.multi30k.loss``); evaluation on ``val``: teacher-forced NLL and token accuracy, then
decoding (``tasks.multi30k.decode``: beam sizes, GNMT length penalty alpha, maximum length)
and detokenised sacreBLEU: ``bleu`` (first beam size), ``bleu_greedy``, ``bleu_beam4``.
To freeze the encoder for the first k steps: ``optim.unfreeze=(('encoder/.*', k),)``.

Variants (comma-separated): ``smoke`` (a few steps, a 1-layer decoder, short greedy decoding;
under a minute), ``tiny`` (random 2-layer model on the committed fixture, for tests),
``init=rnd2rnd|bert2rnd|bert2bert``, ``cpu`` (the 2-core CPU comparison in docs/results.md: a
2-layer decoder, beams 1 and 4), ``steps=N``. Reached with ``cpu,steps=1500`` (1500 x 16, 2-core
CPU): BERT2RND val BLEU 23.63 beam 4 / 23.10 greedy; RND2RND 2.64 / 1.48 (see docs/results.md).
A pretrained encoder trains at ``ENCODER_LR_FACTOR`` times the lr (``optim.lr_multipliers``).
"""

from research import config_lib
from research.data.registry import default_data_config

# At the decoder's lr, the pretrained encoder's representations collapsed (mean-pooled sentence
# cosine 0.05 -> 0.9994 after 1500 CPU-variant steps) before the random cross-attention learned
# to read them; the decoder then ignored the source. Pretrained-encoder lr: ENCODER_LR_FACTOR x lr.
ENCODER_LR_FACTOR = 0.1

VARIANTS = ("", "smoke", "tiny", "init=rnd2rnd", "init=bert2bert", "cpu", "cpu,init=rnd2rnd")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, tiny=False, cpu=False, init="bert2rnd", steps=0)
  c = config_lib.base_config()
  c.experiment = "multi30k_bert2rnd"
  c.model.init = arg.init
  c.model.decoder_overrides = {}  # EncoderConfig fields of the decoder, e.g. {'num_layers': 3}.
  c.tasks.multi30k = config_lib.task("seq2seq", default_data_config("multi30k"))
  c.tasks.multi30k.loss = dict(label_smoothing=0.1)
  c.tasks.multi30k.decode = dict(beam_sizes=(4, 1), alpha=0.6, max_length=64)
  c.train.update(
    steps=20000,
    batch_size=64,
    log_every=100,
    eval_every=5000,
    checkpoint_every=1000,
    best_metric="multi30k/bleu",
  )
  c.optim.update(lr=2e-4, warmup_fraction=0.04, weight_decay=0.01, schedule="linear")
  c.eval.batch_size = 64
  if arg.cpu:  # The 2-core CPU comparison of docs/results.md: a 2-layer decoder, small batches.
    c.model.decoder_overrides = {"num_layers": 2}
    c.train.update(steps=400, batch_size=16, log_every=25, eval_every=400, checkpoint_every=400)
    c.optim.update(lr=5e-4, warmup_fraction=0.05)
  if arg.smoke:
    c.model.decoder_overrides = {"num_layers": 1}
    c.tasks.multi30k.decode = dict(beam_sizes=(1,), alpha=0.6, max_length=12)
    c.train.update(steps=10, batch_size=8, log_every=5, eval_every=10, checkpoint_every=10)
    c.eval.batch_size = 16  # [B, T, 30522] eval logits: keep the smoke run's memory small.
    data = c.tasks.multi30k.data
    data.splits.eval = f"{data.splits.eval}[:64]"  # Decoding all 1,014 took minutes.
  if arg.tiny:
    config_lib.make_tiny(c, "multi30k", fixture="multi30k", steps=10)
    c.model.init = "rnd2rnd"
    c.model.decoder_overrides = {"num_layers": 1}
    c.tasks.multi30k.data.target_max_length = 32
    c.tasks.multi30k.decode = dict(beam_sizes=(2, 1), alpha=0.6, max_length=8)
  if arg.steps:
    c.train.update(steps=arg.steps, eval_every=arg.steps, checkpoint_every=arg.steps)
  if c.model.init != "rnd2rnd":  # A pretrained encoder trains at a tenth of the new parts' lr.
    c.optim.lr_multipliers = (("encoder/.*", ENCODER_LR_FACTOR),)
  return config_lib.lock(c)
