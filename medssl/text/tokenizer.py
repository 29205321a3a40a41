"""A WordPiece tokenizer fitted on training reports (Hugging Face `tokenizers`), serialisable to a str.

BERT-style: lower case and accents stripped (`BertNormalizer`), split on white space and
punctuation (`BertPreTokenizer`), "##" continuation pieces, "[CLS] text [SEP]" around every text,
special tokens SPECIAL_TOKENS with ids 0..4 ([PAD] is 0).

Deterministic: `tokenizers`' trainer breaks ties between equally frequent merges by token id, and
gives the characters their ids in hash-map order, which changes from one process (even one call)
to the next. `fit` therefore hands the trainer every character and "##" character of the corpus,
sorted, as its first tokens, so every id and every merge is a function of the texts alone; the
fitted vocabulary is then rebuilt into a tokenizer whose only special tokens are SPECIAL_TOKENS.
The vocabulary may exceed `vocab_size` when the corpus has more characters than that (as with the
library's own trainer, the alphabet is always kept).

The tokenizer also keeps the whole words (normalised pre-tokens with a letter) of the fitting
texts, so `unknown_words` can tell which words of a phrase it never saw.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from medssl.errors import UserError, one_line

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
FORMAT = "medssl-wordpiece/1"


def _check_texts(texts: object, what: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise UserError(f"{what}: expected a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(f"{what}: item {i} is a {type(text).__name__}, not a string")
    return texts


def _pipeline(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


class ReportTokenizer:
    """WordPiece tokenizer + the set of whole words it was fitted on. Build with `fit` or `from_str`."""

    def __init__(self, tokenizer: Tokenizer, words: Iterable[str]) -> None:
        self._tokenizer = tokenizer
        self.known_words: frozenset[str] = frozenset(words)
        ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise UserError(f"text tokenizer: special tokens {SPECIAL_TOKENS} must have ids 0..4, got {ids}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = ids

    # ------------------------------------------------------------------ fitting and serialisation
    @classmethod
    def fit(cls, texts: Iterable[str], *, vocab_size: int = 512, min_frequency: int = 2) -> ReportTokenizer:
        """Fit WordPiece on `texts` (vocabulary of about `vocab_size` tokens; a merge needs
        `min_frequency` occurrences). The same texts give the same tokenizer, in any process."""
        texts = _check_texts(texts, "text tokenizer")
        if not any(text.strip() for text in texts):
            raise UserError("text tokenizer: no text to fit on (every training report is empty)")
        if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
            raise UserError(f"text.vocab_size: must be an integer above {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise UserError(f"text.min_frequency: must be a positive integer, got {min_frequency!r}")
        base = _pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")))
        words = sorted({word for text in texts for word in _words(base, text, letters_only=False)})
        chars = sorted({char for word in words for char in word})
        seeded = list(SPECIAL_TOKENS) + chars + ["##" + char for char in chars]
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=seeded,
                                            continuing_subword_prefix="##", show_progress=False)
        base.train_from_iterator(texts, trainer=trainer)
        vocab = base.get_vocab()
        wordpiece = models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##")
        tokenizer = _pipeline(Tokenizer(wordpiece))
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return cls(tokenizer, [word for word in words if any(char.isalpha() for char in word)])

    def to_str(self) -> str:
        """The tokenizer as a JSON string (a plain str, safe for `torch.load(weights_only=True)`)."""
        return json.dumps({"format": FORMAT, "tokenizer": json.loads(self._tokenizer.to_str()),
                           "words": sorted(self.known_words)}, sort_keys=True)

    @classmethod
    def from_str(cls, text: str) -> ReportTokenizer:
        """Rebuild a tokenizer from `to_str()`; anything else is a UserError."""
        if not isinstance(text, str):
            raise UserError(f"text tokenizer: expected the tokenizer's JSON string, got {type(text).__name__}")
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"text tokenizer: not valid JSON ({err.msg} at char {err.pos})") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise UserError(f"text tokenizer: expected format {FORMAT!r}, got {found!r}")
        try:
            tokenizer = Tokenizer.from_str(json.dumps(payload["tokenizer"]))
            words = [str(word) for word in payload["words"]]
        except Exception as err:  # noqa: BLE001 - `tokenizers` raises a bare Exception for a bad tokenizer
            raise UserError(f"text tokenizer: cannot rebuild the tokenizer ({one_line(err)})") from None
        return cls(tokenizer, words)

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        """Number of token ids (the size of an embedding table)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def tokens(self, text: str) -> list[str]:
        """The word pieces of `text`, with [CLS] and [SEP]."""
        return self._tokenizer.encode(_check_texts([text], "text")[0]).tokens

    def encode_batch(self, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids `(B, L)` long and mask `(B, L)` bool (True for a real token), padded with [PAD]
        to the longest text, L <= max_tokens; a longer text is cut and still ends with [SEP]."""
        texts = _check_texts(texts, "text")
        if not texts:
            raise UserError("text: nothing to encode (an empty list of phrases)")
        if not isinstance(max_tokens, int) or max_tokens < 2:
            raise UserError(f"text.max_tokens: must be an integer >= 2 ([CLS] and [SEP]), got {max_tokens!r}")
        rows = []
        for text in texts:  # one by one: no thread pool, so forked data-loader workers stay quiet
            ids = self._tokenizer.encode(text).ids
            rows.append(ids if len(ids) <= max_tokens else ids[:max_tokens - 1] + [self.sep_id])
        length = max(len(row) for row in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = True
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens dropped (lower case, as normalised)."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def words(self, text: str) -> list[str]:
        """The whole words of `text` as the tokenizer sees them (normalised; pre-tokens with a letter)."""
        return _words(self._tokenizer, _check_texts([text], "text")[0], letters_only=True)

    def unknown_words(self, text: str) -> list[str]:
        """Words of `text` never seen while fitting, in order, each once. Numbers and punctuation
        are never unknown (digits are in every vocabulary)."""
        unknown: list[str] = []
        for word in self.words(text):
            if word not in self.known_words and word not in unknown:
                unknown.append(word)
        return unknown


def _words(tokenizer: Tokenizer, text: str, *, letters_only: bool) -> list[str]:
    normalised = tokenizer.normalizer.normalize_str(text)
    words = [word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalised)]
    return [word for word in words if any(char.isalpha() for char in word)] if letters_only else words
