"""No recompilation after warm-up: 50 further steps of a real training run compile nothing.

Compilations are counted with JAX's own monitoring event for every XLA backend compile
(``/jax/core/compile/backend_compile_duration``), which fires on every jit cache miss that
reaches XLA, whatever function caused it (the step, an eval step, an eager op in the loop).
"""

import contextlib

import jax
import pytest
from train_util import load_config_module, tiny_config

from research.train.trainer import train_and_evaluate

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
WARMUP, COUNTED = 12, 50


@contextlib.contextmanager
def compile_counter():
  """Yields a dict whose 'count' grows by one per backend compile while 'on' is true."""
  state = {"on": False, "count": 0, "events": []}

  def listener(event: str, duration: float, **kwargs) -> None:
    if event == COMPILE_EVENT and state["on"]:
      state["count"] += 1
      state["events"].append(kwargs)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield state
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def run_counting(config, workdir) -> dict:
  """Trains ``config``; counts compiles once the prefetcher asks for batch ``WARMUP``.

  The prefetcher runs two batches ahead, so counting starts after step WARMUP - 2 finished
  (past the first log, whose host-side work compiles a few small ops once).
  """
  steps = WARMUP + COUNTED
  config.train.update(steps=steps, log_every=5, eval_every=0, checkpoint_every=0)
  with compile_counter() as counter:

    def hook(step: int, batch: dict) -> dict:
      if step == WARMUP:
        counter["on"] = True
      return batch

    train_and_evaluate(config, str(workdir), batch_hook=hook)
  return counter


def test_no_compilation_after_warmup_tiny(tmp_path):
  config = tiny_config()
  # One bucket, so every batch has the same shape (each new bucket compiles once, by design).
  config.tasks.sst2.data.buckets = (config.tasks.sst2.data.max_length,)
  counter = run_counting(config, tmp_path)
  assert counter["count"] == 0, counter["events"]


@pytest.mark.slow
def test_no_compilation_after_warmup_smoke(tmp_path, minilm_dir, shared_data):
  config = load_config_module("sst2_minilm").get_config("smoke")
  config.tasks.sst2.data.buckets = (config.tasks.sst2.data.max_length,)
  counter = run_counting(config, tmp_path)
  assert counter["count"] == 0, counter["events"]
