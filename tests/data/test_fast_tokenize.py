"""`fast_tokenize`: the word-cache encoder gives exactly the Rust pipeline's / HF tokenizer's ids."""

from __future__ import annotations

import json
import random
import re

import pytest
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

from moe_recipes.data import fast_tokenize as ft
from moe_recipes.data.tokenizer import load_tokenizer

from ..assets import CORPUS_EN, CORPUS_JA, DEEPSEEK_TOKENIZER, MIXTRAL_TOKENIZER

TOKENIZER_DIRS = {"mixtral": MIXTRAL_TOKENIZER, "deepseek": DEEPSEEK_TOKENIZER}
CORPORA = {"en": CORPUS_EN, "ja": CORPUS_JA}
NAMES = tuple(TOKENIZER_DIRS)

ADVERSARIAL = [
    "", " ", "   ", "\t", "\n", "\r\n", " \n \t ", "a", " a", "a ", "  leading", "trailing  ",
    "many      spaces   between words", "tabs\t\tand\tnew\nlines\n\n\nhere", "\n\nstarts with newlines",
    "▁", "▁▁▁", "▁a", "a▁", "a▁b", "a ▁ b", "▁ ▁", "x▁▁ ▁ y", " ▁leading meta", "literal ▁▁ meta ▁",
    "emoji 😀😃 👍🏽 🇯🇵 👨‍👩‍👧 end", "日本語の文章です。カタカナ・ひらがな、漢字。", "ｆｕｌｌ　ｗｉｄｔｈ　１２３！",
    "mixed 日本語 and English with 12345 digits", "数字123と漢字456", "e\u0301 a\u0308 combining",
    "zero\u200bwidth\u200djoiner", "nbsp\u00a0nbsp", "ideographic\u3000space", "line\u2028sep\u2029para",
    "next\u0085line", "ctrl\x00\x01\x1c\x1d\x1e\x1f\x7f chars", "unassigned \u0378 \U000e0100 \U0010fffd",
    "12345678901234567890", "3.14159 -42 +7 1e10 0x1F", "foo.bar/baz?q=1&x=[2]", "'quote' \"dq\" `bt`",
    "snake_case camelCase kebab-case", "  \n  \n  ", "!!!???...,,,", "a\r\rb\r", "\u00e9\u00e8\u00ea",
    "<s> in text", "text </s>", "<unk>", "<<s>>", "<｜begin▁of▁sentence｜>hello", "x<think>y</think>z",
    "｜DSML｜", "<|EOT|>", "Ünïcödé Ελληνικά Русский עברית العربية हिन्दी ไทย 한국어",
]  # fmt: skip
ALPHABET = list(" \t\n\r▁ab Zx09１２_-.,!?'\"<>/|｜日本語カタ・、。😀\u0301\u3000\u00a0é") + [
    " ",
    "  ",
    "<s>",
]


@pytest.fixture(scope="module")
def toks() -> dict:
    return {name: load_tokenizer(TOKENIZER_DIRS[name]) for name in NAMES}


@pytest.fixture(scope="module")
def encoders(toks: dict) -> dict:
    return {name: ft.fast_encoder(tok.backend_tokenizer) for name, tok in toks.items()}


def hf_ids(tok, texts: list[str]) -> list[list[int]]:
    return [tok(text, add_special_tokens=False)["input_ids"] for text in texts]


def corpus_texts(lang: str) -> list[str]:
    lines = CORPORA[lang].read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def test_real_tokenizers_take_the_fast_path(encoders: dict) -> None:
    assert encoders["mixtral"].kind.startswith("word cache, Metaspace")
    assert encoders["deepseek"].kind == "word cache, 3 regex split step(s), byte-level"


@pytest.mark.parametrize("lang", ["en", "ja"])
@pytest.mark.parametrize("name", NAMES)
def test_whole_corpus_documents_match_hf(toks: dict, encoders: dict, name: str, lang: str) -> None:
    """Every 4th document of the real corpus (whole documents, the longest included), twice: the
    second pass is served from the word cache."""
    texts = corpus_texts(lang)
    sample = texts[::4] + [max(texts, key=len)]
    expected = hf_ids(toks[name], sample)
    assert encoders[name].encode_batch(sample) == expected
    assert encoders[name].encode_batch(sample) == expected


@pytest.mark.parametrize("name", NAMES)
def test_adversarial_strings_match_hf(toks: dict, encoders: dict, name: str) -> None:
    texts = ADVERSARIAL + [a + b for a, b in zip(ADVERSARIAL, ADVERSARIAL[1:])]
    assert encoders[name].encode_batch(texts) == hf_ids(toks[name], texts)


@pytest.mark.parametrize("name", NAMES)
def test_random_strings_match_hf(toks: dict, encoders: dict, name: str) -> None:
    rng = random.Random(1234)
    texts = ["".join(rng.choices(ALPHABET, k=rng.randint(0, 30))) for _ in range(400)]
    assert encoders[name].encode_batch(texts) == hf_ids(toks[name], texts)


@pytest.mark.parametrize("name", NAMES)
def test_new_characters_and_cache_resets_stay_exact(toks: dict, name: str) -> None:
    """Batches bring characters never seen before (class memberships are measured again) while a tiny
    cache is emptied over and over."""
    encoder = ft.fast_encoder(toks[name].backend_tokenizer, max_cached_words=40)
    batches = [corpus_texts("en")[:5], corpus_texts("ja")[:5], ["emoji 😀 and Ελληνικά 123 ｜"]]
    for texts in batches:
        assert encoder.encode_batch(texts) == hf_ids(toks[name], texts)
        assert len(encoder.cache) <= 40
    if name == "deepseek":
        assert {"😀", "Ε", "日"} <= encoder.splitter.universe


@pytest.mark.parametrize("name", NAMES)
def test_lone_surrogate_fails_like_the_backend(toks: dict, encoders: dict, name: str) -> None:
    texts = ["fine", "bad \ud800 text"]
    with pytest.raises(Exception) as ours:
        encoders[name].encode_batch(texts)
    with pytest.raises(Exception) as theirs:
        toks[name].backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    assert type(ours.value) is type(theirs.value)


def tiny_metaspace_bpe(
    vocab_tokens: list[str], merges: list[tuple[str, str]], byte_fallback: bool = False
) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(vocab_tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=byte_fallback))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    return tok


def test_cut_is_refused_when_a_token_spans_the_boundary() -> None:
    """With a token "a▁b" the merge (a, ▁b) crosses a cut: cutting would change the ids, so the
    tokenizer keeps the Rust pipeline. Without that token the same tokenizer gets the fast path."""
    base = ["<unk>", "▁", "a", "b", "▁a", "▁b"]
    spanning = tiny_metaspace_bpe(base + ["a▁b"], [("▁", "b"), ("a", "▁b"), ("▁", "a")])
    encoder = ft.fast_encoder(spanning)
    assert isinstance(encoder, ft.BackendEncoder) and "token 'a▁b' spans" in encoder.kind
    whole = spanning.encode("a b", add_special_tokens=False).ids
    cut = [t.id for w in re.findall("▁*[^▁]+|▁+", "▁a▁b") for t in spanning.model.tokenize(w)]
    assert whole == [1, 6] and cut == [4, 5]  # cutting would be wrong here, so the check matters
    texts = ["a b", "ab ba", " a  b"]
    assert encoder.encode_batch(texts) == [spanning.encode(t, add_special_tokens=False).ids for t in texts]

    safe = tiny_metaspace_bpe(base, [("▁", "a"), ("▁", "b")])
    encoder = ft.fast_encoder(safe)
    assert encoder.kind.startswith("word cache")
    texts = ["a b", " aab  ba ", "ba▁a c"]
    assert encoder.encode_batch(texts) == [safe.encode(t, add_special_tokens=False).ids for t in texts]


@pytest.mark.parametrize("bytes_merge", [False, True])
def test_inert_characters_are_cut_out_exactly(bytes_merge: bool) -> None:
    """Characters found in no longer token never merge: runs of them are cut out and tokenized per
    character. With byte fallback that never merges, characters outside the vocabulary are inert too;
    a token holding a byte token ("<0x41>a") makes them ordinary characters."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "▁", "a", "b", "日", "本", "日本", "語", "▁a", *byte_tokens] + [
        "<0x41>a"
    ] * bytes_merge
    tok = tiny_metaspace_bpe(tokens, [("日", "本"), ("▁", "a")], byte_fallback=True)
    encoder = ft.fast_encoder(tok)
    assert encoder.kind.startswith("word cache, Metaspace")
    inert = encoder.splitter.is_inert
    assert (inert("語"), inert("日"), inert("▁"), inert("a"), inert("😀")) == (
        True,
        False,
        False,
        False,
        not bytes_merge,
    )
    texts = ["日本語", "a日本b", "日語本", "未知の文字 😀 a", "本日 日本 語語", " 語a語 ", "Aa <0x41>a"]
    assert encoder.encode_batch(texts) == [tok.encode(t, add_special_tokens=False).ids for t in texts]
    assert encoder.encode_batch(texts) == [tok.encode(t, add_special_tokens=False).ids for t in texts]


@pytest.fixture(scope="module")
def deepseek_copy(toks: dict) -> Tokenizer:
    return Tokenizer.from_str(toks["deepseek"].backend_tokenizer.to_str())


@pytest.fixture
def variant(deepseek_copy: Tokenizer):
    """DeepSeek's vocabulary and merges with other pipeline parts (restored after the test)."""
    tok = deepseek_copy
    saved = tok.normalizer, tok.pre_tokenizer
    yield tok
    tok.normalizer, tok.pre_tokenizer = saved
    tok.no_truncation()


def byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def test_removed_behaviour_string_patterns_and_class_escapes(variant: Tokenizer) -> None:
    variant.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\s\p{Lu}]+"), "removed"),
            pre_tokenizers.Split("-", "isolated"),
            pre_tokenizers.Split(Regex(r"\P{L}{2}"), "isolated"),
            byte_level(),
        ]
    )
    encoder = ft.fast_encoder(variant)
    assert encoder.kind == "word cache, 3 regex split step(s), byte-level"
    texts = ADVERSARIAL + ["Some-Words-With CAPS--and spaces", "ÉtÉ-été 12-34"]
    assert encoder.encode_batch(texts) == [variant.encode(t, add_special_tokens=False).ids for t in texts]


def test_empty_matches_are_left_to_the_rust_engine(variant: Tokenizer) -> None:
    """After an empty match Oniguruma resumes one character later, Python's `re` at the same place:
    `b*|ab` splits "ab" into a, b in Rust but keeps "ab" in Python. Such documents go to Rust."""
    split = pre_tokenizers.Split(Regex("b*|ab"), "isolated")
    assert [w for w, _ in split.pre_tokenize_str("xab")] == ["x", "a", "b"]
    variant.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level()])
    encoder = ft.fast_encoder(variant)
    assert encoder.kind.startswith("word cache")
    texts = ["xab", "abab", "bb", "b"]
    assert encoder.encode_batch(texts) == [variant.encode(t, add_special_tokens=False).ids for t in texts]


def truncate(tok: Tokenizer) -> None:
    tok.enable_truncation(8)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda tok: setattr(tok, "normalizer", normalizers.NFC()), "normalizer NFC"),
        (
            lambda tok: setattr(tok, "pre_tokenizer", pre_tokenizers.Split(Regex(r"\w+|."), "isolated")),
            "Ruby",
        ),
        (
            lambda tok: setattr(tok, "pre_tokenizer", pre_tokenizers.Split(" ", "merged_with_next")),
            "MergedWithNext",
        ),
        (lambda tok: setattr(tok, "pre_tokenizer", pre_tokenizers.ByteLevel(use_regex=True)), "use_regex"),
        (lambda tok: setattr(tok, "pre_tokenizer", byte_level()), "pre-tokenizer steps []"),
        (lambda tok: setattr(tok, "pre_tokenizer", None), "no pre-tokenizer"),
        (truncate, "truncation"),
    ],
)
def test_unsupported_tokenizers_keep_the_backend(variant: Tokenizer, change, reason: str) -> None:
    change(variant)
    encoder = ft.fast_encoder(variant)
    assert isinstance(encoder, ft.BackendEncoder) and reason in encoder.kind
    assert encoder.encode_batch(["Hello  world 123"]) == [variant.encode("Hello  world 123").ids]


def test_dropout_and_normalizers_refused_for_metaspace() -> None:
    tok = tiny_metaspace_bpe(["<unk>", "▁", "a"], [])
    tok.normalizer = normalizers.Lowercase()
    assert "normalizer Lowercase" in ft.fast_encoder(tok).kind
    tok = Tokenizer(models.BPE({"<unk>": 0, "▁": 1, "a": 2}, [], unk_token="<unk>", dropout=0.5))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(split=False)
    assert "dropout" in ft.fast_encoder(tok).kind


@pytest.mark.parametrize(
    "pattern",
    [
        r"\p{N}{1,3}",
        r"[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|\s+(?!\S)|\s+",
        r"(ab|c)+?x{2,}",
        r"[\-a-c\]]\x41\x{1F600}",
    ],
)
def test_translated_regex_splits_like_oniguruma(pattern: str) -> None:
    split = ft._SplitStep(ft.parse_onig(pattern), keep_matches=True)
    splitter = ft.RegexSplitter([split])
    texts = ADVERSARIAL + ["ab cab ccx xx xxx", "-a]b]A😀 1234567 ４５"]
    assert splitter.admit(texts)
    rust = pre_tokenizers.Split(Regex(pattern), "isolated")
    assert [splitter.words(t) for t in texts if t] == [
        [w for w, _ in rust.pre_tokenize_str(t)] for t in texts if t
    ]


@pytest.mark.parametrize(
    "pattern",
    [
        ".",
        "^a",
        "a$",
        r"\bword",
        "(?i)a",
        "(?<n>a)",
        "(?>a)",
        "a*+",
        "a{2}+",
        "[a[b]]",
        "[a&&b]",
        r"\1",
        r"\xe9",
        "[]a]",
        "[a-b-c]",
        r"[\s-z]",
    ],
)
def test_constructs_that_differ_between_engines_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"in '"):
        ft.parse_onig(pattern)


def test_added_token_scan_finds_overlapping_and_short_contents() -> None:
    scan = ft._AddedTokenScan(["x", "xy", "<｜a｜>", "｜D", ""])
    assert [scan.found(t) for t in ["zzx", "<｜D", "ab<｜a｜>", "xy"]] == [True, True, True, True]
    assert [scan.found(t) for t in ["", "<｜b", "<｜a|>", "abc"]] == [False, False, False, False]
    assert not ft._AddedTokenScan([]).found("anything")


def test_byte_level_table_is_gpt2s() -> None:
    table = ft.byte_level_table()
    assert len(set(table.values())) == 256 and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    ft._check_byte_level_table(table)
    with pytest.raises(ValueError, match="byte map"):
        ft._check_byte_level_table(table | {ord("a"): "b"})
