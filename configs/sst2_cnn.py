r"""SST-2 with a CNN (Kim, 2014) whose word vectors are grafted from all-MiniLM-L6-v2.

  python -m research.main --config=configs/sst2_cnn.py --workdir=runs/sst2_cnn
  python -m research.main --config=configs/sst2_cnn.py:init=scratch --workdir=runs/sst2_cnn_rand
  python -m research.main --config=configs/sst2_cnn.py:smoke --workdir=/tmp/sst2_cnn_smoke

Word-vector transfer without a Transformer: the CNN family (research.models.cnn: convolutions of
widths 3, 4, 5 with 100 filters each, ReLU, masked max over time, dropout 0.5 in the head)
reads MiniLM's tokenizer, and its 30522 x 384 embedding table is grafted from MiniLM's input
word embeddings by the family's default graft rule (``model.graft_rules`` left empty):
``encoder/word_embeddings/embedding <- encoder/embeddings/word_embeddings/embedding``. The rest
of MiniLM is reported unused. ``init=scratch`` starts the table at random instead, uniform with
the variance of MiniLM's table (std 0.0556 -> U[-0.096, 0.096], as Kim matched word2vec's), at
the same steps and seed. Variants (comma-separated): ``smoke`` (20 steps of 8), ``tiny`` (the
fixture data, 4 filters per width, 10 steps; still grafted; for tests), ``static`` (Kim's
CNN-static: the grafted table frozen), ``init=scratch``.
Reached (2-core CPU, fp32, 1000 steps x 32, seed 0; about 6.5 minutes each): SST-2 dev
accuracy 83.94% with the grafted table, 81.65% with ``init=scratch`` (docs/results.md,
"Word-vector transfer: a CNN on SST-2").
"""

from research import config_lib
from research.data.registry import default_data_config

VARIANTS = ("", "smoke", "tiny", "init=scratch", "smoke,init=scratch", "tiny,static")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, tiny=False, static=False, init="pretrained")
  c = config_lib.base_config()
  c.experiment = "sst2_cnn"
  c.model.family = "cnn"  # The architecture; model.checkpoint (MiniLM) gives tokenizer and table.
  c.model.init = arg.init
  c.model.graft_rules = ()  # The CNN family's default rule: MiniLM's word vectors.
  c.model.encoder_overrides = dict(widths=(3, 4, 5), filters=100, embedding_init_scale=0.096)
  c.tasks.sst2 = config_lib.task(
    "classification", default_data_config("sst2"), pooling="pooler", dropout=0.5
  )
  config_lib.finetune(c, steps=1000, best_metric="sst2/accuracy")
  c.optim.update(lr=1e-3, warmup_fraction=0.0, weight_decay=0.0)
  if arg.static:
    c.optim.freeze = ("encoder/word_embeddings/.*",)
  if arg.smoke:
    config_lib.smoke(c, max_length=64, eval_examples=256)
  if arg.tiny:
    config_lib.make_tiny(c, "sst2", fixture="sst2", steps=10)
    c.model.init = arg.init  # Tiny still grafts: the test checks the table arrives bitwise.
    c.model.encoder_overrides = dict(widths=(2, 3), filters=4, embedding_init_scale=0.096)
    c.train.checkpoint_every = 10
  return config_lib.lock(c)
