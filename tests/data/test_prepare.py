"""`prepare_dataset` / `data_info` on the real tokenizers and corpora: contents, format, errors, atomicity."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from moe_recipes.cli import main
from moe_recipes.data import prepare as prep
from moe_recipes.data.indexed import IndexedDataset
from moe_recipes.data.info import data_info
from moe_recipes.data.prepare import prepare_dataset
from moe_recipes.data.tokenizer import bos_id, eod_id, load_tokenizer
from tests.data.test_indexed import INT32_CODE, UINT16_CODE, expected_pointers, read_idx_with_struct

from ..assets import CORPUS_EN, CORPUS_JA, DEEPSEEK_TOKENIZER, MIXTRAL_TOKENIZER

TOKENIZER_DIRS = {"mixtral": MIXTRAL_TOKENIZER, "deepseek": DEEPSEEK_TOKENIZER}
CORPORA = {"en": CORPUS_EN, "ja": CORPUS_JA}


@pytest.fixture(scope="module")
def toks() -> dict:
    return {name: load_tokenizer(path) for name, path in TOKENIZER_DIRS.items()}


def corpus_texts(lang: str, limit: int | None = None) -> list[str]:
    with open(CORPORA[lang], encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts[:limit]


def expected_docs(tok, texts: list[str], bos: bool = True, eos: bool = True) -> list[list[int]]:
    """The documented policy, computed with the plain HF API: [bos] + encode(no specials) + [eos]."""
    docs = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        if ids:
            docs.append([tok.bos_token_id] * bos + ids + [tok.eos_token_id] * eos)
    return docs


def read_docs(prefix: str | Path) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    """Write raw lines (str or bytes) as a JSONL file, gzip-compressed when the name ends in .gz."""
    data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def jsonl(texts: list[str]) -> list[str]:
    return [json.dumps({"text": t}, ensure_ascii=False) for t in texts]


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def small_chunks(monkeypatch) -> None:
    """Force many chunks per file so that ordering and line numbers cross chunk boundaries."""
    monkeypatch.setattr(prep, "MIN_CHUNK_BYTES", 2048)
    monkeypatch.setattr(prep, "MAX_CHUNK_BYTES", 2048)


@pytest.mark.parametrize("lang", ["en", "ja"])
@pytest.mark.parametrize(("name", "code"), [("mixtral", UINT16_CODE), ("deepseek", INT32_CODE)])
def test_round_trip_on_real_corpus(tmp_path: Path, toks: dict, name: str, code: int, lang: str) -> None:
    tok = toks[name]
    stats = prepare_dataset(
        [str(CORPORA[lang])], str(TOKENIZER_DIRS[name]), str(tmp_path / "out"), append_eod=True
    )
    prefix = tmp_path / "out_text_document"
    assert (stats.bin_path, stats.idx_path) == (f"{prefix}.bin", f"{prefix}.idx")

    want = expected_docs(tok, corpus_texts(lang))
    assert read_docs(prefix) == want
    assert all(doc[0] == tok.bos_token_id and doc[1] != tok.bos_token_id for doc in want)
    assert (stats.documents, stats.tokens) == (len(want), sum(map(len, want)))
    assert (stats.bad_lines, stats.empty_documents) == (0, 0)

    dtype = np.uint16 if code == UINT16_CODE else np.int32
    assert IndexedDataset(prefix).dtype == np.dtype(dtype)
    idx = read_idx_with_struct(Path(f"{prefix}.idx"))
    lengths = [len(d) for d in want]
    assert idx["magic"] == b"MMIDIDX\x00\x00" and idx["version"] == 1 and idx["code"] == code
    assert (idx["count"], idx["doc_count"], idx["trailing"]) == (len(want), len(want) + 1, 0)
    assert idx["lengths"] == lengths
    assert idx["pointers"] == expected_pointers(lengths, np.dtype(dtype).itemsize)
    assert idx["doc_idx"] == list(range(len(want) + 1))
    raw = Path(f"{prefix}.bin").read_bytes()
    assert np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).tolist() == [
        t for d in want for t in d
    ]


def test_bos_and_eod_flags(tmp_path: Path, toks: dict) -> None:
    """Mixtral's tokenizer adds BOS by itself: add_bos=False must still give none; DeepSeek's adds none."""
    texts = corpus_texts("en", 12)
    src = write_lines(tmp_path / "in.jsonl", jsonl(texts))
    for name, tok in toks.items():
        prepare_dataset([str(src)], str(TOKENIZER_DIRS[name]), str(tmp_path / name), add_bos=False)
        docs = read_docs(tmp_path / f"{name}_text_document")
        assert docs == expected_docs(tok, texts, bos=False, eos=False)
        assert all(doc[0] != tok.bos_token_id for doc in docs)


def test_custom_json_key_names_the_output(tmp_path: Path, toks: dict) -> None:
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"body": "Hello world", "text": 3})])
    prepare_dataset([str(src)], str(TOKENIZER_DIRS["mixtral"]), str(tmp_path / "o"), json_key="body")
    assert read_docs(tmp_path / "o_body_document") == [[1, 22557, 1526]]


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_workers_give_identical_files_over_many_chunks_and_files(
    tmp_path: Path, small_chunks, monkeypatch, start_method: str
) -> None:
    if start_method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"{start_method} is not available here")
    monkeypatch.setattr(prep, "START_METHOD", start_method)
    en, ja = corpus_texts("en", 120), corpus_texts("ja", 120)
    inputs = [
        str(write_lines(tmp_path / "a.jsonl", jsonl(en))),
        str(write_lines(tmp_path / "b.jsonl.gz", jsonl(ja))),
    ]
    tok_dir = str(TOKENIZER_DIRS["deepseek"])
    one = prepare_dataset(inputs, tok_dir, str(tmp_path / "w1"), append_eod=True, workers=1)
    two = prepare_dataset(inputs, tok_dir, str(tmp_path / "w2"), append_eod=True, workers=2)
    for suffix in (".bin", ".idx"):
        assert (
            Path(f"{tmp_path}/w1_text_document{suffix}").read_bytes()
            == Path(f"{tmp_path}/w2_text_document{suffix}").read_bytes()
        )
    assert one.documents == two.documents == 240
    assert multiprocessing.active_children() == []


def test_gzip_and_glob_inputs(tmp_path: Path, toks: dict) -> None:
    en, ja = corpus_texts("en", 20), corpus_texts("ja", 20)
    folder = tmp_path / "in"
    folder.mkdir()
    write_lines(folder / "b.jsonl.gz", jsonl(ja))
    write_lines(folder / "a.jsonl", jsonl(en))
    write_lines(folder / "c.txt", ["not json"])
    stats = prepare_dataset([str(folder / "*.jsonl*")], str(TOKENIZER_DIRS["mixtral"]), str(tmp_path / "o"))
    assert stats.inputs == [str(folder / "a.jsonl"), str(folder / "b.jsonl.gz")]
    assert read_docs(tmp_path / "o_text_document") == expected_docs(toks["mixtral"], en + ja, eos=False)

    with pytest.raises(FileNotFoundError, match=r"nothing\*\.jsonl.*matches no file"):
        prepare_dataset([str(folder / "nothing*.jsonl")], str(TOKENIZER_DIRS["mixtral"]), str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        prepare_dataset([str(folder / "missing.jsonl")], str(TOKENIZER_DIRS["mixtral"]), str(tmp_path / "x"))


BAD_LINES = [
    ('{"text": "unterminated', "invalid JSON"),
    ('{"body": "no text key"}', "missing key 'text'"),
    ('{"text": 42}', "value of 'text' is int, not a string"),
    ('{"text": null}', "value of 'text' is NoneType, not a string"),
    ('["text", "a list"]', "expected a JSON object"),
    (b'{"text": "\xff\xfe bad utf-8"}', "invalid JSON"),
]


def numbered_lines(count: int) -> list[str]:
    return jsonl([f"document number {i} has a few words in it." for i in range(count)])


@pytest.mark.parametrize(("bad", "reason"), BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path: Path, small_chunks, bad: str | bytes, reason: str) -> None:
    lines: list[str | bytes] = list(numbered_lines(300))
    lines[9] = ""  # a blank line still counts for numbering
    lines[236] = bad
    src = write_lines(tmp_path / "in.jsonl", lines)
    with pytest.raises(ValueError, match=re.escape(f"{src}, line 237: {reason}")):
        prepare_dataset([str(src)], str(TOKENIZER_DIRS["mixtral"]), str(tmp_path / "o"))
    assert files_in(tmp_path) == ["in.jsonl"]


@pytest.mark.parametrize("name", ["second.jsonl", "second.jsonl.gz"])
def test_bad_line_numbers_restart_per_file_with_workers(tmp_path: Path, small_chunks, name: str) -> None:
    good = write_lines(tmp_path / "first.jsonl", numbered_lines(200))
    lines: list[str | bytes] = list(numbered_lines(250))
    lines[180] = '{"text": '
    bad = write_lines(tmp_path / name, lines)
    inputs = [str(good), str(bad)]
    with pytest.raises(ValueError, match=re.escape(f"{bad}, line 181: invalid JSON")):
        prepare_dataset(inputs, str(TOKENIZER_DIRS["mixtral"]), str(tmp_path / "o"), workers=2)
    assert not [f for f in files_in(tmp_path) if f.startswith("o_")]
    assert multiprocessing.active_children() == []


def test_skip_bad_lines_counts_bad_empty_and_blank(tmp_path: Path, toks: dict, small_chunks) -> None:
    texts = corpus_texts("en", 30)
    lines: list[str | bytes] = list(jsonl(texts))
    lines[3:3] = [bad for bad, _ in BAD_LINES[:3]]
    lines[10:10] = ["", "   ", json.dumps({"text": ""})]
    src = write_lines(tmp_path / "in.jsonl", lines)
    stats = prepare_dataset(
        [str(src)], str(TOKENIZER_DIRS["deepseek"]), str(tmp_path / "o"), append_eod=True, skip_bad_lines=True
    )
    want = expected_docs(toks["deepseek"], texts)
    assert (stats.bad_lines, stats.blank_lines, stats.empty_documents) == (3, 2, 1)
    assert (stats.documents, stats.tokens) == (30, sum(map(len, want)))
    assert read_docs(tmp_path / "o_text_document") == want
    summary = stats.summary()
    for label, value in [("documents", 30), ("skipped bad lines", 3), ("skipped empty documents", 1)]:
        assert any(
            line.startswith(label + ":") and line.split()[-1] == str(value) for line in summary.splitlines()
        )


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_failure_mid_way_leaves_no_files(tmp_path: Path, monkeypatch, small_chunks, error: type) -> None:
    src = write_lines(tmp_path / "in.jsonl", numbered_lines(400))
    real_process, calls = prep._Encoder.process, []

    def failing(self, chunk):
        calls.append(chunk)
        if len(calls) == 3:
            raise error("stop")
        return real_process(self, chunk)

    monkeypatch.setattr(prep._Encoder, "process", failing)
    with pytest.raises(error):
        prepare_dataset([str(src)], str(TOKENIZER_DIRS["mixtral"]), str(tmp_path / "o"))
    assert files_in(tmp_path) == ["in.jsonl"]


def test_failure_while_committing_leaves_no_files(tmp_path: Path, monkeypatch) -> None:
    src = write_lines(tmp_path / "in.jsonl", numbered_lines(5))

    def broken_index(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prep, "write_index", broken_index)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset([str(src)], str(TOKENIZER_DIRS["mixtral"]), str(tmp_path / "o"))
    assert files_in(tmp_path) == ["in.jsonl"]


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    """~70 MB of JSONL: far more than a run gets through before the test signals it."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    path.write_bytes(CORPORA["en"].read_bytes() * 80)
    return path


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cli_run_and_cleans_up(tmp_path: Path, big_corpus: Path, signum: int) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # Plain pipeline: the word cache gets through this repeated corpus before the signal arrives.
    cmd = [sys.executable, "-m", "moe_recipes.cli", "prepare", "--input", str(big_corpus), "--tokenizer",
           str(TOKENIZER_DIRS["mixtral"]), "--output-prefix", str(out / "big"), "--workers", "2",
           "--no-word-cache"]  # fmt: skip
    with open(tmp_path / "stderr.txt", "wb") as err:
        # Shells start background jobs with SIGINT ignored, and Python keeps it ignored: give the run the
        # default disposition, as an interactive terminal would, so that the test works when so launched.
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_default_sigint)
        tmp_bin = out / f"big_text_document.bin.tmp-{proc.pid}"
        deadline = time.monotonic() + 90
        while not (tmp_bin.exists() and tmp_bin.stat().st_size > 0):
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "prepare never started writing"
            time.sleep(0.05)
        workers = _children(proc.pid)
        proc.send_signal(signum)
        rc = proc.wait(timeout=60)
    assert rc == 130, (tmp_path / "stderr.txt").read_text()
    assert files_in(out) == []
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)


def test_cli_prepare_and_data_info(tmp_path: Path, toks: dict, capsys) -> None:
    texts = corpus_texts("ja", 25)
    src = write_lines(tmp_path / "in.jsonl", jsonl(texts))
    tok_dir = str(TOKENIZER_DIRS["mixtral"])
    rc = main(["prepare", "--input", str(src), "--tokenizer", tok_dir, "--output-prefix", str(tmp_path / "ja"),
               "--append-eod", "--workers", "2"])  # fmt: skip
    assert rc == 0
    want = expected_docs(toks["mixtral"], texts)
    out = capsys.readouterr().out
    assert re.search(rf"^documents: +{len(want)}$", out, re.M)
    assert str(tmp_path / "ja_text_document.idx") in out

    prefix = str(tmp_path / "ja_text_document")
    assert (
        main(["data-info", prefix, "--tokenizer", tok_dir, "--sample-index", "2", "--sample-tokens", "12"])
        == 0
    )
    info = capsys.readouterr().out
    lengths = [len(d) for d in want]
    assert f"documents: {len(want)}" in info and f"tokens: {sum(lengths)}" in info and "dtype: uint16" in info
    assert f"largest token id: {max(max(d) for d in want)} (fits the tokenizer's 32000 ids)" in info
    assert f"min {min(lengths)}, mean {np.mean(lengths):.1f}, max {max(lengths)}" in info
    decoded = toks["mixtral"].decode(want[2][:12], skip_special_tokens=False)
    assert f"text: {decoded!r}" in info and decoded.startswith("<s>")

    lines = jsonl(texts[:3]) + ['{"text": 1}']
    write_lines(src, lines)
    assert (
        main(["prepare", "--input", str(src), "--tokenizer", tok_dir, "--output-prefix", str(tmp_path / "e")])
        == 2
    )
    assert f"{src}, line 4: value of 'text' is int" in capsys.readouterr().err


def test_data_info_without_tokenizer_and_bad_index(tmp_path: Path, toks: dict) -> None:
    texts = corpus_texts("en", 5)
    src = write_lines(tmp_path / "in.jsonl", jsonl(texts))
    prepare_dataset([str(src)], str(TOKENIZER_DIRS["deepseek"]), str(tmp_path / "o"), append_eod=True)
    want = expected_docs(toks["deepseek"], texts)
    report = data_info(str(tmp_path / "o_text_document.bin"), None, sample_index=4, sample_tokens=7)
    assert "dtype: int32" in report and f"documents: {len(want)}" in report
    assert f"ids: {want[4][:7]}" in report and "text:" not in report
    with pytest.raises(ValueError, match="sample_index 5 is out of range"):
        data_info(str(tmp_path / "o_text_document"), None, sample_index=5)
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        data_info(str(tmp_path / "nope"), None)


def test_slow_tokenizer_path_matches_fast(toks: dict) -> None:
    """Tokenizers without a Rust backend go through transformers in the worker; same ids either way."""
    tok = toks["mixtral"]
    lines = jsonl(corpus_texts("ja", 6) + [""])
    spec = prep._EncodeSpec(None, str(TOKENIZER_DIRS["mixtral"]), "text", 1, 2, "uint16", False)
    chunk = prep.Piece("mem", 0, data="\n".join(lines).encode())
    slow = prep._Encoder(spec).process(chunk)
    fast = prep._Encoder(spec, tok).process(chunk)
    assert slow.tokens.tolist() == fast.tokens.tolist() and slow.lengths.tolist() == fast.lengths.tolist()
    assert (slow.lines, slow.empty_documents, len(slow.lengths)) == (7, 1, 6)


def test_tokenizer_helpers(tmp_path: Path, toks: dict) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"no tokenizer in {tmp_path}"):
        load_tokenizer(tmp_path)
    assert (eod_id(toks["mixtral"]), bos_id(toks["mixtral"])) == (2, 1)
    assert (eod_id(toks["deepseek"]), bos_id(toks["deepseek"])) == (1, 0)
    with pytest.raises(ValueError, match="'custom' has no eos_token"):
        eod_id(SimpleNamespace(eos_token_id=None, name_or_path="custom"))
    assert bos_id(SimpleNamespace(bos_token_id=None)) is None


def test_megatron_reads_our_files_and_writes_the_same_bytes(tmp_path: Path) -> None:
    """Reference test against megatron-core's own IndexedDataset reader and IndexedDatasetBuilder."""
    mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    texts = corpus_texts("ja", 40)
    src = write_lines(tmp_path / "in.jsonl", jsonl(texts))
    for name in ("mixtral", "deepseek"):
        prepare_dataset([str(src)], str(TOKENIZER_DIRS[name]), str(tmp_path / name), append_eod=True)
        prefix = str(tmp_path / f"{name}_text_document")
        ours = read_docs(prefix)
        theirs = mcore.IndexedDataset(prefix)
        assert len(theirs) == len(ours)
        assert [theirs[i].tolist() for i in range(len(theirs))] == ours
        assert theirs.document_indices.tolist() == list(range(len(ours) + 1))

        dtype = IndexedDataset(prefix).dtype.type
        builder = mcore.IndexedDatasetBuilder(str(tmp_path / f"mc-{name}.bin"), dtype=dtype)
        for doc in ours:
            builder.add_document(doc, [len(doc)])
        builder.finalize(str(tmp_path / f"mc-{name}.idx"))
        for suffix in (".bin", ".idx"):
            assert Path(prefix + suffix).read_bytes() == (tmp_path / f"mc-{name}{suffix}").read_bytes()


def test_largest_token_id_scans_every_slice(tmp_path: Path, monkeypatch) -> None:
    from moe_recipes.data import info
    from moe_recipes.data.indexed import write_index

    docs = [[5, 9, 3], [7] * 20, [1, 60000, 2], [4, 4]]
    with open(tmp_path / "d.bin", "wb") as f:
        for doc in docs:
            f.write(np.asarray(doc, dtype=np.uint16).tobytes())
    write_index(tmp_path / "d.idx", np.uint16, np.array([len(d) for d in docs]))
    monkeypatch.setattr(info, "MAX_SCAN_TOKENS", 7)
    assert info.largest_token_id(IndexedDataset(tmp_path / "d")) == 60000


@pytest.mark.parametrize("name", ["mixtral", "deepseek"])
def test_word_cache_path_is_taken_and_matches_the_plain_pipeline(tmp_path: Path, name: str) -> None:
    from moe_recipes.data.fast_tokenize import WordCacheEncoder

    tok = load_tokenizer(TOKENIZER_DIRS[name])
    spec = prep._make_spec(tok, str(TOKENIZER_DIRS[name]), "text", True, True, False)
    assert isinstance(prep._Encoder(spec, tok).fast, WordCacheEncoder)
    src = write_lines(tmp_path / "c.jsonl", jsonl(corpus_texts("ja", 60) + corpus_texts("en", 60)))
    for cache in (True, False):
        prepare_dataset([str(src)], str(TOKENIZER_DIRS[name]), str(tmp_path / f"o{cache}"), word_cache=cache)
    for ext in ("bin", "idx"):
        a, b = (tmp_path / f"o{c}_text_document.{ext}" for c in (True, False))
        assert a.read_bytes() == b.read_bytes()


def test_word_cache_disagreement_stops_the_run_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    real = prep.fast_encoder

    class Corrupting:  # a word-cache encoder that drops the last token of a batch's longest document
        def __init__(self, backend):
            self.inner = real(backend)
            self.kind = self.inner.kind

        def encode_batch(self, texts):
            ids = self.inner.encode_batch(texts)
            longest = max(range(len(texts)), key=lambda k: len(texts[k]))
            ids[longest] = ids[longest][:-1]
            return ids

    monkeypatch.setattr(prep, "fast_encoder", Corrupting)
    src = write_lines(tmp_path / "c.jsonl", jsonl(corpus_texts("en", 20)))
    with pytest.raises(RuntimeError, match=r"c\.jsonl \(bytes 0-\d+\); please report this.*--no-word-cache"):
        prepare_dataset([str(src)], str(TOKENIZER_DIRS["mixtral"]), str(tmp_path / "out"))
    assert not list(tmp_path.glob("out*"))


def test_data_info_blend_by_tokens_and_by_ratio(tmp_path: Path, capsys) -> None:
    import yaml

    tok_dir = str(TOKENIZER_DIRS["mixtral"])
    prefixes = []
    for lang, count in (("ja", 30), ("en", 10)):
        src = write_lines(tmp_path / f"{lang}.jsonl", jsonl(corpus_texts(lang, count)))
        prepare_dataset([str(src)], tok_dir, str(tmp_path / lang), append_eod=True)
        prefixes.append(str(tmp_path / f"{lang}_text_document"))
    tokens = [IndexedDataset(p).num_tokens for p in prefixes]

    assert main(["data-info", *prefixes]) == 0
    out = capsys.readouterr().out
    for prefix, n in zip(prefixes, tokens):
        assert re.search(rf"^{re.escape(prefix)} +\d+ +{n} .* 1\.00$", out, re.M)
    blend = yaml.safe_load(re.search(r"YAML: +path: (.*)$", out, re.M).group(1))
    assert blend[1::2] == prefixes
    assert blend[0::2] == pytest.approx([n / sum(tokens) for n in tokens], abs=1e-6)
    assert f'data.path="{re.search(r"path: (.*)$", out, re.M).group(1)}"' in out

    assert main(["data-info", *prefixes, "--ratio", "7", "3"]) == 0
    out = capsys.readouterr().out
    blend = yaml.safe_load(re.search(r"YAML: +path: (.*)$", out, re.M).group(1))
    assert blend == [0.7, prefixes[0], 0.3, prefixes[1]] and "weighted by the given ratios" in out
    passes = 0.3 / (tokens[1] / sum(tokens))
    assert re.search(rf"^{re.escape(prefixes[1])} .* {passes:.2f}$", out, re.M)

    assert main(["data-info", *prefixes, "--ratio", "1"]) == 2
    assert "1 ratios given for 2 prefixes" in capsys.readouterr().err
