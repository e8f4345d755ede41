r"""Few-shot intent classification: MAML and friends from all-MiniLM-L6-v2 on BANKING77 / CLINC150.

  python -m research.main --config=configs/intent_fewshot_maml.py --workdir=runs/maml_b77_1shot
  python -m research.main --config=configs/intent_fewshot_maml.py:algorithm=anil,shot=5 \
      --workdir=runs/anil_b77_5shot
  python -m research.main --config=configs/intent_fewshot_maml.py:algorithm=finetune \
      --workdir=runs/finetune_b77_1shot          # baseline: no meta-training
  python -m research.main --config=configs/intent_fewshot_maml.py:inner=lora \
      --workdir=runs/maml_lora_b77_1shot      # second-order MAML, LoRA inner loop
  python -m research.main --config=configs/intent_fewshot_maml.py:algorithm=imaml \
      --workdir=runs/imaml_b77_1shot          # implicit gradients
  python -m research.main \
      --config=configs/intent_fewshot_maml.py:data=clinc150,test_data=banking77 \
      --workdir=runs/maml_c150_to_b77_1shot   # meta-train on CLINC150, meta-test on BANKING77
  python -m research.main --config=configs/intent_fewshot_maml.py:smoke --workdir=/tmp/maml_smoke
  python -m launch.local --config=configs/intent_fewshot_maml.py --sweep --workdir=runs
  python -m research.meta.report runs/intent_fewshot_maml   # the results table

5-way K-shot episodes (5 query examples per class) over ProtAugment's published meta-train /
meta-valid / meta-test class split ``01``; every run is scored on the same 600 meta-test episodes
(``meta.test_seed``), accuracy with a 95% confidence interval. The inner loop adapts the paths
of ``meta.inner`` (all for MAML/FOMAML/Reptile, ``heads/.*`` for ANIL); the outer optimizer is
the usual optax chain, so ``optim.freeze`` rules choose what is meta-learned.

Inner and outer sets: ``inner=lora|adapters|bitfit`` adds that ``model.peft`` method to the
encoder and makes its parameters plus the head the inner loop (``meta.inner``: the method's own
path rules, research.transfer.peft.trainable_rules); the outer loop then meta-learns the same set
(the LoRA initialisation and the head; the base weights stay frozen and get no meta-gradient),
or with ``outer=all`` every parameter (the encoder too). ``inner=head`` is the head only (ANIL's
set under any algorithm), ``inner=all`` (default) every parameter. Second order by default:
the meta-gradient differentiates through the LoRA inner loop; at base size add
``--config.meta.hvp=forward`` (forward HVPs store no activations per inner step: 2.1 GB instead
of 8.7 GB for a 110M encoder, docs/benchmarks.md).

iMAML (``algorithm=imaml``): the inner loop minimises the support loss plus
``meta.imaml.lam/2 |phi - theta|^2`` and the meta-gradient solves ``(I + H/lam) g = grad L_q``
by ``meta.imaml.cg_steps`` conjugate-gradient steps (memory independent of the inner steps).

Cross-data-set meta-transfer (``test_data=banking77|clinc150``, ``meta.test_data``): meta-train
(and meta-validate) on ``data``'s meta-train (meta-valid) classes, meta-test on the other data
set's meta-test classes, tokenized the same way. The test episodes depend only on the test data
set and ``meta.test_seed``, so ``data=clinc150,test_data=banking77`` is scored on the very
episodes of the in-domain BANKING77 runs; the report gives it its own column
(``clinc150→banking77 5-way 1-shot``).

Variants (comma-separated): ``algorithm=maml|fomaml|anil|imaml|reptile|protonet|finetune``,
``inner=all|lora|adapters|bitfit|head``, ``outer=inner|all``,
``shot=1|5``, ``data=banking77|clinc150``, ``test_data=banking77|clinc150`` (default: ``data``),
``head_init=proto|zeros|learned``, ``meta_sgd``, ``smoke`` (MiniLM, two meta-steps, 4 test
episodes), ``tiny`` (a 2-layer random encoder on the committed fixture of ``data`` (and of
``test_data``), 3-way 1-shot; 2-way when CLINC150 is used, its fixture having 2 classes per class
split; for tests).

Settings (sized for 2 CPU cores; see docs/results.md for the measured table): utterances
cut to 32 tokens, 4 episodes per meta-step, 3 inner SGD steps (lr 0.01) in meta-training and 5 at
meta-test, a Proto-MAML head (``head_init=proto``), outer Adam at 2e-5, and META_STEPS meta-steps
per algorithm (about equal meta-training time). Fine-tuning: 15 Adam steps at 5e-4 on every
parameter from a zero head. ProtoNet and fine-tuning do not meta-train.
"""

from research import config_lib
from research.data.registry import default_data_config
from research.models.config import PeftConfig
from research.transfer import peft

# Meta-training steps (4 episodes each) per algorithm: about the same wall time for each, as
# measured at 5-way 1-shot on 2 CPU cores (s/step: MAML 7.7, FOMAML 4.1, Reptile 7.8, ANIL 2.3).
META_STEPS = {"maml": 60, "fomaml": 100, "reptile": 60, "anil": 200, "imaml": 60}
INNER_SETS = ("all", "lora", "adapters", "bitfit", "head")

VARIANTS = (
  "",
  "smoke",
  "tiny",
  "algorithm=fomaml",
  "algorithm=anil,shot=5",
  "algorithm=reptile",
  "algorithm=protonet",
  "algorithm=finetune",
  "data=clinc150,meta_sgd",
  "data=clinc150,test_data=banking77",
  "tiny,algorithm=reptile",
  "inner=lora",
  "inner=lora,outer=all",
  "algorithm=imaml",
  "tiny,inner=lora",
  "tiny,algorithm=imaml",
  "tiny,test_data=clinc150",
)


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(
    arg,
    smoke=False,
    tiny=False,
    algorithm="maml",
    shot=1,
    data="banking77",
    test_data="",
    head_init="proto",
    meta_sgd=False,
    inner="all",
    outer="inner",
  )
  c = config_lib.base_config()
  c.experiment = "intent_fewshot_maml"
  c.program = "meta"
  c.model.dropout = 0.0  # Deterministic inner loops (and exact meta-gradients).
  data = default_data_config(arg.data)
  # 32 tokens keep 94% of BANKING77 and all but 1 of CLINC150's 22,500 utterances whole.
  data.update(max_length=32, buckets=(16, 24, 32))
  c.tasks[arg.data] = config_lib.task("classification", data, pooling="mean", dropout=0.0)
  c.meta.update(
    algorithm=arg.algorithm,
    k_shot=arg.shot,
    head_init=arg.head_init,
    meta_sgd=arg.meta_sgd,
    test_data=arg.test_data,
    inner_steps=3,
    eval_inner_steps=5,
    episodes_per_batch=4,
    valid_episodes=64,
  )
  # Equal meta-training compute per method (~460 s on 2 CPU cores at 1-shot), not equal steps.
  steps = META_STEPS.get(arg.algorithm, 0)
  c.train.update(steps=steps, log_every=10, eval_every=0, checkpoint_every=20)
  c.optim.update(name="adamw", lr=2e-5, schedule="constant", warmup_fraction=0.0, weight_decay=0.0)
  # finetune and protonet are baselines on the pretrained encoder: they skip meta-training
  # whatever train.steps says. Plain fine-tuning starts each episode from a zero head.
  c.meta.finetune.update(steps=15, lr=5e-4, head_init="zeros")
  set_inner_outer(c, arg.data, arg.inner, arg.outer)
  if arg.smoke:
    c.train.update(steps=2, log_every=1, eval_every=0, checkpoint_every=2, progress=False)
    c.meta.update(
      inner_steps=1,
      eval_inner_steps=1,
      q_query=2,
      episodes_per_batch=1,
      eval_episodes_per_batch=2,
      valid_episodes=0,
      test_episodes=4,
    )
    c.meta.finetune.steps = 2
    data.update(max_length=32, buckets=(32,))
  if arg.tiny:
    c.model.init = "scratch"
    c.model.encoder_overrides = config_lib.TINY_ENCODER
    data.update(config_lib.fixture_data(arg.data), max_length=32, buckets=(32,))
    if arg.test_data:
      c.meta.test_data_overrides = config_lib.fixture_data(arg.test_data)
    c.meta.update(
      # The CLINC150 fixture has 2 classes per class split (BANKING77's: 3).
      n_way=2 if "clinc150" in (arg.data, arg.test_data) else 3,
      k_shot=1,
      q_query=2,
      inner_steps=1,
      eval_inner_steps=2,
      episodes_per_batch=8,
      eval_episodes_per_batch=8,
      valid_episodes=8,
      test_episodes=16,
    )
    c.train.update(steps=4, log_every=2, eval_every=4, checkpoint_every=2, progress=False)
    c.meta.finetune.steps = 2
  return config_lib.lock(c)


def set_inner_outer(c, task: str, inner: str, outer: str) -> None:
  """``meta.inner``, ``model.peft`` and ``optim.trainable`` of the ``inner=``/``outer=`` variants.

  A PEFT inner set adapts exactly what that method trains in ordinary fine-tuning (its
  ``trainable_rules``: LoRA's ``lora_a``/``lora_b`` plus the head), and the optimizer's default
  rules for ``model.peft`` make the same set the outer one; ``outer=all`` meta-learns every
  parameter instead.
  """
  if inner not in INNER_SETS:
    raise ValueError(f"inner={inner!r}: expected one of {INNER_SETS}")
  if outer not in ("inner", "all"):
    raise ValueError(f"outer={outer!r}: expected 'inner' or 'all'")
  if inner in ("lora", "adapters", "bitfit"):
    c.model.peft.method = inner
    c.meta.inner = peft.trainable_rules(PeftConfig(method=inner), (task,))
  elif inner == "head":
    c.meta.inner = ("heads/.*",)
  if outer == "all" and inner != "all":
    c.optim.trainable = (".*",)


def get_sweep():
  """The experiment: 6 methods x 1/5-shot on BANKING77 (12 runs; add data for CLINC150).

  python -m launch.local --config=configs/intent_fewshot_maml.py --sweep --workdir=runs
  python -m launch.local --config=configs/intent_fewshot_maml.py:data=clinc150 --sweep ...
  python -m launch.local --config=configs/intent_fewshot_maml.py:data=clinc150,test_data=banking77 \
      --sweep ...   # cross-data-set: meta-test on the BANKING77 runs' episodes

  Each meta-learner keeps its own step budget (META_STEPS); the baselines do not meta-train.
  """
  return [
    {"meta.algorithm": a, "meta.k_shot": k, "train.steps": META_STEPS.get(a, 0)}
    for k in (1, 5)
    for a in ("maml", "fomaml", "anil", "reptile", "protonet", "finetune")
  ]
