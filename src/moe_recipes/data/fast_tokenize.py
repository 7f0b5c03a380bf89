"""Exact, faster batch tokenization for `prepare`: a per-worker word cache in front of the Rust BPE.

Why: on long documents the `tokenizers` pipeline costs about 1-2 microseconds per pre-tokenized
word whatever the word (each word becomes a `NormalizedString` with per-byte alignments, is run
through every pre-tokenizer step, looked up in the BPE cache and turned into `Token`s with owned
strings), and with Metaspace(split=false) tokenizers (Mixtral, Llama 2) the whole document is one
BPE "word" of thousands of characters, merged with a heap every time. Profiling showed that changing
the Rust pipeline itself (an extra `Split` after Metaspace, a larger BPE cache) does not pay: the
per-word overhead it adds eats what the BPE cache saves. What pays is doing the word split here with
Python's C regex engine and looking each word up in a dict (word -> ids); only unseen words go to
the Rust model (`model.tokenize`), the very call the pipeline makes for each word.

Exactness, argued per tokenizer kind (anything not covered keeps the plain `encode_batch_fast`):

* Common conditions: no normalizer (or an empty `Sequence`), no truncation/padding, a post-processor
  that adds nothing with `add_special_tokens=False` (ids only change through added special tokens),
  a BPE model without dropout (so a word's ids are a pure function of the word). Documents that
  contain the text of any added token, and empty documents, go to the Rust pipeline unchanged.
* Metaspace(split=false), e.g. Mixtral: the pipeline turns the document into one word
  `r + text.replace(" ", r)` (r = "▁", prepended unless present) and BPE-merges it. We cut that word
  (`_metaspace_splitter`) before every run of r that follows a character other than r, and around
  every "inert" character. A BPE merge joins two adjacent symbols into a vocabulary token whose
  string contains both, so a merge across the first kind of cut needs a token with a non-r character
  (or the ">" of a byte-fallback token) directly followed by r -- the vocabulary has none (checked);
  an inert character is a single-character token found in no longer token or, with byte fallback
  whose byte tokens never merge (checked), a character found in no token at all, so no merge touches
  it. Merges never cross a cut, and those inside each piece happen exactly as inside the whole word
  (same pairs, same ranks, same left-to-right tie order); a run of inert characters is their ids one
  after the other. Byte fallback and unknown-token fusing act per character and never across r, which
  is in the vocabulary (checked). Continuing-subword prefixes, end-of-word suffixes and
  `ignore_merges` depend on word boundaries, so such models are refused.
* `Sequence` of `Split(Regex, Isolated|Removed)` steps optionally ending with ByteLevel(use_regex=false,
  add_prefix_space=false), e.g. DeepSeek: the words are the pipeline's own words, recomputed with an
  equivalent Python regex (`parse_onig`: the accepted Oniguruma subset has the same backtracking
  semantics in Python's `re`; Unicode classes such as `\\p{L}` or `\\s` are not taken from Python's
  Unicode tables, which lag or lead the Rust engine's by versions, but measured on the Rust engine
  itself for every character seen so far). A regex that matches the empty string sends the document
  to the Rust pipeline. The byte-level step is a fixed byte -> character map, checked against the
  Rust one for every byte that UTF-8 text can contain.

Finally `fast_encoder` encodes a set of awkward strings both ways and keeps the plain encoder if
anything differs, a guard against behaviour changes in future `tokenizers` releases.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any, Protocol

# Words kept in the cache before it is emptied and refilled: bounds memory (~300 bytes a word with its
# ids, so ~80 MB per worker); very long words (base64, minified code) are encoded but not kept.
MAX_CACHED_WORDS = 1 << 18
MAX_CACHED_WORD_CHARS = 128
_POST_PROCESSORS = {"TemplateProcessing", "ByteLevel", "BertProcessing", "RobertaProcessing"}
# Strings that exercise every rule above; `fast_encoder` checks the fast path against them.
SELF_CHECK_TEXTS = (
    " ", "  ", "a", " a", "a ", "  a  b   c ", "\t\ttab\tx", "\n\nnew\nline\r\n", "▁", "▁▁a", "a▁b",
    "a ▁ b", "x  ▁▁  y", "Hello, world! It's 2024-05-06 12:34:56.789", "1234567890", "über naïve café",
    "emoji 😀👍🏽 and 🇯🇵", "日本語のテキスト、カタカナ・ひらがな。漢字１２３", "混合 mixed テキスト123abc",
    "e\u0301 combining \u200b zero width \u00a0 nbsp \u3000 ideographic", "<<tags>> </nope> <s-like",
)  # fmt: skip


class BatchEncoder(Protocol):
    """What `prepare` needs: token ids of each text, without special tokens, in one thread."""

    kind: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


class BackendEncoder:
    """The plain path: the Rust pipeline's `encode_batch_fast`."""

    def __init__(self, backend: Any, kind: str = "backend"):
        self.backend = backend
        self.kind = kind

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]


class _Fallback(Exception):
    """This document must go through the Rust pipeline (internal control flow)."""


class _Unsupported(ValueError):
    """The tokenizer (or a regex in it) is outside what the fast path reproduces exactly."""


# ---------------------------------------------------------------------------------------------
# Oniguruma regex subset -> Python `re`
# ---------------------------------------------------------------------------------------------

_CLASS_LETTERS = frozenset("sSdDwWhH")
_CONTROL = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "e": "\x1b"}
_PROPERTY = re.compile(r"[pP]\{\^?[A-Za-z0-9_ ]+\}")
_INTERVAL = re.compile(r"\{(\d+)(,(\d*))?\}")
_GROUP_OPENERS = ("(?:", "(?=", "(?!", "(?<=", "(?<!")
_HEX = re.compile(r"x\{([0-9A-Fa-f]{1,6})\}|x([0-9A-Fa-f]{2})|u([0-9A-Fa-f]{4})")


@dataclass(frozen=True)
class CharClass:
    """A bracket class or class escape: literal code point ranges plus Oniguruma class escapes
    (`\\p{L}`, `\\s`, ...) whose members are measured on the Rust engine."""

    negated: bool
    ranges: tuple[tuple[int, int], ...]
    escapes: tuple[str, ...]


def _parse_escape(pattern: str, i: int) -> tuple[str, str | int, int]:
    """Escape at pattern[i] == "\\": ("class", escape, next) or ("char", code point, next)."""
    c = pattern[i + 1 : i + 2]
    if not c:
        raise _Unsupported(f"pattern {pattern!r} ends with a backslash")
    if c in _CLASS_LETTERS:
        return "class", "\\" + c, i + 2
    if c in "pP":
        m = _PROPERTY.match(pattern, i + 1)
        if not m:
            raise _Unsupported(f"unsupported property escape at {i} in {pattern!r}")
        return "class", "\\" + m.group(), m.end()
    if c in _CONTROL:
        return "char", ord(_CONTROL[c]), i + 2
    hexa = _HEX.match(pattern, i + 1)
    if hexa:
        value = int(next(g for g in hexa.groups() if g), 16)
        # Oniguruma reads \xHH >= 80 as a raw UTF-8 byte, Python as a code point: refused.
        if not (hexa.group(2) and value >= 0x80) and value <= 0x10FFFF and not 0xD800 <= value <= 0xDFFF:
            return "char", value, hexa.end()
    if c.isascii() and not c.isalnum():  # escaped punctuation or space: the character itself
        return "char", ord(c), i + 2
    raise _Unsupported(f"unsupported escape \\{c} at {i} in {pattern!r}")


def _parse_class(pattern: str, i: int) -> tuple[CharClass, int]:
    """Bracket class starting at pattern[i] == "["; nested classes, && and ambiguous "-" are refused."""
    start_at = i
    i += 1
    negated = pattern.startswith("^", i)
    i += negated
    first, ranges, escapes = i, [], []
    while i < len(pattern) and not (pattern[i] == "]" and i > first):
        c = pattern[i]
        if c in "[]" or pattern.startswith("&&", i):  # "]" here is a leading one: literal, but refused
            raise _Unsupported(f"nested class, leading ']' or && at {i} in {pattern!r}")
        if c == "-" and i != first and not pattern.startswith("]", i + 1):
            raise _Unsupported(f"ambiguous '-' at {i} in {pattern!r}")
        kind, value, i = _parse_escape(pattern, i) if c == "\\" else ("char", ord(c), i + 1)
        if kind == "class":
            if pattern.startswith("-", i) and not pattern.startswith("-]", i):
                raise _Unsupported(f"range from a class escape at {i} in {pattern!r}")
            escapes.append(str(value))
            continue
        low = high = int(value)
        if pattern.startswith("-", i) and not pattern.startswith("-]", i) and i + 1 < len(pattern):
            j = i + 1
            kind, value, i = (
                _parse_escape(pattern, j) if pattern[j] == "\\" else ("char", ord(pattern[j]), j + 1)
            )
            if kind != "char" or int(value) < low or pattern[j] == "[":
                raise _Unsupported(f"bad range at {j} in {pattern!r}")
            high = int(value)
        ranges.append((low, high))
    if i >= len(pattern) or (not ranges and not escapes):
        raise _Unsupported(f"unterminated or empty class at {start_at} in {pattern!r}")
    return CharClass(negated, tuple(ranges), tuple(escapes)), i + 1


def _parse_quantifier(pattern: str, i: int) -> tuple[str, int]:
    """`*`, `+`, `?` or an interval {n}, {n,}, {n,m}, optionally lazy; possessive forms refused."""
    if pattern[i] == "{":
        m = _INTERVAL.match(pattern, i)
        if not m:
            raise _Unsupported(f"unsupported brace at {i} in {pattern!r}")
        text, i = m.group(), m.end()
    else:
        text, i = pattern[i], i + 1
    if pattern.startswith("?", i):
        text, i = text + "?", i + 1
    if i < len(pattern) and pattern[i] in "*+?{":
        raise _Unsupported(f"possessive or stacked quantifier at {i} in {pattern!r}")
    return text, i


def parse_onig(pattern: str) -> list[str | CharClass]:
    """Parse an Oniguruma (Ruby syntax) regex into Python-syntax fragments and `CharClass`es.

    Only constructs whose meaning is the same in both engines are accepted: literals, escaped
    punctuation, control and hex escapes, bracket classes, class escapes (\\p{..}, \\s, \\d, \\w, \\h
    and their negations), groups, lookaround, alternation, greedy and lazy quantifiers. Anything else
    (., ^, $ -- which differ between Ruby and Python --, anchors, backreferences, inline flags, named
    or atomic groups, possessive quantifiers, nested classes) raises `_Unsupported`.
    """
    out: list[str | CharClass] = []
    i, atom = 0, False  # atom: the previous fragment can take a quantifier
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            kind, value, i = _parse_escape(pattern, i)
            out.append(CharClass(False, (), (str(value),)) if kind == "class" else re.escape(chr(int(value))))
        elif c == "[":
            cls, i = _parse_class(pattern, i)
            out.append(cls)
        elif c == "(":
            opener = next((g for g in _GROUP_OPENERS if pattern.startswith(g, i)), None)
            if opener is None and pattern.startswith("(?", i):
                raise _Unsupported(f"unsupported group at {i} in {pattern!r}")
            out.append(opener or "(?:")  # plain groups lose their capture: no backreferences here
            i += len(opener or "(")
        elif c in ")|":
            out.append(c)
            i += 1
        elif c in "*+?{":
            if not atom:
                raise _Unsupported(f"quantifier without operand at {i} in {pattern!r}")
            text, i = _parse_quantifier(pattern, i)
            out.append(text)
            atom = False
            continue
        elif c in ".^$":
            raise _Unsupported(f"{c!r} (different in Ruby and Python regexes) at {i} in {pattern!r}")
        else:
            out.append(re.escape(c))
            i += 1
        atom = out[-1] not in ("(?:", "(?=", "(?!", "(?<=", "(?<!", "|")
    return out


def _ranges(code_points: Iterable[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for cp in sorted(code_points):
        if runs and runs[-1][1] == cp - 1:
            runs[-1] = (runs[-1][0], cp)
        else:
            runs.append((cp, cp))
    return runs


def _python_class(runs: list[tuple[int, int]], negated: bool = False) -> str:
    """A Python bracket class of code point ranges; an empty set matches nothing (negated: anything)."""
    if not runs:
        return "[\\x00-\\U0010ffff]" if negated else "[^\\x00-\\U0010ffff]"
    body = "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in runs)
    return f"[{'^' if negated else ''}{body}]"


def _render_class(cls: CharClass, members: dict[str, set[str]]) -> str:
    """Python class for `cls`, exact on strings whose characters all have measured memberships."""
    cps = {ord(ch) for esc in cls.escapes for ch in members[esc]}
    return _python_class(list(cls.ranges) + _ranges(cps), cls.negated)


def probe_members(escape: str, chars: str) -> set[str]:
    """The characters of `chars` that the Rust engine's regex class `escape` matches.

    Measured with a `Split` pre-tokenizer (the engine the pipeline's `Split` uses) that removes runs of
    the class: what is not left over matched.
    """
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(f"(?:{escape})+"), behavior="removed")
    kept = "".join(piece for piece, _ in split.pre_tokenize_str(chars))
    return set(chars) - set(kept)


# ---------------------------------------------------------------------------------------------
# Word splitters: the pipeline's pre-tokenization, reproduced
# ---------------------------------------------------------------------------------------------


@dataclass
class _SplitStep:
    """One Split(Regex or String, Isolated|Removed) pre-tokenizer step."""

    fragments: list[str | CharClass]
    keep_matches: bool  # Isolated keeps the matches as words, Removed drops them
    split: Callable[[str], list[str]] | None = None


class RegexSplitter:
    """Words of a `Sequence` of Split steps, with Python regexes rebuilt as new characters appear."""

    def __init__(self, steps: list[_SplitStep]):
        self.steps = steps
        self.escapes = {e for s in steps for f in s.fragments if isinstance(f, CharClass) for e in f.escapes}
        self.members: dict[str, set[str]] = {esc: set() for esc in self.escapes}
        self.universe: set[str] = set()
        self._compile()

    def admit(self, texts: list[str]) -> bool:
        """Measure class memberships of characters not seen before; False if a text holds a lone
        surrogate (the Rust pipeline must raise its own error for it)."""
        new = set().union(*texts) - self.universe
        if not new:
            return True
        if any("\ud800" <= ch <= "\udfff" for ch in new):
            return False
        probe = "".join(sorted(new))
        for esc in self.escapes:
            self.members[esc] |= probe_members(esc, probe)
        self.universe |= new
        self._compile()
        return True

    def _compile(self) -> None:
        for step in self.steps:
            parts = [f if isinstance(f, str) else _render_class(f, self.members) for f in step.fragments]
            step.split = re.compile("(" + "".join(parts) + ")").split

    def words(self, text: str) -> list[str]:
        pieces = [text]
        for step in self.steps:
            split, keep, out = step.split, step.keep_matches, []
            assert split is not None
            for piece in pieces:
                parts = split(piece)
                if len(parts) == 1:
                    out.append(piece)
                    continue
                if "" in parts[1::2]:
                    raise _Fallback  # an empty match: leave the Rust engine's handling to it
                out.extend(filter(None, parts if keep else parts[::2]))
            pieces = out
        return pieces


def _class(chars: Iterable[str], negated: bool = False) -> str:
    return _python_class(_ranges(map(ord, chars)), negated)


class MetaspaceSplitter:
    """Metaspace(split=false) normalisation, then the text cut into runs of inert characters and
    runs of other characters (those with the replacement-character runs in front of them).

    Inert characters (see `_metaspace_splitter`) never take part in a BPE merge, so a run of them is
    tokenized character by character: `WordCacheEncoder` builds its ids from per-character ids.
    """

    def __init__(self, replacement: str, prepend: bool, mergeable: set[str], inert_chars: set[str] | None):
        """`mergeable`: characters of multi-character tokens; `inert_chars`: the inert characters, or
        None when every character outside `mergeable` is inert."""
        self.replacement, self.prepend = replacement, prepend
        r = re.escape(replacement)
        if inert_chars is None:
            inert, other = _class(mergeable, negated=True), _class(mergeable - {replacement})
            self.is_inert: Callable[[str], bool] = lambda ch: ch not in mergeable
        else:
            inert, other = _class(inert_chars), _class(inert_chars | {replacement}, negated=True)
            self.is_inert = inert_chars.__contains__
        self._findall = re.compile(f"{inert}+|{r}*{other}+|{r}+").findall

    def admit(self, texts: list[str]) -> bool:
        return True

    def words(self, text: str) -> list[str]:
        r = self.replacement
        norm = text.replace(" ", r)
        if self.prepend and not norm.startswith(r):
            norm = r + norm
        return self._findall(norm)


def byte_level_table() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by the ByteLevel pre-tokenizer, keyed for
    `str.translate` on the word's UTF-8 bytes decoded as Latin-1."""
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def _check_byte_level_table(table: dict[int, str]) -> None:
    """Compare `table` with the Rust ByteLevel pre-tokenizer on text holding every byte value that
    UTF-8 can contain (ASCII, all 2-byte sequences, one character per 3- and 4-byte lead byte)."""
    from tokenizers import pre_tokenizers

    lead_bytes = [0x800, *(n << 12 for n in range(1, 16)), 0x10000, 0x40000, 0x80000, 0xC0000, 0x100000]
    text = "".join(map(chr, range(0x800))) + "".join(map(chr, lead_bytes))
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    if "".join(p for p, _ in pieces) != text.encode("utf-8").decode("latin-1").translate(table):
        raise _Unsupported("the ByteLevel byte map differs from GPT-2's")


class _AddedTokenScan:
    """Finds whether a text contains the content of any added token (those are matched before
    normalisation and pre-tokenization, so such documents keep the Rust pipeline)."""

    def __init__(self, contents: Iterable[str]):
        self.by_prefix: dict[str, list[str]] = {}  # first two characters (or the one) -> contents
        for content in filter(None, set(contents)):
            self.by_prefix.setdefault(content[:2], []).append(content)
        prefixes = "|".join(re.escape(p) for p in self.by_prefix)
        self._search = re.compile(prefixes).search if prefixes else None

    def found(self, text: str) -> bool:
        if self._search is None:
            return False
        pos, get = 0, self.by_prefix.get
        while (m := self._search(text, pos)) is not None:
            start = m.start()  # candidates: contents starting with the 2 or the 1 character(s) here
            for content in get(text[start : start + 2], []) + get(text[start], []):
                if text.startswith(content, start):
                    return True
            pos = start + 1  # occurrences may overlap
        return False


class WordCacheEncoder:
    """Splits texts into the pipeline's words here, caches each word's ids, asks the Rust model only
    for unseen words, and hands the documents it cannot reproduce (empty, holding an added token's
    text, an empty regex match or a lone surrogate) to the Rust pipeline."""

    def __init__(self, backend: Any, splitter: RegexSplitter | MetaspaceSplitter, byte_level: bool,
                 kind: str, max_cached_words: int = MAX_CACHED_WORDS):  # fmt: skip
        self.backend, self.splitter, self.kind = backend, splitter, kind
        self.model = backend.model
        self.byte_table = byte_level_table() if byte_level else None
        self.added = _AddedTokenScan(t.content for t in backend.get_added_tokens_decoder().values())
        self.max_cached_words = max_cached_words
        self.cache: dict[str, tuple[int, ...]] = {}
        self.char_cache: dict[str, tuple[int, ...]] = {}  # inert characters only: a bounded set
        self.is_inert: Callable[[str], bool] | None = getattr(splitter, "is_inert", None)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not self.splitter.admit(texts):
            return BackendEncoder(self.backend).encode_batch(texts)
        out: list[list[int]] = []
        rust: list[int] = []  # indices of documents left to the Rust pipeline
        words, found, get, miss = self.splitter.words, self.added.found, self.cache.get, self._miss
        for index, text in enumerate(texts):
            try:
                if not text or found(text):
                    raise _Fallback
                ids: list[int] = []
                for word in words(text):
                    cached = get(word)
                    ids += miss(word) if cached is None else cached
            except _Fallback:
                rust.append(index)
                ids = []
            out.append(ids)
        for index in rust:  # one by one: `encode` never starts the Rust thread pool
            out[index] = self.backend.encode(texts[index], add_special_tokens=False).ids
        return out

    def _inert_run_ids(self, word: str) -> tuple[int, ...]:
        """Ids of a run of inert characters: each character's own ids, one after the other."""
        parts = list(map(self.char_cache.get, word))
        if None in parts:
            for ch in set(word) - self.char_cache.keys():
                self.char_cache[ch] = tuple(token.id for token in self.model.tokenize(ch))
            parts = list(map(self.char_cache.__getitem__, word))
        return tuple(chain.from_iterable(parts))

    def _miss(self, word: str) -> tuple[int, ...]:
        """Ids of an unseen word from the Rust model, as the pipeline computes them."""
        try:
            data = word.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: the Rust pipeline raises its own error
            raise _Fallback from None
        if self.is_inert is not None and self.is_inert(word[0]):  # an inert run: no merges inside
            ids = self._inert_run_ids(word)
        else:
            piece = data.decode("latin-1").translate(self.byte_table) if self.byte_table is not None else word
            ids = tuple(token.id for token in self.model.tokenize(piece))
        if len(word) <= MAX_CACHED_WORD_CHARS:
            if len(self.cache) >= self.max_cached_words:
                self.cache.clear()
            self.cache[word] = ids
        return ids


# ---------------------------------------------------------------------------------------------
# Which tokenizers qualify
# ---------------------------------------------------------------------------------------------


def _state(component: Any) -> dict[str, Any] | None:
    return None if component is None else json.loads(component.__getstate__())


def _check_common(backend: Any) -> None:
    """Conditions shared by both fast paths (see the module docstring); raises `_Unsupported`."""
    normalizer = _state(backend.normalizer)
    if normalizer is not None and normalizer != {"type": "Sequence", "normalizers": []}:
        raise _Unsupported(f"normalizer {normalizer.get('type')}")
    post = _state(backend.post_processor)
    kinds = [] if post is None else [p["type"] for p in post.get("processors", [post])]
    if any(k not in _POST_PROCESSORS for k in kinds):
        raise _Unsupported(f"post-processor {kinds}")
    if backend.truncation is not None or backend.padding is not None:
        raise _Unsupported("truncation or padding is enabled")
    model = backend.model
    if type(model).__name__ != "BPE":
        raise _Unsupported(f"model {type(model).__name__}")
    if model.dropout not in (None, 0.0):
        raise _Unsupported(f"BPE dropout {model.dropout}")


def _metaspace_splitter(backend: Any, replacement: str, prepend: bool) -> MetaspaceSplitter:
    """A `MetaspaceSplitter` whose cuts cannot change the BPE result (module docstring), or
    `_Unsupported`. Cuts fall before every run of `replacement` that follows a non-inert character,
    which needs a vocabulary without a token holding a character directly followed by `replacement`,
    and around every inert character: a single-character token found in no longer token or, with
    byte fallback whose 256 byte tokens never merge (no other token contains "<0x"), a character
    found in no token at all. A merge joins two symbols into a token containing both, so no merge
    can touch an inert character's symbols or cross any cut."""
    model = backend.model
    if model.continuing_subword_prefix or model.end_of_word_suffix or model.ignore_merges:
        raise _Unsupported("BPE with continuing_subword_prefix, end_of_word_suffix or ignore_merges")
    if model.unk_token and replacement in model.unk_token:
        raise _Unsupported(f"unk_token {model.unk_token!r} contains {replacement!r}")
    vocab = backend.get_vocab(with_added_tokens=False)
    if replacement not in vocab:
        raise _Unsupported(f"{replacement!r} is not in the vocabulary")
    r = re.escape(replacement)
    crossing = re.compile(f"[^{r}]{r}")
    bad = next((token for token in vocab if crossing.search(token)), None)
    if bad is not None:
        raise _Unsupported(f"vocabulary token {bad!r} spans a character followed by {replacement!r}")
    mergeable = set().union(*(token for token in vocab if len(token) > 1))
    byte_tokens = {f"<0x{b:02X}>" for b in range(256)}
    bytes_inert = (
        model.byte_fallback
        and byte_tokens <= vocab.keys()
        and not any("<0x" in token for token in vocab if token not in byte_tokens)
    )
    inert_chars = None if bytes_inert else {token for token in vocab if len(token) == 1} - mergeable
    return MetaspaceSplitter(replacement, prepend, mergeable, inert_chars)


def _split_step(state: dict[str, Any]) -> _SplitStep:
    if state.get("invert") or state.get("behavior") not in ("Isolated", "Removed"):
        raise _Unsupported(f"Split with behavior {state.get('behavior')}, invert {state.get('invert')}")
    pattern = state["pattern"]
    fragments = parse_onig(pattern["Regex"]) if "Regex" in pattern else [re.escape(pattern["String"])]
    return _SplitStep(fragments, keep_matches=state["behavior"] == "Isolated")


def _splitter_for(backend: Any) -> tuple[RegexSplitter | MetaspaceSplitter, bool, str]:
    """(splitter, byte_level, description) reproducing the backend's pre-tokenizer exactly."""
    state = _state(backend.pre_tokenizer)
    if state is None:
        raise _Unsupported("no pre-tokenizer (one word per document)")
    if state["type"] == "Metaspace":
        scheme = state.get("prepend_scheme", "always" if state.get("add_prefix_space", True) else "never")
        if state.get("split", True) or scheme not in ("always", "first", "never"):
            raise _Unsupported(f"Metaspace split={state.get('split')} prepend_scheme={scheme}")
        splitter = _metaspace_splitter(backend, state["replacement"], prepend=scheme != "never")
        return splitter, False, "word cache, Metaspace text cut at replacement runs and inert characters"
    steps = state["pretokenizers"] if state["type"] == "Sequence" else [state]
    byte_level = steps[-1]["type"] == "ByteLevel"
    if byte_level:
        last = steps.pop()
        if last.get("add_prefix_space") or last.get("use_regex"):
            raise _Unsupported("ByteLevel with add_prefix_space or use_regex")
        _check_byte_level_table(byte_level_table())
    if not steps or any(s["type"] != "Split" for s in steps):
        raise _Unsupported(f"pre-tokenizer steps {[s['type'] for s in steps]}")
    splitter = RegexSplitter([_split_step(s) for s in steps])
    return splitter, byte_level, f"word cache, {len(steps)} regex split step(s)" + ", byte-level" * byte_level


def fast_encoder(backend: Any, max_cached_words: int = MAX_CACHED_WORDS) -> BatchEncoder:
    """The fastest exact encoder for the `tokenizers.Tokenizer` `backend`.

    A `WordCacheEncoder` when the module docstring's conditions hold and it agrees with the backend
    on `SELF_CHECK_TEXTS`; otherwise a `BackendEncoder` whose `kind` names the reason. The backend
    itself is never modified.
    """
    try:
        _check_common(backend)
        splitter, byte_level, kind = _splitter_for(backend)
        encoder = WordCacheEncoder(backend, splitter, byte_level, kind, max_cached_words)
        texts = list(SELF_CHECK_TEXTS)
        if encoder.encode_batch(texts) != [backend.encode(t, add_special_tokens=False).ids for t in texts]:
            raise _Unsupported("disagrees with the Rust pipeline on the self-check texts")
        encoder.cache.clear()
    except Exception as err:  # whatever goes wrong here, the plain encoder is always right
        return BackendEncoder(backend, kind=f"backend ({err})")
    return encoder
