"""Command-line entry point: parses flags and calls the trainer.

  python -m research.main --config=configs/sst2_minilm.py[:variant] --workdir=DIR \
      [--config.optim.lr=3e-5 ...]
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file[:variant].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumes when it holds a run).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  logging.set_verbosity(logging.WARNING)  # orbax and tfds are chatty at INFO.
  config = _CONFIG.value
  from research.train import parallel

  parallel.maybe_initialize_distributed(config.get("parallel"))
  from research.train.trainer import train_and_evaluate

  results = train_and_evaluate(config, _WORKDIR.value)
  for task, metrics in results["eval"].items():
    shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"{task}: {shown}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
