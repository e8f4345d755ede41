"""Fetches the public data sets into the data directory, each file checked against its sha256.

    python -m research.data.download sst2 conll2003 multi30k    # into $RESEARCH_DATA_DIR or ./data
    python -m research.data.download all --dest /data/nlp
    python -m research.data.download sst2 --mirror file:///srv/mirror/   # an offline copy

Why GitHub snapshots: the copies this project was developed on (``../shared/data``, each
folder's README.md names them) come from public repositories, and a raw URL pinned to a commit
never changes, so the published sha256 (the one our builders check too) stays valid; the
original hosts of several sets have moved or sit behind forms. Where the project's copy differs
from the snapshot (a renamed file, a stripped byte-order mark, MRPC's train split rebuilt the
way GLUE's script builds it), a transform redoes the change deterministically, and the checksum
is of the result: a transform that drifted fails exactly like a damaged download.

A file is written only after its checksum matched, to a temporary name renamed into place, so a
failed or interrupted fetch leaves no partial file; a file already present with the right
checksum is not fetched again. ``--mirror`` replaces the ``https://raw.githubusercontent.com/``
prefix (an offline mirror laid out as ``<owner>/<repo>/<commit>/<path>``; the tests use a
``file://`` one). The tfds catalog names are documentation only: runs read these files through
our builders (:mod:`research.data.builders`), which check the same digests.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from research.data import locations

RAW = "https://raw.githubusercontent.com/"
COMMAND = "python -m research.data.download"


class File(NamedTuple):
  """One file of a data set.

  Attributes:
    url: the pinned source URL, or several when the transform combines files.
    dest: path relative to the data directory (``<folder>/<file>``, the builders' layout).
    sha256: digest of the file as written (after the transform).
    transform: ``(bytes of each url) -> bytes`` for files the project's copy changed.
  """

  url: str | tuple[str, ...]
  dest: str
  sha256: str
  transform: Callable[..., bytes] | None = None


class Source(NamedTuple):
  """A data set: its files, and the tfds catalog name of the same data where one exists."""

  files: tuple[File, ...]
  tfds: str = ""


class FetchError(RuntimeError):
  """A download that failed or did not match its checksum; nothing was written for it."""


def github(repo: str, commit: str, path: str) -> str:
  """The raw URL of ``path`` in ``repo`` (``owner/name``) at ``commit``."""
  return f"{RAW}{repo}/{commit}/{path}"


def _snapshot(
  folder: str,
  repo: str,
  commit: str,
  src: str,
  digests: dict[str, str],
  renamed: dict[str, str] | None = None,
) -> tuple[File, ...]:
  """Files copied unchanged from ``src/`` of a snapshot: ``digests`` maps the name under
  ``folder`` to its sha256; ``renamed`` maps such a name to its name in the repository."""
  prefix, renamed = (f"{src}/" if src else ""), renamed or {}
  return tuple(
    File(github(repo, commit, prefix + renamed.get(name, name)), f"{folder}/{name}", digest)
    for name, digest in digests.items()
  )


def strip_bom_crlf(data: bytes) -> bytes:
  """A UTF-8 text without its byte-order mark, with LF line ends (MRPC's dev.tsv, as saved on
  Windows by GLUE's script, starts with a BOM and ends its lines with CRLF)."""
  return data.removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\n")


def _lines(data: bytes) -> list[str]:
  """UTF-8 text split as Python's universal newlines split it (GLUE's script reads so)."""
  text = data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
  return text.removesuffix("\n").split("\n")


def glue_mrpc_train(paraphrases: bytes, dev_ids: bytes) -> bytes:
  """MRPC's train.tsv as GLUE's ``download_glue_data.py`` builds it: the rows of
  ``msr_paraphrase_train.txt`` whose ``(#1 ID, #2 ID)`` is not in ``dev_ids.tsv``, each
  stripped and re-joined with tabs (BOM dropped, LF line ends). The repository's own train.tsv
  lacks one pair (2750203/2750153), hence the rebuild."""
  dev = {tuple(line.strip().split("\t")) for line in _lines(dev_ids)}
  header, *rows = _lines(paraphrases)
  out = [header]
  for line in rows:
    if not line.strip():
      continue
    label, id1, id2, s1, s2 = line.strip().split("\t")
    if (id1, id2) not in dev:
      out.append("\t".join((label, id1, id2, s1, s2)))
  return ("\n".join(out) + "\n").encode("utf-8")


_PROTAUGMENT = ("tdopierre/ProtAugment", "4233bbae0d7544e632692c4d2c185b2ed2a19eef")
_FEW_SHOT = ("labels.test.txt", "labels.train.txt", "labels.valid.txt", "test.jsonl")
_FEW_SHOT += ("train.10samples.jsonl", "train.jsonl", "valid.jsonl")


def _intents(folder: str, src: str, digests: Sequence[str]) -> tuple[File, ...]:
  """ProtAugment's ``full.jsonl`` and its five class splits; ``digests`` in the order
  ``few_shot/01/<_FEW_SHOT>``, ..., ``few_shot/05/...``, then ``full.jsonl``."""
  names = [f"few_shot/{run:02d}/{n}" for run in range(1, 6) for n in _FEW_SHOT] + ["full.jsonl"]
  assert len(names) == len(digests), folder
  return _snapshot(folder, *_PROTAUGMENT, src, dict(zip(names, digests)))


_MRPC = ("F0restL1n/BERT", "0d0288be08079531c7b3a85af3d532f9adb0f13a")

# name (= folder under the data directory) -> where each file comes from. Sources, terms and
# splits: docs/data.md; each folder's README.md in ../shared/data lists the same digests.
SOURCES: dict[str, Source] = {
  "sst2": Source(
    _snapshot(
      "sst2",
      "brunnurs/binary-classification-bert",
      "35e1628db50472679176dd31b992534a3866a86e",
      "data/SST2",
      {
        "train.tsv": "5c47819a1d04cfabc7afcc79a919c97b0b367101ad42d3ff148d67bf501384c2",
        "dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
        "test.tsv": "69a938605609b3e6663b4487918fe1565eb293734e6e520d0366d1d412fd2a13",
      },
    ),
    tfds="glue/sst2",
  ),
  "conll2003": Source(
    _snapshot(
      "conll2003",
      "CuteyThyme/Robustness_experiments",
      "8e20c3bab78b4aeaaebc71d257216d22bac0cec3",
      "data/conll2003",
      {
        "train.txt": "f83974d1808bb6699ff06d36f0236cf66fce5be1c2b6bd5111ff8f7e9fc71c8d",
        "valid.txt": "98e27eee97edde022caaa568cc46232261ea6722a2132de70b1e1e7971690fdd",
      },
      renamed={"valid.txt": "dev.txt"},
    ),
    tfds="conll2003",
  ),
  "conll2002_es": Source(
    _snapshot(
      "conll2002_es",
      "patverga/torch-ner-nlp-from-scratch",
      "e577320ee6ed7417137e5309d370d9274009cc2d",
      "data/conll2002",
      {
        "esp.train": "ec4eea28449f2503fab38009e66a25708aaf2aba9368382a4c112f1e3ba86c21",
        "esp.testa": "cdbef0e0338d55bd5166bef07cb65192c0f7d35a846417bb9f6b1f1298b9b7e8",
      },
    ),
    tfds="conll2002/es",
  ),
  "multi30k": Source(
    _snapshot(
      "multi30k",
      "multi30k/dataset",
      "a3d2e0d26b56f3846f66a952536ffed4e401d05a",
      "data/task1/raw",
      {
        "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
        "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
        "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
        "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
      },
    ),
  ),
  "stsb": Source(
    _snapshot(
      "stsb",
      "aivilmo/textual-similarity",
      "3fe0911a2e267b1cd7b2602c095c402ebadf4271",
      "stsbenchmark",
      {
        "sts-train.csv": "d52e1db23c2483099f2ff4d9cd80a0f98be6438748b65e21f2f2244da0164ab1",
        "sts-dev.csv": "5d7e944d8b02734b07bfdb5df67db3420c64bed153fcaa1ba47ad03480cf4234",
        "readme.txt": "e9488363d211c32ca5e912954f16eb9233cfed1b5b4b0475d0d812d35d7c8ef1",
        "LICENSE.txt": "3dfc3217395f8c5dd05c5f8995f25fe2f8fd258e6dd770b3de480749caee8c70",
      },
    ),
    tfds="glue/stsb",
  ),
  "mrpc": Source(
    (
      File(
        (
          github(*_MRPC, "glue_data/MRPC/msr_paraphrase_train.txt"),
          github(*_MRPC, "glue_data/MRPC/dev_ids.tsv"),
        ),
        "mrpc/train.tsv",
        "15d9c71e62d662b1cc9237e2015047cad4c1f62552d49858a9bce2b944d79897",
        glue_mrpc_train,
      ),
      File(
        github(*_MRPC, "glue_data/MRPC/dev.tsv"),
        "mrpc/dev.tsv",
        "320459df9454dbdc8eea69ad1eb294967e7dfe03e7cf791f37d954a316f5253d",
        strip_bom_crlf,
      ),
    ),
    tfds="glue/mrpc",
  ),
  "banking77": Source(
    _intents(
      "banking77",
      "data/BANKING77",
      (
        "49f28d5d8407026f65e8695f6ed4f5197f8bc01d472b409b13c05e001fa1cff3",
        "24c65da022d4b08284576a486b40184ee289ce743adf31cfcb4f455c57d4d2a6",
        "bd16328f26fb6ddb3b1ca5b2d4c851bdf241efd5655ff42757bda4db528d60b3",
        "685dc76a759b63a76a66272ba28946f3cf16a75bf88196acd48f5446cff34e3c",
        "83d5f8ab7190a1dcd3229d7aeac31e8838d0ef8d2f3a235ef7fe716b11c4c51c",
        "d64c246381efc8731f9ca05ff38b374ed07c6883567b19fca291f5822a01f6dd",
        "01fa6493130bbc5c9924215d881360065067c469278887e6371ce5eb8a9695e9",
        "b4e88a349d35188ab969cb58d774528574403f8e8545761c366f9a17a934c644",
        "9f46fe71d7458846d12332f6d5ca08ab90fea22ba265c0cd764979e20bcd8657",
        "3ccedcdeec8edfc30f87f70dab84e4c9d6f61276cca514c29a2796569de10409",
        "0ff8221291c637a9329b582a4792eb625f51828b9e59725eca2cbcc02ee6e635",
        "91d34a0fc2373339643eb17b1647d18ea2d18295db112b9d51594ee7968c8e36",
        "4410cbaa41a2118f3566cb7c5af11e7c8262ac816d39e6b384c8c35b99afb3f5",
        "dfbe34e7369f2bb91c9d817789dfe5db089d81aebb9e2b84b06d690946b71765",
        "6e9a900c934ffbf099708fb02ccae92dce027c7ab6c4867668aee2b070307cf5",
        "e4c304f1e05b5c103d77e584501af0c89399bebc3488eca6e213c4c205113ee3",
        "5a7de8fb72c7091672930f26a0bca15596577950ce4e4425db1de4fea336f0d8",
        "7feb63464f5d53c86aec918c34725a5beccbbbf95717b57b9b54517d746c8ee8",
        "06c0a103d9ed1ea7a40146d891fabb5532e31e8d9db1b6332640a58fdf1487d1",
        "ecff35a3e8b9ae901e13eb05586d8f095f22885dc534802b639deef7fa8ce4df",
        "236cfb59ac6d31a83a4e7f2eaadc84862ae782c6b74e52280bc2367b54217ca3",
        "cc33a69762dcbb6b600843771a3c4167096cc9ae4bfdfa4a8827cc2e8e9cac79",
        "2babffff35ec25c9385b51122fcd90f39d86fbd457e43e0b4bdd275d2e2e0178",
        "15528effc2dd837e4f29b73219ee34ca45b688252d36c495c70fb26d246d6972",
        "146ee23825417f62a573cbe50cecda0cd70db88c1d4fdfb514d0d0e476601833",
        "f5efa9ddbccc6249aede4615910aa3bd6e46a5bb93501620bbce9bb1b601f6a0",
        "1426d6efaf96b9f236cf34ce234644ab08279429bca57c9e8cfd61c8c5b5e813",
        "3c16c244ccaff1a12a0a07fdb878b26c7cd73537b1167fffb1684fa2e0c24029",
        "2a00100b5fa1131a1c573489be6bc268fe49c00d8e090d1dea450cf3d56f7ff3",
        "21c00659254cd525e1f21ce775b17da1823471d4870cfdec5860e050bb3c696e",
        "c6b96cd2c97427e48ca9447851767006a6c82ee9028689f9c6e925e79e24341e",
        "49f3d297be2ccb266aaa19a3bcb4b6352de4dcbfa30eb2345ac46b85f944c627",
        "34290b103502054e4f79df6d5f3d83ed0ad0d10561828571a5369d3631025f2d",
        "97e24e627e91bc7c197ffe3649b8b1037d79b6b0643702fb9add54c121c19e9f",
        "f04ca35019f663660a97ee9c85ecf5c5b9063c70436aa6f98ac497d1a11ce923",
        "2aef59a59888b66ebfd99a08e82a18f396a81c0430410938ef416a4bd5081b98",
      ),
    ),
  ),
  "clinc150": Source(
    _intents(
      "clinc150",
      "data/OOS",
      (
        "2e15b8d0bcca648a3e548021397b5d8ae7a470d7d6547bb8f937d01e32359e7e",
        "09d3937c82290d220fd8e7d7c869b67d925a8b553152a038d0bd5951433ddd61",
        "67e16b89a8ea860ad2f614ddcfcfda4bda9b62fd567fda979a203e09b08a5b75",
        "b56eedfab327aeeacf28a8621592b43f8d8b1f56131d7cf02619d5cae0c5de7b",
        "fb289e7f3de7dda4d059e423f1440f41b7bf24fa658d052c677ac02df782e0e9",
        "267e84b32ef66c39d19c1dc7687c54e6cd541534f03081e9dbce7e3e609819b4",
        "3bbc24973316bceae596b08bb3eebda239fe6ce3d227c0128f299b75ce69f38b",
        "0294cb823c614db59c17a1158d94cf219fc7f3ede7d198aef57e0f4287819ae1",
        "0fe33ab45d013ce1ecbc5acc812d87ec2418f64e02f0febd7bf6b3840491b5a7",
        "1ff86a05de17dadbbba01471638c36de52a62b268b7387c1642d840439e96e07",
        "4999608d4f4987111c13e7ed8037737c88be12850dd928d5b6e188fab2d2aca8",
        "13ac3a794c02ebef8995058fa5de61c875a0ff0e59e6fe258fa4bab266f3ffe2",
        "2a9c045175c783f7592ef8275f8310201052ada9c969d0c9edf4457da3fcba42",
        "db2dabdea21dc41fbb8829cf2f0e3bf8c96af1fa428f66b5285a61b6dbe1e185",
        "60a0db222f9f874ba73b1ea738af7a8e33d208ec1ea6e1a5356f27f88e8286e4",
        "4ac4510e248f0ddce70f0e0cdd7ad96bad4bd5298520ba8f239ebae0243795c6",
        "e69114220b66edf6a9456b4fbe69c901e797eb08b18abe49e85622a45b730cfe",
        "6b9bdb12edb9593c871650b2f2d575ecbd5e4b50be5fb786ad5cfde70ae3656b",
        "aa066cf51f4430169d28702f2a3b1831b488342099cf7a6bf36e1f284f859ee1",
        "0bad7fa3fdb51c606d1ba6b0160b8a6661a55a8a0efbdf0a7bc0aacf05d6f00e",
        "c906194b772a94a5d72af2917b21cce0f67960450c9a60f9257b555343858d37",
        "0bcfc4eea6844dcb0cb93065dff0555f34d99d33dea372a8c9bedd734ad41184",
        "fc0d816b030f1b164a5b3e551dc9aaeb9310b72245c7a4f0648e73497facf574",
        "cdfadb9dcd5a96a3c82093848a9dd538ab84a3f85ba4f885a3f0e7ed2059cc16",
        "2015de4d70ca9bad540bd3a1ad1689f94d5494ae4fd2b687ce69ecc7b8caf49f",
        "3d75e4e4e2dbd54bf3489e1b17546b0d2913460604d09baf52d4fbe3216b9709",
        "b8b0f868993ff9cb9df1e27297b79132cf04aa76f81720344edd99f0af698d9e",
        "b17186ca7075d5b5bf73e51bd4ef7feb2aa77e33eee3fa7b7e66dd12077234cf",
        "5c51ecfb7cd468cbc68a788e58136c70f135681dab70c6c03f3288220dd3c77e",
        "27e241d0bf313a6f891c1e2130aef7b70cee965151c9bca0a997c5fcef5589fc",
        "b300674c816e00418c6d1437bded0e6d99bbe01a66a2a82f205fe1e10098c21b",
        "d649eae1e53be04600fdf920d712be0d996fc449cf4d554fff7030498bbf782e",
        "7c37d51ffd5fd1fc146b200adddc2d3b8c8728c52e3a9fdd599f2a4ede7d3b7b",
        "aa66a91ba813516782f95d15ff1d4ac3a8c7e2e73b7715a23712340a997933c7",
        "fdb03ce17a9da6e0a27e8458e1bc062b6f10471e0d75bacba2654c82baa47a61",
        "ae5573aa7fada6614862657b0d6aabcd9f33135f56c8cd8dd4aefab6bc8ccd26",
      ),
    ),
    tfds="clinc_oos",
  ),
  "ag_news": Source(
    _snapshot(
      "ag_news",
      "suuuch/TransformerClassification",
      "0d9808e1978c8468b4f8f08a44c5be99d058aa7b",
      "data/ag_news_csv",
      {
        "test.csv": "d2a2cef4dfeb21ca17b463fd15e9e5a639c05823d03efabb3d28a75bbfe8d915",
        "classes.txt": "612dbfa932f07a6ed837295a7d5746ce7412e7bb4bc32ba919fdb3cda3a1b9b5",
        "readme.txt": "779c2e6bbf93dd810d9c7b318006daef7a4bfc34062002461d251dc10fb9f58c",
      },
    )
    + _snapshot(
      "ag_news",
      "forest-snow/alps",
      "3c7ef2c98249fc975a897b27f275695f97d5b7a9",
      "data/agnews",
      {
        "train_subset10k_alps.tsv": (
          "7a0811e0006080bf4de17752c5466450ff3db778be71bc5bcf3c4e99b5f0803d"
        ),
      },
      renamed={"train_subset10k_alps.tsv": "dev.tsv"},
    ),
    tfds="ag_news_subset",
  ),
  "sentiment_labelled_sentences": Source(
    _snapshot(
      "sentiment_labelled_sentences",
      "k3v1n-KI/semtement_analyzer",
      "313f6b405a942e1a3fd2a46b8c68047d6d6d9e9e",
      "",
      {
        "amazon_cells_labelled.txt": (
          "ca1d53aae8154b3c17ce1166167e545ccdc910cc0aa5c885c1adf9ce161a4648"
        ),
        "imdb_labelled.txt": "2fa2807a9da06b5058999c430b2857ff2419b45bcfc35acfc192bd955f85577f",
        "yelp_labelled.txt": "f79668aea211c92320d13e863a3161948f19ff03b7447869b40e32d1c9970f0e",
      },
    ),
  ),
}


def hint(manual_dir: str | os.PathLike[str]) -> str:
  """``'; fetch it with: python -m research.data.download NAME'`` for a missing data folder
  this module can fetch (with ``--dest`` when it is not under the default data root), else
  ``''``: appended to the builders' no-data errors so a fresh machine is one command away."""
  folder = Path(manual_dir)
  if folder.name not in SOURCES:
    return ""
  command = f"{COMMAND} {folder.name}"
  if folder.parent.resolve() != locations.data_root().resolve():
    command += f" --dest {folder.parent}"
  return f"; fetch it with: {command}"


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def mirrored(url: str, mirror: str | None) -> str:
  """``url`` with its ``https://raw.githubusercontent.com/`` prefix replaced by ``mirror``."""
  if not mirror or not url.startswith(RAW):
    return url
  return mirror.rstrip("/") + "/" + url[len(RAW) :]


def _read(url: str) -> bytes:
  try:
    with urllib.request.urlopen(url, timeout=60) as response:
      return response.read()
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", None) or e
    raise FetchError(f"could not fetch {url}: {reason}") from None


def _write_atomic(path: Path, data: bytes) -> None:
  """Writes ``path`` through a temporary file in its folder, renamed once complete."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def fetch_file(file: File, dest: Path, mirror: str | None = None) -> bool:
  """Puts ``file`` under ``dest`` unless it is there with the right checksum.

  Returns:
    True when the file was fetched, False when it was already present.

  Raises:
    FetchError: a download failed or its result does not match ``file.sha256`` (one line
      naming the URL and both digests); nothing is written then.
  """
  target = dest / file.dest
  if target.is_file() and _file_sha256(target) == file.sha256:
    return False
  urls = [mirrored(u, mirror) for u in ((file.url,) if isinstance(file.url, str) else file.url)]
  parts = [_read(u) for u in urls]
  data = file.transform(*parts) if file.transform else parts[0]
  digest = sha256(data)
  if digest != file.sha256:
    raise FetchError(
      f"{' + '.join(urls)}: sha256 {digest} does not match the expected {file.sha256} "
      f"(for {file.dest}); nothing written"
    )
  _write_atomic(target, data)
  return True


def fetch(
  names: Sequence[str],
  dest: str | os.PathLike[str] | None = None,
  mirror: str | None = None,
  sources: dict[str, Source] | None = None,
  log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> dict[str, int]:
  """Fetches the data sets ``names`` into ``dest`` (default: the data root), one line per file.

  Returns:
    ``{'fetched': n, 'present': m}``.

  Raises:
    KeyError: an unknown name. FetchError: see :func:`fetch_file` (files fetched before it
      stay, each complete and checked).
  """
  sources = SOURCES if sources is None else sources
  unknown = [n for n in names if n not in sources]
  if unknown:
    raise KeyError(f"unknown data set(s) {unknown}; known: {sorted(sources)}")
  root = Path(dest).expanduser() if dest is not None else locations.data_root()
  files = [f for name in names for f in sources[name].files]
  counts = {"fetched": 0, "present": 0}
  for i, file in enumerate(files, start=1):
    fetched = fetch_file(file, root, mirror)
    counts["fetched" if fetched else "present"] += 1
    size = (root / file.dest).stat().st_size
    state = "fetched, sha256 ok" if fetched else "present, sha256 ok, skipped"
    log(f"[{i}/{len(files)}] {file.dest} ({size:,} bytes): {state}")
  log(f"{root}: {counts['fetched']} file(s) fetched, {counts['present']} already present")
  return counts


def main(argv: Sequence[str] | None = None, sources: dict[str, Source] | None = None) -> int:
  """The command line; returns the exit status (0 done, 1 a failed fetch, 2 a usage error)."""
  sources = SOURCES if sources is None else sources
  parser = argparse.ArgumentParser(
    prog=COMMAND,
    description="Fetch public data sets from their pinned sources, checking every sha256.",
    epilog="data sets: "
    + ", ".join(f"{n} (tfds: {s.tfds})" if s.tfds else n for n, s in sources.items())
    + "; sources and terms: docs/data.md",
  )
  parser.add_argument(
    "names", nargs="+", metavar="NAME", choices=[*sources, "all"], help="data sets, or all"
  )
  parser.add_argument(
    "--dest", help=f"data directory (default: ${locations.DATA_ENV} or <repo>/data)"
  )
  parser.add_argument(
    "--mirror", help=f"URL replacing the {RAW} prefix (an offline mirror, e.g. file:///srv/m/)"
  )
  args = parser.parse_args(argv)
  names = list(sources) if "all" in args.names else list(dict.fromkeys(args.names))
  try:
    fetch(names, args.dest, args.mirror, sources)
  except (FetchError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
