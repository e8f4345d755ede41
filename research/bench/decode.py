"""Benchmark: decoding Multi30k val (en->de), greedy and beam 4, ours vs transformers' generate.

  python -m research.bench.decode                          # 1,014 val sentences, random Marian
  python -m research.bench.decode --batch=64 --max_new_tokens=32 --rounds=5
  python -m research.bench.decode --limit=64 --rounds=1 --torch_threads=1   # a quick look
  python -m research.bench.decode --workdir=runs/m30k_marian   # a trained Marian run's weights
  python -m research.bench.decode --tiny                   # seconds (tests/test_bench_decode.py)

Both sides decode the same model with the same settings. Ours is the jitted generation of
research.models.encoder_decoder.core (``make_generate``: one ``while_loop`` over the key/value
cache, static shapes), compiled once per source bucket before timing; its compile time is
printed apart and enters only the ``..._with_compile=`` figures. The peer is transformers'
``generate`` in PyTorch (CPU) on the ``MarianMTModel`` that transformers loads from our weights
as research.transfer.hf ``save_pretrained`` exports them (default attention, fp32), given the
settings of the same :class:`~research.models.encoder_decoder.core.GenerationConfig`
(``num_beams``, ``length_penalty``, ``early_stopping``, ``max_new_tokens``, ``min_length=0``,
Marian's forced EOS at the last step) and no repetition penalty or banned words.

The model is shaped like configs/multi30k_transformer.py (3 + 3 layers of width 256, 4 heads,
feed-forward 1024) as a Marian at random weights from ``--seed``, over a byte-level BPE of
8,000 trained on the training split's English and German (research.data.subword, the recipe of
that config's joint vocabulary). With ``--workdir`` a trained run's weights and source
tokenizer are used instead (a run of a pretrained encoder-decoder family, e.g.
configs/multi30k_marian.py). Sources are tokenized once, sorted by length and cut into batches
of ``--batch``; ours pads each batch to its Multi30k bucket (16 ... 64 tokens) and its rows to
``--batch`` (static shapes), the peer pads each batch to its longest source, as a user would.
(The trainer's evaluation, research.tasks.seq2seq, keeps data order and pads every batch to the
largest bucket: one compile, more padding. Sorting helps both sides here alike.)

Rounds alternate ours and the peer in one process, per mode (research/bench/timing.py); the
figures are medians of whole passes over the set. Printed per mode: seconds, sentences/s, the
ratio, and how many sentences' token ids differ between the sides (greedy: must be 0; beam: near
ties may flip) and the mean hypothesis length: random weights rarely emit EOS, so most
hypotheses run to ``max_new_tokens`` (EOS is forced there). ``--torch_threads`` sets the peer's
threads (default torch's, one per core; ``--tiny`` uses 1: two threads that wait for each other
at every op make tiny steps ~75x slower on a busy 2-core machine). The ``key=value`` lines
at the end: ``decode_beam4_vs_greedy_differ=``, ``decode_differ_<mode>=``,
``decode_compile_s_<mode>=``, ``decode_speedup_vs_transformers_<mode>_with_compile=`` (peer
median / (ours median + ours' compile)) and last ``decode_speedup_vs_transformers_<mode>=``
(peer median / ours median), greedy then beam.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from research.bench import timing
from research.data import batching, locations, registry
from research.models import families
from research.models.encoder_decoder import core, marian

REPO = Path(__file__).resolve().parents[2]
BUCKETS = tuple(registry.DATASETS["multi30k"]["buckets"])  # 16 ... 64, as the eval pads.
MAX_SOURCE = int(registry.DATASETS["multi30k"]["max_length"])
EARLY = {"false": False, "true": True, "never": "never"}
# The shape of configs/multi30k_transformer.py's model (WIDTH, VOCAB there) as a Marian.
BASELINE = dict(
  hidden_size=256,
  encoder_layers=3,
  decoder_layers=3,
  encoder_heads=4,
  decoder_heads=4,
  encoder_ffn_size=1024,
  decoder_ffn_size=1024,
)
VOCAB_SIZE, TINY_VOCAB_SIZE = 8000, 300
TINY_SENTENCES = 40


@dataclasses.dataclass
class Batch:
  """One batch of sources as each side gets it: ``rows`` index the sentences."""

  rows: np.ndarray
  ids: jax.Array  # Ours: [--batch, bucket].
  mask: jax.Array
  peer_ids: Any  # The peer: torch [len(rows), longest source].
  peer_mask: Any


def data_dir(tiny: bool) -> Path:
  """Multi30k's folder: the committed fixture for ``tiny``, else ``data/multi30k`` (or the shared
  copy beside the checkout)."""
  if tiny:
    return REPO / "tests" / "fixtures" / "data" / "multi30k"
  for folder in (locations.data_root() / "multi30k", REPO.parent / "shared/data/multi30k"):
    if (folder / "val.en.gz").exists():
      return folder
  sys.exit(f"error: Multi30k not found at {locations.data_root() / 'multi30k'} (docs/data.md)")


def read(path: Path) -> list[str]:
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return [line.strip() for line in f]


def sources(args: argparse.Namespace) -> list[str]:
  """The val sentences; ``--tiny``: 40 sources made of the fixture's 11 English sentences, the
  second 20 each said twice (so that the batches fall in several buckets)."""
  folder = data_dir(args.tiny)
  if args.tiny:
    lines = read(folder / "train.en.gz") + read(folder / "val.en.gz")
    half = TINY_SENTENCES // 2
    texts = [" ".join([lines[i % len(lines)]] * (1 + i // half)) for i in range(TINY_SENTENCES)]
  else:
    texts = read(folder / "val.en.gz")
  return texts[: args.limit] if args.limit else texts


def random_model(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
  """``(config, params, source tokenizer, description)``: a random Marian of the baseline's shape
  (``--tiny``: 2 + 2 layers of width 32) on a BPE trained on the training split."""
  from research.data import subword

  folder = data_dir(args.tiny)
  train = read(folder / "train.en.gz") + read(folder / "train.de.gz")
  size = TINY_VOCAB_SIZE if args.tiny else VOCAB_SIZE
  tokenizer = subword.from_json(subword.train_bpe(train, size, min_frequency=2))
  special = dict(
    vocab_size=len(tokenizer),
    pad_token_id=tokenizer.pad_token_id,
    decoder_start_token_id=tokenizer.pad_token_id,  # Marian starts decoding from pad.
    eos_token_id=tokenizer.eos_token_id,
    forced_eos_token_id=tokenizer.eos_token_id,
    max_position_embeddings=max(128, args.max_new_tokens + 1),
  )
  if args.tiny:
    cfg = marian.MarianConfig.tiny(**special)
  else:
    cfg = marian.MarianConfig(**BASELINE, **special)
  module = marian.FAMILY.seq2seq(cfg)
  init = jax.jit(lambda key: module.init(key, jnp.zeros((1, 4), jnp.int32))["params"])
  params = init(jax.random.key(args.seed))
  what = (
    f"random weights (seed {args.seed}); tokenizer: byte-level BPE of {len(tokenizer)} trained on "
    f"{folder}/train.{{en,de}} (research.data.subword, as configs/multi30k_transformer.py)"
  )
  return cfg, params, tokenizer, what


def run_model(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
  """``(config, params, source tokenizer, description)`` of the trained run in ``--workdir``.

  Raises:
    SystemExit: not a seq2seq run of a pretrained encoder-decoder family (a BERT-like
      EncoderDecoder, ``model.init=rnd2rnd``, has no transformers export to compare with).
  """
  import ml_collections

  from research.tasks.seq2seq_text import as_tokenizers
  from research.train import checkpoints, state, trainer

  workdir = Path(args.workdir)
  if not (workdir / "config.json").is_file():
    sys.exit(f"error: --workdir={workdir}: no config.json (not a run directory)")
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  task = next(iter(config.tasks))
  if config.tasks[task].kind != "seq2seq":
    sys.exit(f"error: {workdir}: task {task!r} is {config.tasks[task].kind}, not seq2seq")
  cfg = state.encoder_config(config.model)
  if families.family_of(cfg).seq2seq is None:
    sys.exit(
      f"error: {workdir} trains an EncoderDecoder of {type(cfg).__name__}s, which has no "
      "transformers export; use a run of a pretrained encoder-decoder family "
      "(configs/multi30k_marian.py), or no --workdir for a random Marian of the baseline's shape"
    )
  params, where = checkpoints.load_params(workdir, prefer="best")
  tokenizer = as_tokenizers(trainer.tokenizer_of(config, task, workdir, build=False)).source
  return cfg, params, tokenizer, f"trained weights: {where}; tokenizer: the run's source side"


def make_batches(ids: list[list[int]], batch: int, pad: int) -> list[Batch]:
  """Sources sorted by length (stable), in batches of ``batch``: ours padded to the bucket and
  to ``batch`` rows (copies of the first, dropped from the outputs), the peer's to the longest."""
  import torch

  order = np.argsort([len(x) for x in ids], kind="stable")
  out = []
  for start in range(0, len(order), batch):
    rows = order[start : start + batch]
    longest = max(len(ids[r]) for r in rows)
    width = batching.bucket_of(longest, BUCKETS)
    arr = np.full((batch, width), pad, np.int32)
    mask = np.zeros((batch, width), np.int32)
    for i in range(batch):
      row = ids[rows[i] if i < len(rows) else rows[0]]
      arr[i, : len(row)], mask[i, : len(row)] = row, 1
    out.append(
      Batch(
        rows=rows,
        ids=jnp.asarray(arr),
        mask=jnp.asarray(mask),
        peer_ids=torch.from_numpy(arr[: len(rows), :longest]).long(),
        peer_mask=torch.from_numpy(mask[: len(rows), :longest]).long(),
      )
    )
  return out


def hypotheses(tokens: np.ndarray, eos: int) -> list[tuple[int, ...]]:
  """Each row's ids up to and including its first EOS (all of them without one): what both
  sides mean by the hypothesis (after it, ours pads and transformers may not)."""
  out = []
  for row in tokens.tolist():
    out.append(tuple(row[: row.index(eos) + 1] if eos in row else row))
  return out


class Ours:
  """``core.make_generate`` compiled (ahead of time) once per batch shape."""

  def __init__(self, cfg: Any, params: Any, gen: core.GenerationConfig, batches: list[Batch]):
    self.params, self.batches = params, batches
    generate = core.make_generate(families.family_of(cfg).seq2seq(cfg), gen)
    self.compiled: dict[tuple[int, ...], Any] = {}
    start = time.perf_counter()
    for b in batches:
      if b.ids.shape not in self.compiled:
        self.compiled[b.ids.shape] = generate.lower(params, b.ids, b.mask).compile()
    self.compile_s = time.perf_counter() - start

  def decode(self) -> list[np.ndarray]:
    """Every batch's tokens ``[rows, max_new_tokens]`` on the host (dispatched, then fetched)."""
    outs = [self.compiled[b.ids.shape](self.params, b.ids, b.mask)["tokens"] for b in self.batches]
    return [np.asarray(o)[: len(b.rows)] for o, b in zip(outs, self.batches)]

  def run(self) -> float:
    start = time.perf_counter()
    self.decode()
    return time.perf_counter() - start


class Peer:
  """transformers' ``generate`` on the exported model, with the settings of ``gen``."""

  def __init__(self, model: Any, gen: core.GenerationConfig, batches: list[Batch]):
    self.model, self.batches, self.start = model, batches, gen.decoder_start_token_id
    # Every field of GenerationConfig is a generate() argument of the same meaning; None values
    # are passed too, so nothing comes from the checkpoint's own generation config.
    self.kwargs = dict(
      dataclasses.asdict(gen),
      do_sample=False,
      repetition_penalty=1.0,
      no_repeat_ngram_size=0,
      bad_words_ids=None,
    )

  def decode(self) -> list[np.ndarray]:
    """Every batch's tokens without the decoder start token."""
    outs = []
    for b in self.batches:
      seqs = self.model.generate(input_ids=b.peer_ids, attention_mask=b.peer_mask, **self.kwargs)
      if not bool((seqs[:, 0] == self.start).all()):
        raise RuntimeError("transformers' generate did not start from decoder_start_token_id")
      outs.append(seqs[:, 1:].numpy())
    return outs

  def run(self) -> float:
    start = time.perf_counter()
    self.decode()
    return time.perf_counter() - start


def export_peer(cfg: Any, params: Any, directory: Path) -> Any:
  """The transformers model of our weights, exported by ``hf.save_pretrained`` (fp32, eval).

  Raises:
    RuntimeError: transformers reports a missing or unexpected weight.
  """
  import torch
  import transformers

  from research.transfer import hf

  hf.save_pretrained(directory, cfg, jax.device_get(params))
  transformers.utils.logging.disable_progress_bar()
  model, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(
    str(directory), dtype=torch.float32, output_loading_info=True
  )
  if info["missing_keys"] or info["unexpected_keys"]:
    raise RuntimeError(f"export not loaded cleanly by transformers: {info}")
  return model.eval()


def in_order(outs: list[np.ndarray], batches: list[Batch], n: int, eos: int) -> list[tuple]:
  """The hypotheses of all batches back in sentence order."""
  hyps: list[tuple] = [()] * n
  for out, b in zip(outs, batches):
    for r, h in zip(b.rows, hypotheses(out, eos)):
      hyps[r] = h
  return hyps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, help="sentences per batch (default 32; --tiny: 8)")
  p.add_argument("--max_new_tokens", type=int, help="most generated tokens (64; --tiny: 16)")
  p.add_argument("--num_beams", type=int, default=4, help="the beam mode's beams")
  p.add_argument("--length_penalty", type=float, default=1.0, help="beam scores / length**this")
  p.add_argument("--early_stopping", choices=sorted(EARLY), default="false")
  p.add_argument("--rounds", type=int, help="alternating rounds (medians; default 3, --tiny 2)")
  p.add_argument("--limit", type=int, default=0, help="only the first N sentences (0: all)")
  p.add_argument("--seed", type=int, default=0, help="random weights' seed")
  p.add_argument(
    "--torch_threads",
    type=int,
    help="the peer's intra-op threads (default: torch's own, the cores; --tiny: 1)",
  )
  p.add_argument("--workdir", help="a trained seq2seq run of a pretrained encoder-decoder family")
  p.add_argument("--tiny", action="store_true", help="2-layer width-32 model, 40 fixture sources")
  args = p.parse_args(argv)
  if args.num_beams < 2:
    p.error("--num_beams: the beam mode needs at least 2 (greedy is always run)")
  args.batch = args.batch or (8 if args.tiny else 32)
  args.max_new_tokens = args.max_new_tokens or (16 if args.tiny else 64)
  args.rounds = args.rounds or (2 if args.tiny else 3)
  if args.torch_threads is None and args.tiny:
    # On a busy machine two OpenMP threads wait for each other at every op (tiny steps: ~75x
    # slower than one thread at load 3 on 2 cores); the smoke mode's test must not hang on that.
    args.torch_threads = 1
  return args


def measure(args: argparse.Namespace, texts: list[str]) -> dict[str, Any]:
  """Builds both sides and times them, mode by mode; the figures and what they ran on."""
  cfg, params, tokenizer, what = run_model(args) if args.workdir else random_model(args)
  params = jax.device_put(params)
  ids = tokenizer(texts, truncation=True, max_length=MAX_SOURCE)["input_ids"]
  batches = make_batches(ids, args.batch, cfg.pad_token_id)
  modes = {"greedy": 1, f"beam{args.num_beams}": args.num_beams}
  results: dict[str, dict[str, Any]] = {}
  with tempfile.TemporaryDirectory(prefix="decode_bench_") as tmp:
    peer_model = export_peer(cfg, params, Path(tmp))
    for mode, beams in modes.items():
      gen = core.GenerationConfig.for_model(
        cfg,
        max_new_tokens=args.max_new_tokens,
        num_beams=beams,
        length_penalty=args.length_penalty,
        early_stopping=EARLY[args.early_stopping],
        min_length=0,
      )
      ours, peer = Ours(cfg, params, gen, batches), Peer(peer_model, gen, batches)
      # The first pass of each side (untimed) gives the outputs compared and warms both up.
      mine = in_order(ours.decode(), batches, len(texts), gen.eos_token_id)
      theirs = in_order(peer.decode(), batches, len(texts), gen.eos_token_id)
      times = timing.alternate({"ours": ours.run, "peer": peer.run}, args.rounds)
      results[mode] = dict(
        gen=gen,
        times=times,
        compile_s=ours.compile_s,
        shapes=sorted(ours.compiled),
        hyps=mine,
        differ=sum(a != b for a, b in zip(mine, theirs)),
      )
  return dict(
    cfg=cfg,
    what=what,
    lengths=[len(x) for x in ids],
    batches=len(batches),
    attention=peer_model.config._attn_implementation,
    modes=results,
  )


def report(args: argparse.Namespace, n: int, run: dict[str, Any], machine: str) -> None:
  """The table, then the ``key=value`` lines (the speedups last, beam last of all)."""
  import torch

  cfg, results, lengths = run["cfg"], run["modes"], run["lengths"]
  beam = f"beam{args.num_beams}"
  print(machine)
  print(f"torch threads: {torch.get_num_threads()}, peer attention: {run['attention']}")
  print(
    f"model: {type(cfg).__name__} {cfg.encoder_layers}+{cfg.decoder_layers} layers, width "
    f"{cfg.hidden_size}, {cfg.encoder_heads} heads, FFN {cfg.encoder_ffn_size}, vocabulary "
    f"{cfg.vocab_size}, fp32; {run['what']}"
  )
  print(
    f"sources: {n} ({'fixture' if args.tiny else 'Multi30k val'}), {statistics.mean(lengths):.1f} "
    f"tokens on average (max {max(lengths)}), {run['batches']} batches of {args.batch} sorted by "
    f"length; ours' shapes {results['greedy']['shapes']}"
  )
  gen = results[beam]["gen"]
  print(
    f"settings (both sides): max_new_tokens={gen.max_new_tokens}, min_length=0, "
    f"length_penalty={gen.length_penalty}, early_stopping={gen.early_stopping}, "
    f"decoder_start={gen.decoder_start_token_id}, eos={gen.eos_token_id}, "
    f"forced_bos={gen.forced_bos_token_id}, forced_eos={gen.forced_eos_token_id}, "
    "no repetition penalty, no banned words; greedy: num_beams=1, "
    f"{beam}: num_beams={args.num_beams}"
  )
  print(f"{args.rounds} rounds per mode, ours and the peer alternating; medians of whole passes")
  header = f"{'mode':8} {'ours s':>8} {'peer s':>8} {'ours sent/s':>11} {'peer sent/s':>11}"
  print(header + f" {'peer/ours':>9} {'compile s':>9} {'differ':>6} {'mean len':>8}")
  for mode, r in results.items():
    med = timing.medians(r["times"])
    mean_len = statistics.mean(len(h) for h in r["hyps"])
    print(
      f"{mode:8} {med['ours']:8.2f} {med['peer']:8.2f} {n / med['ours']:11.1f} "
      f"{n / med['peer']:11.1f} {med['peer'] / med['ours']:9.2f} {r['compile_s']:9.2f} "
      f"{r['differ']:6d} {mean_len:8.1f}"
    )
    for side in ("ours", "peer"):
      print(f"  per-round s, {mode} {side}: " + " ".join(f"{t:.2f}" for t in r["times"][side]))
  ended = sum(len(h) < args.max_new_tokens for h in results["greedy"]["hyps"])
  print(f"greedy hypotheses ending before max_new_tokens: {ended}/{n}")
  vs = sum(a != b for a, b in zip(results["greedy"]["hyps"], results[beam]["hyps"]))
  print(f"decode_{beam}_vs_greedy_differ={vs}")
  for mode, r in results.items():
    print(f"decode_differ_{mode}={r['differ']}")
  for mode, r in results.items():
    print(f"decode_compile_s_{mode}={r['compile_s']:.2f}")
  for mode, r in results.items():
    med = timing.medians(r["times"])
    ratio = med["peer"] / (med["ours"] + r["compile_s"])
    print(f"decode_speedup_vs_transformers_{mode}_with_compile={ratio:.3f}")
  for mode, r in results.items():
    print(f"decode_speedup_vs_transformers_{mode}={timing.ratio(r['times'], 'peer', 'ours'):.3f}")


def main(argv: list[str] | None = None) -> int:
  import torch

  args = parse_args(argv)
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  load_before = timing.load()
  # A cold compile, whatever JAX_COMPILATION_CACHE_DIR says: the figure is what it costs first.
  jax.config.update("jax_enable_compilation_cache", False)
  texts = sources(args)
  run = measure(args, texts)
  report(args, len(texts), run, timing.machine_line(load_before))
  return 0


if __name__ == "__main__":
  sys.exit(main())
