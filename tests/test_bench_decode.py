"""research.bench.decode: its batching, and its ``--tiny`` mode end to end in a subprocess.

The tiny run is the benchmark's correctness check as well as its output contract: both sides
decode the same random Marian (ours jitted, transformers' ``generate`` on our export) with the
same settings, so greedy outputs must be token-identical and, on this small model, beam-4 ones
too; a peer run with another beam count would give other hypotheses. Beam 4 must also differ
from greedy somewhere, or the beam mode would not be measuring a beam search.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from research.subprocess_env import child_env

ROOT = Path(__file__).resolve().parents[1]
KEYS = [
  "decode_beam4_vs_greedy_differ",
  "decode_differ_greedy",
  "decode_differ_beam4",
  "decode_compile_s_greedy",
  "decode_compile_s_beam4",
  "decode_speedup_vs_transformers_greedy_with_compile",
  "decode_speedup_vs_transformers_beam4_with_compile",
  "decode_speedup_vs_transformers_greedy",
  "decode_speedup_vs_transformers_beam4",
]


def test_batches_sorted_bucketed_and_the_peers_padded_to_the_longest():
  pytest.importorskip("torch")
  from research.bench import decode

  ids = [[7] * 3, [8] * 20, [9] * 1]
  batches = decode.make_batches(ids, batch=2, pad=0)
  assert [b.rows.tolist() for b in batches] == [[2, 0], [1]]
  assert [b.ids.shape for b in batches] == [(2, 16), (2, 24)]  # Multi30k buckets, full rows.
  assert [tuple(b.peer_ids.shape) for b in batches] == [(2, 3), (1, 20)]
  np.testing.assert_array_equal(batches[1].mask.sum(1), [20, 20])  # The filler row: row 0.
  assert decode.hypotheses(np.array([[5, 2, 0, 6], [5, 6, 5, 6]]), eos=2) == [(5, 2), (5, 6, 5, 6)]


def test_decode_bench_tiny_runs_both_sides_with_identical_greedy_outputs():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  cmd = [sys.executable, "-m", "research.bench.decode", "--tiny"]
  out = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  figures = dict(line.split("=", 1) for line in lines if re.fullmatch(r"decode_\w+=\S+", line))
  assert list(figures) == KEYS, lines[-12:]
  assert lines[-1].startswith("decode_speedup_vs_transformers_beam4=")
  for key in KEYS[3:]:
    assert float(figures[key]) > 0, (key, figures[key])
  assert int(figures["decode_differ_greedy"]) == 0, out.stdout
  assert int(figures["decode_differ_beam4"]) == 0, out.stdout  # Same num_beams on both sides.
  assert int(figures["decode_beam4_vs_greedy_differ"]) > 0, out.stdout
  assert "random weights (seed 0)" in out.stdout
  assert "40 (fixture)" in out.stdout
