"""``python -m research.data.download`` against an offline ``file://`` mirror, and where data goes.

The mirror is built from the committed fixtures, laid out at the real registry's URL paths
(``<owner>/<repo>/<commit>/<path>``), so the real code path runs: URL open, transform, checksum,
atomic rename, skip-when-present, and a mismatch that leaves nothing behind. The fixtures are
not the published files, so the registry used there keeps the real URLs, destinations and
transforms and takes its digests from the fixtures; the real registry itself is run once, as a
subprocess, to see it refuse them. Also: the no-data error names the command, and the ``tiny``
variants' prepared fixtures follow ``$RESEARCH_TFDS_DIR``.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from train_util import REPO, load_config_module

from research import config_lib
from research.data import download, locations, registry, sources
from research.data.builders import BUILDERS
from research.subprocess_env import child_env

FIXTURES = REPO / "tests" / "fixtures" / "data"
COMMAND = (sys.executable, "-m", "research.data.download")
SETS = ("sst2", "conll2003", "multi30k", "mrpc", "sentiment_labelled_sentences")


def sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def url_path(url: str) -> str:
  assert url.startswith(download.RAW), url
  return url[len(download.RAW) :]


def mrpc_inputs() -> tuple[bytes, bytes]:
  """GLUE's inputs whose rebuild is the MRPC train fixture: ``msr_paraphrase_train.txt`` with a
  BOM, CRLF ends and the dev pairs interleaved, and the dev pairs' ``dev_ids.tsv``."""
  train = (FIXTURES / "mrpc" / "train.tsv").read_text().splitlines()
  dev = (FIXTURES / "mrpc" / "dev.tsv").read_text().splitlines()[1:]
  rows = [train[0]]
  for i, row in enumerate(train[1:]):
    rows += [row, dev[i]] if i < len(dev) else [row]
  ids = ["\t".join(row.split("\t")[1:3]) for row in dev]
  return ("\ufeff" + "\r\n".join(rows) + "\r\n").encode(), "\r\n".join(ids).encode()


def fixture_sources(mirror: Path) -> dict[str, download.Source]:
  """The real entries of :data:`SETS` whose file has a fixture, served by ``mirror``, with the
  fixtures' digests. Transformed files get inputs that the real transform turns into the
  fixture: MRPC's dev with a BOM and CRLF, its train as GLUE's inputs."""
  out = {}
  for name in SETS:
    files = []
    for f in download.SOURCES[name].files:
      fixture = FIXTURES / f.dest
      if not fixture.is_file():
        continue  # e.g. sst2/test.tsv: no fixture.
      want = fixture.read_bytes()
      if f.transform is download.strip_bom_crlf:
        inputs = [b"\xef\xbb\xbf" + want.replace(b"\n", b"\r\n")]
      elif f.transform is download.glue_mrpc_train:
        inputs = list(mrpc_inputs())
      else:
        assert f.transform is None, f
        inputs = [want]
      urls = (f.url,) if isinstance(f.url, str) else f.url
      for url, data in zip(urls, inputs, strict=True):
        (mirror / url_path(url)).parent.mkdir(parents=True, exist_ok=True)
        (mirror / url_path(url)).write_bytes(data)
      files.append(f._replace(sha256=sha(want)))
    out[name] = download.Source(tuple(files), download.SOURCES[name].tfds)
  return out


def listing(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_download_registry_has_every_builder_file_with_the_builders_digest():
  dests = {f.dest: f.sha256 for s in download.SOURCES.values() for f in s.files}
  checked = 0
  for name, fields in registry.DATASETS.items():
    if fields.get("source", "local") != "local":
      continue
    folder = fields["manual_dir"]
    assert folder in download.SOURCES, f"{name}: no download entry for data/{folder}"
    builder, _, config = fields["tfds_name"].partition("/")
    for file, digest in BUILDERS[builder].builder_configs[config].sha256.items():
      assert dests.get(f"{folder}/{file}") == digest, f"{folder}/{file}"
      checked += 1
  assert checked >= 20
  assert all(
    u.startswith(download.RAW)
    for s in download.SOURCES.values()
    for f in s.files
    for u in ((f.url,) if isinstance(f.url, str) else f.url)
  )


def test_download_from_a_file_mirror_checks_renames_and_skips(tmp_path, capfd):
  mirror, dest = tmp_path / "mirror", tmp_path / "data"
  table = fixture_sources(mirror)
  argv = [*SETS, "--dest", str(dest), "--mirror", mirror.as_uri()]
  assert download.main(argv, sources=table) == 0
  err = capfd.readouterr().err.splitlines()
  wanted = {f.dest: (FIXTURES / f.dest).read_bytes() for s in table.values() for f in s.files}
  assert listing(dest) == wanted  # Renamed (conll2003 dev.txt), transformed (mrpc), no tmp files.
  assert "conll2003/valid.txt" in wanted and "mrpc/train.tsv" in wanted
  assert len([x for x in err if x.startswith("[") and "fetched, sha256 ok" in x]) == len(wanted)
  # Present with the right digest: nothing is fetched (the mirror is gone) or rewritten.
  stamps = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
  for p in sorted(mirror.rglob("*"), reverse=True):
    p.unlink() if p.is_file() else p.rmdir()
  assert download.main(argv, sources=table) == 0
  assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == stamps
  assert f"0 file(s) fetched, {len(wanted)} already present" in capfd.readouterr().err


def test_download_checksum_mismatch_is_one_line_and_writes_nothing(tmp_path, capfd):
  mirror, dest = tmp_path / "mirror", tmp_path / "data"
  table = fixture_sources(mirror)
  bad = next(f for f in table["sst2"].files if f.dest == "sst2/dev.tsv")
  served = mirror / url_path(bad.url)
  served.write_bytes(served.read_bytes() + b"tampered\t1\n")
  argv = ["sst2", "--dest", str(dest), "--mirror", mirror.as_uri()]
  assert download.main(argv, sources=table) == 1
  err = capfd.readouterr().err.strip().splitlines()
  assert err[-1] == (
    f"error: {served.as_uri()}: sha256 {sha(served.read_bytes())} does not match the expected "
    f"{bad.sha256} (for sst2/dev.tsv); nothing written"
  )
  assert sorted(listing(dest)) == ["sst2/train.tsv"]  # Fetched before; dev.tsv never appeared.
  # A damaged copy already there is replaced only by a download that checks out.
  (dest / "sst2" / "dev.tsv").write_bytes(b"damaged")
  assert download.main(argv, sources=table) == 1
  assert (dest / "sst2" / "dev.tsv").read_bytes() == b"damaged"
  assert sorted(p.name for p in (dest / "sst2").iterdir()) == ["dev.tsv", "train.tsv"]


def test_download_cli_refuses_files_that_are_not_the_published_copy(tmp_path):
  """The real registry through ``python -m``: the fixtures are not the published SST-2."""
  mirror, dest = tmp_path / "mirror", tmp_path / "data"
  fixture_sources(mirror)
  out = subprocess.run(
    [*COMMAND, "sst2", "--dest", str(dest), "--mirror", mirror.as_uri() + "/"],
    cwd=REPO,
    env=child_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 1, out.stderr
  (line,) = out.stderr.strip().splitlines()
  first = next(f for f in download.SOURCES["sst2"].files)
  served = (mirror / url_path(first.url)).read_bytes()
  assert line == (
    f"error: {(mirror / url_path(first.url)).as_uri()}: sha256 {sha(served)} does not match "
    f"the expected {first.sha256} (for {first.dest}); nothing written"
  )
  assert not dest.exists() or listing(dest) == {}


def test_download_cli_usage_errors_exit_2(capfd):
  with pytest.raises(SystemExit) as stop:
    download.main(["imagenet"])
  assert stop.value.code == 2
  assert "invalid choice: 'imagenet'" in capfd.readouterr().err


@pytest.mark.parametrize(
  "name, folder", [("sst2", "sst2"), ("sentiment_yelp", "sentiment_labelled_sentences")]
)
def test_missing_data_error_prints_the_download_command(name, folder, tmp_path, monkeypatch):
  monkeypatch.setenv(locations.DATA_ENV, str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError) as missing:
    sources.get_builder(registry.default_data_config(name))
  assert str(missing.value).endswith(f"; fetch it with: python -m research.data.download {folder}")
  # A folder that is not under the data root: the command says where to put it.
  (tmp_path / "elsewhere").mkdir()
  other = registry.default_data_config(name, manual_dir=str(tmp_path / "elsewhere" / folder))
  with pytest.raises(FileNotFoundError, match=rf"download {folder} --dest {tmp_path}/elsewhere$"):
    sources.get_builder(other)


def test_tiny_fixture_data_follows_the_tfds_dir_variable(tmp_path, monkeypatch):
  monkeypatch.delenv(locations.TFDS_ENV, raising=False)
  assert config_lib.fixture_data("sst2")["data_dir"] == str(REPO / ".tfds" / "fixtures")
  monkeypatch.setenv(locations.TFDS_ENV, str(tmp_path / "tfds"))
  assert config_lib.fixture_data("sst2")["data_dir"] == str(tmp_path / "tfds" / "fixtures")
  data_cfg = load_config_module("sst2_minilm").get_config("tiny").tasks.sst2.data
  assert data_cfg.data_dir == str(tmp_path / "tfds" / "fixtures")
  builder = sources.get_builder(data_cfg)  # Prepared there, not under the checkout.
  assert Path(builder.data_dir).is_relative_to(tmp_path / "tfds" / "fixtures")
  assert sources.is_prepared(builder)
