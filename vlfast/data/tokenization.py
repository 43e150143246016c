"""WordPiece tokenization on the ``tokenizers`` library.

* :func:`load_wordpiece` -- a BERT ``vocab.txt`` (uncased by default: BERT's
  normalizer lowercases and strips accents) -> :class:`VLTokenizer`.
* :func:`build_vocab` / :meth:`VLTokenizer.for_synthetic` -- a small vocab built on the
  fly: ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4``, then the words of the texts
  (most frequent first, ties alphabetical), then every character seen as a word and as a
  ``##`` continuation, so an unseen word splits into characters instead of ``[UNK]``.
* :meth:`VLTokenizer.save` / :meth:`VLTokenizer.from_dir` -- ``vocab.txt`` plus
  ``tokenizer_config.json`` (``do_lower_case``; the HF BertTokenizer layout), written
  atomically, to sit beside a checkpoint.

Encodings are BERT's: ``[CLS] a [SEP]`` and ``[CLS] a [SEP] b [SEP]`` (token types 0 for
the first segment with its [CLS]/[SEP], 1 for the second).  ``max_len`` counts the
special tokens; longer texts are cut at the end (pairs: longest first, ties from b).
"""
from __future__ import annotations

import bisect
import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

__all__ = ["VLTokenizer", "load_wordpiece", "build_vocab", "SPECIAL_TOKENS", "VOCAB_NAME",
           "CONFIG_NAME"]

PathLike = Union[str, os.PathLike]
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_NAME = "vocab.txt"
CONFIG_NAME = "tokenizer_config.json"
# BERT's reserved slots ("[unused0]" ...) and other bracketed placeholders
_PLACEHOLDER = re.compile(r"\[[A-Za-z0-9_]+\]")


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _normalizer(lowercase: bool) -> normalizers.Normalizer:
    # strip_accents=None: BERT's rule (strip when lowercasing, keep otherwise)
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                      strip_accents=None, lowercase=lowercase)


class VLTokenizer:
    """A BERT WordPiece tokenizer over ``vocab`` (a list of tokens, id = position).

    The five special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` must be in the vocab; they
    are never split when they appear in a text.
    """

    def __init__(self, vocab: Sequence[str], lowercase: bool = True) -> None:
        vocab = list(vocab)
        index: dict[str, int] = {}
        for i, t in enumerate(vocab):
            if not isinstance(t, str) or not t or t != t.strip() or "\n" in t:
                raise ValueError(f"VLTokenizer: vocab: token {i} must be a non-empty string without "
                                 f"surrounding whitespace, got {t!r}")
            if t in index:
                raise ValueError(f"VLTokenizer: vocab: token {t!r} appears twice (ids {index[t]} and {i})")
            index[t] = i
        missing = [s for s in SPECIAL_TOKENS if s not in index]
        if missing:
            raise ValueError(f"VLTokenizer: vocab: expected the special tokens {list(SPECIAL_TOKENS)}, "
                             f"missing {missing}")
        self._vocab = vocab
        self._index = index
        self.lowercase = bool(lowercase)
        tok = Tokenizer(models.WordPiece(vocab=index, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = _normalizer(self.lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
        self._tok = tok
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (index[s] for s in SPECIAL_TOKENS)
        placeholders = [i for i, t in enumerate(vocab) if _PLACEHOLDER.fullmatch(t)]
        #: ids of the special tokens and of every bracketed placeholder ("[unused0]" ...)
        self.special_ids: frozenset[int] = frozenset(placeholders) | {index[s] for s in SPECIAL_TOKENS}
        low = max(self.special_ids) + 1
        if low >= len(vocab):
            raise ValueError("VLTokenizer: vocab: no ordinary token after the special tokens")
        #: ids for MLM's random replacement: every id after the last special/placeholder
        #: token (BERT: 999..30521; the synthetic vocab: 5..V-1)
        self.random_token_ids: range = range(low, len(vocab))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_vocab_file(cls, vocab_path: PathLike, lowercase: bool = True) -> "VLTokenizer":
        """Read a ``vocab.txt`` (one token per line; id = line number)."""
        p = Path(vocab_path)
        if not p.is_file():
            raise FileNotFoundError(f"VLTokenizer.from_vocab_file: vocab_path: no file at {p}")
        lines = p.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
        for i, ln in enumerate(lines):
            if not ln.strip():
                raise ValueError(f"VLTokenizer.from_vocab_file: {p}: line {i + 1} is empty")
        return cls(lines, lowercase=lowercase)

    @classmethod
    def from_dir(cls, directory: PathLike) -> "VLTokenizer":
        """Load what :meth:`save` wrote (``vocab.txt`` and ``tokenizer_config.json``;
        without the config, the vocab is taken as uncased)."""
        d = Path(directory)
        if not (d / VOCAB_NAME).is_file():
            raise FileNotFoundError(f"VLTokenizer.from_dir: no {VOCAB_NAME} in {d}")
        lowercase = True
        if (d / CONFIG_NAME).is_file():
            cfg = json.loads((d / CONFIG_NAME).read_text(encoding="utf-8"))
            lowercase = bool(cfg.get("do_lower_case", True))
        return cls.from_vocab_file(d / VOCAB_NAME, lowercase=lowercase)

    @classmethod
    def for_synthetic(cls, world: Any) -> "VLTokenizer":
        """The small vocab of a :class:`~vlfast.data.synthetic.SyntheticWorld`: specials
        plus the world's whole lexicon (every word its generator can write)."""
        lex = getattr(world, "lexicon", None)
        if lex is None:
            raise TypeError(f"VLTokenizer.for_synthetic: world: expected an object with .lexicon "
                            f"(a SyntheticWorld), got {type(world).__name__}")
        return cls(build_vocab(lex), lowercase=True)

    def save(self, directory: PathLike) -> Path:
        """Write ``vocab.txt`` and ``tokenizer_config.json`` into ``directory`` (atomically)."""
        d = Path(directory)
        _atomic_write_text(d / VOCAB_NAME, "".join(t + "\n" for t in self._vocab))
        cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase,
               "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
               "cls_token": "[CLS]", "mask_token": "[MASK]"}
        _atomic_write_text(d / CONFIG_NAME, json.dumps(cfg, indent=2) + "\n")
        return d

    # ------------------------------------------------------------------ vocab
    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def __len__(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> list[str]:
        """The tokens, id = position (a copy)."""
        return list(self._vocab)

    @property
    def special(self) -> dict[str, int]:
        """``{"[PAD]": id, "[UNK]": id, "[CLS]": id, "[SEP]": id, "[MASK]": id}``."""
        return {s: self._index[s] for s in SPECIAL_TOKENS}

    @property
    def tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (adds no special tokens itself)."""
        return self._tok

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        return [self._index.get(t, self.unk_id) for t in tokens]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._vocab):
                raise ValueError(f"VLTokenizer.convert_ids_to_tokens: id {i} outside [0, {len(self._vocab)})")
            out.append(self._vocab[i])
        return out

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def _check_text(text: Any, what: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"VLTokenizer.{what}: text: expected str, got {type(text).__name__}")

    @staticmethod
    def _check_max_len(max_len: Optional[int], least: int, what: str) -> None:
        if max_len is not None and (not isinstance(max_len, int) or max_len < least):
            raise ValueError(f"VLTokenizer.{what}: max_len: expected None or an int >= {least}, "
                             f"got {max_len!r}")

    def tokenize(self, text: str) -> list[str]:
        """Wordpieces of ``text`` (no special tokens added)."""
        self._check_text(text, "tokenize")
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, max_len: Optional[int] = None) -> list[int]:
        """``[CLS] wordpieces [SEP]`` ids, at most ``max_len`` long (cut at the end)."""
        self._check_text(text, "encode")
        self._check_max_len(max_len, 2, "encode")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if max_len is not None:
            ids = ids[:max_len - 2]
        return [self.cls_id] + ids + [self.sep_id]

    def encode_batch(self, texts: Sequence[str], max_len: Optional[int] = None) -> list[list[int]]:
        """:meth:`encode` of each text (tokenized in parallel by ``tokenizers``)."""
        texts = list(texts)
        for t in texts:
            self._check_text(t, "encode_batch")
        self._check_max_len(max_len, 2, "encode_batch")
        cut = None if max_len is None else max_len - 2
        return [[self.cls_id] + e.ids[:cut] + [self.sep_id]
                for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_pair(self, text_a: str, text_b: str,
                    max_len: Optional[int] = None) -> tuple[list[int], list[int]]:
        """``[CLS] a [SEP] b [SEP]`` -> (ids, token_type_ids); when longer than
        ``max_len``, tokens are removed from the end of the longer segment (of b on ties)."""
        self._check_text(text_a, "encode_pair")
        self._check_text(text_b, "encode_pair")
        self._check_max_len(max_len, 3, "encode_pair")
        a = self._tok.encode(text_a, add_special_tokens=False).ids
        b = self._tok.encode(text_b, add_special_tokens=False).ids
        if max_len is not None:
            budget = max_len - 3
            extra = len(a) + len(b) - budget
            if extra > 0:
                # longest first, one token at a time, ties from b -- in closed form: cut the
                # longer down to the other's length, then b loses ceil(rest/2), a floor(rest/2)
                la, lb = len(a), len(b)
                if la > lb:
                    t = min(extra, la - lb)
                    la -= t
                else:
                    t = min(extra, lb - la)
                    lb -= t
                extra -= t
                la, lb = la - extra // 2, lb - (extra + 1) // 2
                a, b = a[:la], b[:lb]
        ids = [self.cls_id] + a + [self.sep_id] + b + [self.sep_id]
        return ids, [0] * (len(a) + 2) + [1] * (len(b) + 1)

    def encode_with_word_ids(self, text: str, max_len: Optional[int] = None) -> tuple[list[int], list[int]]:
        """:meth:`encode` plus, per token, the index of its whitespace-separated word in
        ``text.split()`` (-1 for [CLS]/[SEP]).  Lets word-level annotations (the synthetic
        world's word-region alignments) follow the wordpieces."""
        self._check_text(text, "encode_with_word_ids")
        self._check_max_len(max_len, 2, "encode_with_word_ids")
        enc = self._tok.encode(text, add_special_tokens=False)
        starts = [m.start() for m in re.finditer(r"\S+", text)]
        wid = [bisect.bisect_right(starts, s) - 1 for s, _ in enc.offsets]
        ids = enc.ids
        if max_len is not None:
            ids, wid = ids[:max_len - 2], wid[:max_len - 2]
        return [self.cls_id] + ids + [self.sep_id], [-1] + wid + [-1]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids`` (wordpieces joined; special tokens dropped unless asked)."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < len(self._vocab):
                raise ValueError(f"VLTokenizer.decode: id {i} outside [0, {len(self._vocab)})")
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def __repr__(self) -> str:
        return f"VLTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase})"


def load_wordpiece(vocab_path: PathLike, lowercase: bool = True) -> VLTokenizer:
    """A BERT WordPiece tokenizer from ``vocab.txt`` (e.g. the offline BERT's:
    ``vlfast.models.base.bert_checkpoint_dir() / "vocab.txt"``)."""
    return VLTokenizer.from_vocab_file(vocab_path, lowercase=lowercase)


def build_vocab(texts: Iterable[str], lowercase: bool = True, min_freq: int = 1) -> list[str]:
    """A WordPiece vocab for ``texts``: the special tokens (``[PAD]=0 [UNK]=1 [CLS]=2
    [SEP]=3 [MASK]=4``), the words (split as BERT does: whitespace and punctuation) seen
    at least ``min_freq`` times, most frequent first (ties alphabetical), then each
    character seen, alone and as ``##c``."""
    if not isinstance(min_freq, int) or min_freq < 1:
        raise ValueError(f"build_vocab: min_freq: expected an int >= 1, got {min_freq!r}")
    norm, pre = _normalizer(lowercase), pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"build_vocab: texts[{i}]: expected str, got {type(t).__name__}")
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    for s in SPECIAL_TOKENS:
        counts.pop(s, None)
    words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
    chars = sorted({ch for w in counts for ch in w})
    vocab = list(SPECIAL_TOKENS) + words
    have = set(vocab)
    for piece in chars + ["##" + ch for ch in chars]:
        if piece not in have:
            vocab.append(piece)
            have.add(piece)
    return vocab
