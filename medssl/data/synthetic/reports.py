"""The report grammar of the synthetic hospital, as data, and the report writer.

`GRAMMAR` holds the organ names and their report wording, the lesion kinds per organ, the location
words and the sentence templates: `finding_templates` and `normal_templates` are the phrasings the
generated reports use; `held_out_finding_templates`, `held_out_normal_templates` and
`held_out_organ_prompts` are phrasings that no generated report ever uses, so that report grounding can
be tested on unseen wording (`finding_sentence(..., template=...)` renders any template).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReportGrammar:
    """Words and templates of synthetic reports. Template fields: {a_num} article of the size, {size} mm,
    {kind}, {a_kind} article of the kind, {where} "<location> <organ text>", {organ} organ text,
    {loc} location words."""

    organ_text: dict[str, str]  # label name -> report wording
    lesion_kinds: dict[str, tuple[str, ...]]  # organ label name -> lesion kinds it can hold
    location_words: tuple[str, ...]  # a lesion's place in its organ: up to two of these, or "central"
    report_groups: tuple[tuple[str, tuple[str, ...]], ...]  # report order; a pair gets one plural sentence
    finding_templates: tuple[str, ...]
    normal_one: tuple[str, ...]  # one organ; {organ}
    normal_pair: tuple[str, ...]  # a pair of organs (lungs, kidneys); {organ}
    normal_extra: dict[str, tuple[str, ...]]  # more normal statements for some organs / pairs
    held_out_finding_templates: tuple[str, ...]
    held_out_normal_templates: tuple[str, ...]  # {organ}
    organ_prompts: tuple[str, ...]  # how a phrase names a whole organ; {organ}
    held_out_organ_prompts: tuple[str, ...]

    @property
    def organs(self) -> tuple[str, ...]:
        """Label names of the organs reports speak of."""
        return tuple(self.organ_text)


GRAMMAR = ReportGrammar(
    organ_text={"lung_left": "left lung", "lung_right": "right lung", "heart": "heart", "liver": "liver",
                "spleen": "spleen", "kidney_left": "left kidney", "kidney_right": "right kidney", "spine": "spine"},
    lesion_kinds={
        "liver": ("hypodense lesion", "hyperdense lesion", "cyst"),
        "spleen": ("hypodense lesion", "cyst"),
        "kidney_left": ("cyst", "hypodense lesion", "hyperdense lesion"),
        "kidney_right": ("cyst", "hypodense lesion", "hyperdense lesion"),
        "lung_left": ("nodule", "ground-glass nodule"),
        "lung_right": ("nodule", "ground-glass nodule"),
    },
    location_words=("upper", "lower", "anterior", "posterior", "medial", "lateral", "central"),
    report_groups=(("lungs", ("lung_left", "lung_right")), ("heart", ("heart",)), ("liver", ("liver",)),
                   ("spleen", ("spleen",)), ("kidneys", ("kidney_left", "kidney_right")), ("spine", ("spine",))),
    finding_templates=(
        "{a_num} {size} mm {kind} in the {where}.",
        "{where}: {kind} measuring {size} mm.",
        "there is {a_num} {size} mm {kind} in the {where}.",
        "{kind} of {size} mm in the {where}.",
        "{a_kind} {kind} measuring {size} mm is seen in the {where}.",
        "the {organ} shows {a_num} {size} mm {kind} in its {loc} part.",
    ),
    normal_one=("No focal abnormality of the {organ}.", "The {organ} is unremarkable.", "{organ}: no focal lesion.",
                "The {organ} appears normal."),
    normal_pair=("The {organ} are unremarkable.", "No focal abnormality of the {organ}.", "{organ}: no focal lesion."),
    normal_extra={"lungs": ("The lungs are clear.",), "left lung": ("The left lung is clear.",),
                  "right lung": ("The right lung is clear.",), "heart": ("The heart is normal in size.",)},
    held_out_finding_templates=(
        "within the {where} there is {a_kind} {kind} of about {size} mm.",
        "{a_num} {size} mm {kind} is present in the {where}.",
        "the {where} contains {a_num} {size} mm {kind}.",
        "{kind} ({size} mm) seen in the {loc} part of the {organ}.",
    ),
    held_out_normal_templates=("No lesion is seen in the {organ}.", "The {organ} shows no abnormality.",
                               "No {organ} lesion."),
    organ_prompts=("{organ}", "the {organ}"),
    held_out_organ_prompts=("the whole {organ}", "{organ} region"),
)


def article(word: str) -> str:
    """'a' or 'an' before `word` (a number is read aloud: an 8, an 11, an 18, an 80)."""
    if word.isdigit():
        return "an" if word.startswith("8") or word in ("11", "18") else "a"
    return "an" if word[0].lower() in "aeiou" else "a"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def finding_sentence(finding: dict, template: str) -> str:
    """A finding (dict with organ, kind, location, size_mm) in `template` (a grammar template)."""
    organ = GRAMMAR.organ_text[finding["organ"]]
    size = str(finding["size_mm"])
    return _sentence(template.format(a_num=article(size), a_kind=article(finding["kind"]), size=size,
                                     kind=finding["kind"], where=f"{finding['location']} {organ}",
                                     organ=organ, loc=finding["location"]))


def _normal_sentence(organ: str, plural: bool, rng: np.random.Generator) -> str:
    options = (GRAMMAR.normal_pair if plural else GRAMMAR.normal_one) + GRAMMAR.normal_extra.get(organ, ())
    return _sentence(options[rng.integers(len(options))].format(organ=organ))


def write_report(study_id: str, prior: str | None, findings: list[dict], rng: np.random.Generator) -> str:
    """Free-text report in the training phrasings; adds each finding's sentence to it as finding["sentence"]."""
    lines = []
    for group, names in GRAMMAR.report_groups:
        for finding in findings:
            if finding["organ"] in names:
                template = GRAMMAR.finding_templates[rng.integers(len(GRAMMAR.finding_templates))]
                finding["sentence"] = finding_sentence(finding, template)
                lines.append(finding["sentence"])
        normal = [name for name in names if all(f["organ"] != name for f in findings)]
        if len(normal) == 2:
            lines.append(_normal_sentence(group, True, rng))
        elif normal:
            lines.append(_normal_sentence(GRAMMAR.organ_text[normal[0]], False, rng))
    count = len(findings)
    impression = (f"{('One', 'Two', 'Three')[count - 1]} focal lesion{'s' * (count > 1)}, see findings."
                  if count else "No focal lesion.")
    header = f"CT chest and abdomen, study {study_id}." + (f" Comparison: {prior}." if prior else "")
    return f"{header}\nFindings: {' '.join(lines)}\nImpression: {impression}\n"


def report_rank(organ: str) -> int:
    """Position of an organ (label name) in report order."""
    return next(i for i, (_, names) in enumerate(GRAMMAR.report_groups) if organ in names)
