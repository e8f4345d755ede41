"""Meta-learning on few-shot text episodes: MAML, FOMAML, ANIL, iMAML, Reptile, Meta-SGD,
baselines.

- :mod:`research.meta.inner`: the inner loop (``lax.scan`` of SGD over path-selected params;
  iMAML's proximal loop with its implicit, conjugate-gradient VJP).
- :mod:`research.meta.algorithms`: per-episode objectives and evaluations on a TaskModel.
- :mod:`research.meta.steps`: the jitted meta-step (``vmap`` over episodes) and eval step.
- :mod:`research.meta.trainer`: ``train_and_evaluate(config, workdir)`` (``trainer='meta'``).
- :mod:`research.meta.report`: the accuracy ± 95% CI table of a sweep.
"""
