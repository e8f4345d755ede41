r"""Multi-task: SST-2 sentiment and CoNLL-2003 NER on one all-MiniLM-L6-v2 encoder, two heads.

  python -m research.main --config=configs/multitask_sst2_conll.py --workdir=runs/mt_sst2_conll
  python -m research.main --config=configs/multitask_sst2_conll.py:smoke --workdir=/tmp/mt_smoke
  python -m research.main --config=configs/multitask_sst2_conll.py:sampling=round_robin \
      --workdir=runs/mt_rr --config.multitask.loss_weights.conll03=2.0

Each step trains one task's batch (see research/train/multitask.py). By default the 3500 steps
are shared 2000 : 1500 (``sampling=weights``): each task gets the steps of its single-task run
(configs/sst2_minilm.py, configs/conll03_minilm.py, whose heads and data it uses), so the
comparison is at the same budget per task and in total. ``sampling=temperature`` gives
p ~ n^(1/T), T=2 (SST-2 0.69, CoNLL 0.31; proportional to the 67k / 14k train sets would give
CoNLL only 17%). results.json holds both tasks' eval and ``task_steps``. Variants
(comma-separated): ``smoke`` (20 steps of 8 on 256-example eval slices), ``tiny`` (a 2-layer
random encoder on the committed fixtures, seconds; for tests),
``sampling=weights|proportional|temperature|round_robin``, ``init=scratch``. Reached (2-core
CPU, fp32): SST-2 dev 89.22% (single-task 89.56%), CoNLL-2003 dev entity F1 90.35 (90.56).
"""

from research import config_lib
from research.data.registry import default_data_config

VARIANTS = ("", "smoke", "tiny", "sampling=round_robin", "sampling=proportional,smoke")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, tiny=False, init="pretrained", sampling="weights")
  c = config_lib.base_config()
  c.experiment = "multitask_sst2_conll"
  c.model.init = arg.init
  c.tasks.sst2 = config_lib.task(
    "classification", default_data_config("sst2"), pooling="pooler", dropout=0.1
  )
  c.tasks.conll03 = config_lib.ner_task("conll2003")
  # Read by research.train.multitask.settings. Every task is named in the weight dicts, so
  # the locked config takes --config.multitask.loss_weights.conll03=2.0.
  c.multitask.update(
    sampling=arg.sampling,
    weights={"sst2": 2000.0, "conll03": 1500.0},  # The single-task runs' steps.
    loss_weights={"sst2": 1.0, "conll03": 1.0},
  )
  # The two single-task budgets (2000 + 1500 steps of 32) together.
  config_lib.finetune(c, steps=3500, best_metric="sst2/accuracy")
  c.eval.batch_size = 64
  if arg.smoke:
    config_lib.smoke(c, max_length=64, eval_examples=256)  # Not two full dev sets.
  if arg.tiny:
    config_lib.make_tiny(c, "sst2", fixture="sst2", steps=20)
    config_lib.make_tiny(c, "conll03", fixture="conll2003", steps=20)
  return config_lib.lock(c)
