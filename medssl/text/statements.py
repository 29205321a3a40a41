"""Radiology reports -> statements: sentence splitting, sections, NegEx-style kinds, sizes, mentions.

Splitting. A statement ends at `.`, `!` or `?` followed by white space, at `;` and at a line
break, except that a decimal point ("1.4 cm") or an abbreviation ("approx.", "e.g.") ends nothing
and a line break followed by a lower-case word is a wrapped line, not an end. A bullet or number
("- ", "2) ") that opens a line is not part of the statement.

Sections. A known header at the start of a statement ("Findings:", "IMPRESSION:", "Comparison:",
see SECTION_HEADERS) sets the `section` of what follows and is not part of any statement. Text
before the first header is section "header" when the report has a "findings" section and
"findings" otherwise (a report that is only a list of findings). Any other "Label:" prefix
("Left kidney: cyst measuring 9 mm.", "Spine: no focal lesion.") stays in its statement.

Kinds (`classify_statement`), the first rule that applies:

1. "finding": a finding word (lesion, nodule, cyst, mass, effusion, ...) outside every negation
   scope, or a normal word negated by "not" ("is not normal", "does not appear unremarkable");
2. "normal": a normal phrase ("unremarkable", "normal", "within normal limits", "is clear",
   "intact") outside every negation scope: "The kidneys are normal without hydronephrosis.";
3. "finding": a size outside every negation scope ("The liver measures 18 cm."), or, after a
   contrast terminator ("but", "however", "except", ...) that closes a negation scope, a content
   word that is neither negated nor normal ("No lesion in the liver but atelectasis in the lung.");
4. "negated": a negation trigger ("No focal abnormality of the spleen.", "Spine: no focal lesion.");
5. "finding": a statement with none of these cues is read as a positive mention.

Negation scopes (NegEx). A pre-trigger ("no", "not", "without", "negative for", "no evidence of",
...) negates what follows it up to a terminator ("but", "however", "although", "except", "apart
from", "which", ";", ...) or the statement's end; a post-trigger ("is absent", "not seen", "ruled
out", "has resolved", ...) negates what precedes it back to a terminator or the start. A pseudo
trigger ("no change", "cannot be excluded", "not only", ...) contains a trigger word but negates
nothing. Commas and "and" do not end a scope ("no lesion, mass or cyst"). So "No lesion in the liver
but a 5 mm cyst in the left kidney." negates only "lesion in the liver" and is a "finding": the
sentence is not wholly negated. A caller who needs the negated part per mention can combine
`negation_scopes` with the spans of `mentions`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from medssl.errors import UserError

Kind = Literal["finding", "negated", "normal"]
KINDS: tuple[str, ...] = ("finding", "negated", "normal")

# header (lower case, single spaces) -> canonical section name
SECTION_HEADERS: dict[str, str] = {
    "findings": "findings", "finding": "findings", "report": "findings", "description": "findings",
    "impression": "impression", "impressions": "impression", "conclusion": "impression",
    "conclusions": "impression", "summary": "impression", "opinion": "impression",
    "comparison": "comparison", "comparisons": "comparison", "prior": "comparison", "priors": "comparison",
    "technique": "technique", "protocol": "technique", "procedure": "technique",
    "indication": "indication", "indications": "indication", "clinical indication": "indication",
    "history": "indication", "clinical history": "indication", "clinical information": "indication",
    "clinical details": "indication", "reason for exam": "indication", "reason for examination": "indication",
    "examination": "header", "exam": "header", "study": "header",
    "recommendation": "recommendation", "recommendations": "recommendation",
}

# words whose "." does not end a sentence (lower case, without the final ".")
ABBREVIATIONS: frozenset[str] = frozenset({
    "approx", "appr", "cf", "dr", "e.g", "eg", "fig", "figs", "i.e", "ie", "incl", "prof", "resp", "seg", "segm",
    "vs", "viz",
})

NEGATION_PRE: tuple[str, ...] = (
    "no", "not", "without", "negative for", "no evidence of", "no evidence for", "no sign of", "no signs of",
    "absence of", "absent", "free of", "rules out", "ruled out for", "neither", "nor", "never", "cannot see",
    "fails to reveal", "failed to reveal", "none", "nil", "n't",
)
NEGATION_POST: tuple[str, ...] = (
    "is absent", "are absent", "was absent", "were absent", "not seen", "not identified", "not detected",
    "not visualized", "not visualised", "not demonstrated", "not present", "not appreciated",
    "is ruled out", "are ruled out", "was ruled out", "were ruled out", "has been ruled out",
    "have been ruled out", "is excluded", "are excluded", "was excluded", "were excluded",
    "has resolved", "have resolved",
)
PSEUDO_TRIGGERS: tuple[str, ...] = (
    "no change", "no significant change", "no interval change", "no definite change", "no increase",
    "no significant increase", "no decrease", "no growth", "no further", "no longer", "not only",
    "not necessarily", "not certain whether", "not certain if", "not clear whether", "cannot be excluded",
    "can not be excluded", "cannot be ruled out", "can not be ruled out", "not be excluded",
    "not be ruled out", "not ruled out", "not excluded", "without change", "without significant change",
    "without interval change", "gram negative",
)
TERMINATORS: tuple[str, ...] = (
    "but", "however", "although", "though", "except", "apart from", "aside from", "with the exception of",
    "whereas", "while", "nevertheless", "nonetheless", "other than", "which", "who", "cause of",
    "source of", "etiology of", "aetiology of", "secondary to", "due to",
)
# terminators that mark a contrast: what follows is asserted unless itself negated or normal
CONTRAST_TERMINATORS: frozenset[str] = frozenset({
    "but", "however", "although", "though", "except", "apart from", "aside from", "with the exception of",
    "whereas", "while", "nevertheless", "nonetheless", "other than",
})

NORMAL_PATTERNS: tuple[str, ...] = (
    r"unremarkable", r"within\s+normal\s+limits", r"normal", r"normally", r"intact", r"patent", r"preserved",
    r"(?:is|are|was|were|remains?|appears?|looks?|seems?)\s+(?:\w+\s+){0,2}?clear",
    r"clear(?=\s*(?:bilaterally)?\s*[.!;]?\s*$)",
)
FINDING_WORDS: tuple[str, ...] = (
    r"lesions?", r"nodules?", r"nodular", r"masse?s?", r"cysts?", r"cystic", r"tumou?rs?", r"neoplasms?",
    r"metasta\w*", r"hypodens\w*", r"hyperdens\w*", r"hypoattenuat\w*", r"hyperattenuat\w*", r"hypoechoic",
    r"hyperechoic", r"hypointens\w*", r"hyperintens\w*", r"enhancing", r"enhancement", r"opacit\w*",
    r"ground-glass", r"consolidations?", r"effusions?", r"calcifi\w*", r"stones?", r"calcul\w*",
    r"fractures?", r"fractured", r"abscess\w*", r"ha?emorrhag\w*", r"ha?ematomas?", r"thickening",
    r"thickened", r"dilat\w*", r"enlarge\w*", r"lymphadenopathy", r"adenopathy", r"focus", r"foci",
    r"infiltrat\w*", r"atelectasis", r"emphysema", r"pneumothorax", r"ascites", r"thromb\w*", r"stenos\w*",
    r"aneurysm\w*", r"o?edema", r"collections?", r"abnormalit\w*", r"abnormal", r"malignan\w*",
    r"suspicious", r"hydronephrosis", r"cardiomegaly", r"splenomegaly", r"hepatomegaly", r"scarring",
)
# words that carry no claim of their own after a contrast terminator
_FILLER = frozenset({
    "the", "and", "are", "was", "were", "has", "have", "been", "its", "this", "that", "there", "these", "those",
    "with", "for", "from", "seen", "noted", "also", "both", "each", "otherwise", "remaining", "rest", "other",
    "elsewhere", "visualized", "visualised", "imaged", "portion", "portions", "part", "parts",
})

_UNIT_MM = {"mm": 1.0, "cm": 10.0, "millimetre": 1.0, "millimeter": 1.0, "centimetre": 10.0, "centimeter": 10.0}
_NUM = r"\d+(?:[.,]\d+)?"
_UNIT = r"(?:mm|cm|millimet(?:re|er)s?|centimet(?:re|er)s?)(?!\w)"
_SIZE = re.compile(rf"(?<![\w.,]){_NUM}(?:\s*-?\s*{_UNIT})?(?:\s*(?:x|×|\*|by)\s*{_NUM}(?:\s*-?\s*{_UNIT})?)*(?!\w)",
                   re.IGNORECASE)
_SIZE_PART = re.compile(rf"({_NUM})(?:\s*-?\s*({_UNIT}))?", re.IGNORECASE)


@dataclass(frozen=True)
class Statement:
    """One statement: `report[start:end] == text`; `kind` one of KINDS; `section` a canonical
    section name ("header", "findings", "impression", "comparison", "technique", ...)."""

    text: str
    kind: Kind
    section: str
    start: int
    end: int


def _require_str(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise UserError(f"{what}: expected a string, got {type(text).__name__}")
    return text


def _words(phrase: str) -> str:
    """Regex for a phrase's words: escaped, any white space between them."""
    return r"\s+".join(re.escape(word) for word in phrase.split())


def _phrase(phrase: str) -> str:
    """`_words` with word boundaries outside."""
    return rf"(?<!\w){_words(phrase)}(?!\w)"


def _alternation(phrases: tuple[str, ...]) -> str:
    # longest first: "no evidence of" wins over "no" at the same position
    return "|".join(_phrase(p) for p in sorted(phrases, key=lambda p: (-len(p), p)) if p != "n't")


_TRIGGERS = re.compile(
    rf"(?P<pseudo>{_alternation(PSEUDO_TRIGGERS)})|(?P<post>{_alternation(NEGATION_POST)})"
    rf"|(?P<term>{_alternation(TERMINATORS)})|(?P<pre>{_alternation(NEGATION_PRE)}|n['’]t(?!\w))|(?P<punct>;)",
    re.IGNORECASE)
_NORMAL = re.compile(rf"(?<!\w)(?:{'|'.join(NORMAL_PATTERNS)})(?!\w)", re.IGNORECASE)
_FINDING = re.compile(rf"(?<!\w)(?:{'|'.join(FINDING_WORDS)})(?!\w)", re.IGNORECASE)
_CONTENT = re.compile(r"[a-z]{3,}", re.IGNORECASE)
_HEADER = re.compile(
    r"(" + "|".join(_words(h) for h in sorted(SECTION_HEADERS, key=len, reverse=True)) + r")\s*(?::\s*|$)",
    re.IGNORECASE)
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]?(\s+)|;|\n")
_BULLET = re.compile(r"(?:[-*•·]|\(?\d{1,2}[.)])(?:\s+|$)")


@dataclass(frozen=True)
class _Trigger:
    group: str  # "pre", "post", "pseudo", "term", "punct"
    word: str  # lower case, single spaces
    start: int
    end: int


def _triggers(sentence: str) -> list[_Trigger]:
    return [_Trigger(m.lastgroup or "", " ".join(m.group(0).lower().split()), m.start(), m.end())
            for m in _TRIGGERS.finditer(sentence)]


def _scopes(sentence: str, triggers: list[_Trigger]) -> list[tuple[_Trigger, int, int]]:
    """(trigger, start, end) of each negation scope."""
    stops = ("term", "punct", "pre", "post")
    out = []
    for i, trig in enumerate(triggers):
        if trig.group == "pre":
            end = next((t.start for t in triggers[i + 1:] if t.group in stops), len(sentence))
            out.append((trig, trig.end, end))
        elif trig.group == "post":
            start = max((t.end for t in triggers[:i] if t.group in ("term", "punct")), default=0)
            out.append((trig, start, trig.start))
    return [(t, s, e) for t, s, e in out if sentence[s:e].strip()]


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def negation_scopes(sentence: str) -> list[tuple[int, int]]:
    """Sorted, merged character spans of `sentence` that negation triggers negate (triggers excluded)."""
    sentence = _require_str(sentence, "statement")
    return _merge([(s, e) for _, s, e in _scopes(sentence, _triggers(sentence))])


def _inside(span: tuple[int, int], scopes: list[tuple[int, int]]) -> bool:
    return any(s <= span[0] and span[1] <= e for s, e in scopes)


def classify_statement(sentence: str) -> Kind:
    """The kind of one statement: "finding", "negated" or "normal" (rules in the module docstring)."""
    sentence = _require_str(sentence, "statement")
    if not sentence.strip():
        raise UserError("statement: empty text")
    triggers = _triggers(sentence)
    scoped = _scopes(sentence, triggers)
    scopes = _merge([(s, e) for _, s, e in scoped])
    not_scopes = [(s, e) for t, s, e in scoped if t.word in ("not", "n't", "n’t")]
    normals = [m.span() for m in _NORMAL.finditer(sentence)]
    if any(_inside(span, not_scopes) for span in normals):
        return "finding"
    if any(not _inside(m.span(), scopes) for m in _FINDING.finditer(sentence)):
        return "finding"
    if any(not _inside(span, scopes) for span in normals):
        return "normal"
    if any(not _inside(m.span(), scopes) for m in _SIZE.finditer(sentence) if _size_of(m.group(0)) is not None):
        return "finding"
    negations = [t for t in triggers if t.group in ("pre", "post")]
    if not negations:
        return "finding"
    for i, trig in enumerate(triggers):
        if trig.group == "term" and trig.word in CONTRAST_TERMINATORS and any(e == trig.start for _, e in scopes):
            end = next((t.start for t in triggers[i + 1:] if t.group in ("term", "punct")), len(sentence))
            for word in _CONTENT.finditer(sentence, trig.end, end):
                negation_word = any(t.start < word.end() and word.start() < t.end for t in negations)
                if not (word.group(0).lower() in _FILLER or negation_word or _inside(word.span(), scopes)):
                    return "finding"
    return "negated"


def _pieces(report: str) -> list[tuple[int, int]]:
    """(start, end) of every non-blank piece between statement boundaries, stripped."""
    cuts: list[tuple[int, int]] = []  # (end of a piece, start of the next)
    for m in _BOUNDARY.finditer(report):
        token = m.group(0)
        if token == ";":
            cuts.append((m.start(), m.end()))
        elif token == "\n":
            before = report[max(0, m.start() - 64):m.start()].rstrip(" \t")
            after = report[m.end():].lstrip(" \t")
            wrapped = bool(before) and before[-1] not in ".!?:;" and after[:1].islower()
            if not wrapped:
                cuts.append((m.start(), m.end()))
        else:
            end = m.start(1)
            if not _ends_in_abbreviation(report[max(0, end - 64):end]):
                cuts.append((end, m.end()))
    pieces, start = [], 0
    for end, nxt in cuts + [(len(report), len(report))]:
        if end >= start:
            pieces.append((start, end))
        start = max(start, nxt)
    out = []
    for s, e in pieces:
        while s < e and report[s].isspace():
            s += 1
        while e > s and report[e - 1].isspace():
            e -= 1
        bullet = _BULLET.match(report, s, e)
        if bullet is not None:
            s = bullet.end()
        if s < e:
            out.append((s, e))
    return out


def _ends_in_abbreviation(text: str) -> bool:
    m = re.search(r"(?<![A-Za-z.])([A-Za-z](?:[A-Za-z.]*[A-Za-z])?)\.$", text)
    return m is not None and m.group(1).lower() in ABBREVIATIONS


def split_statements(report: str) -> list[Statement]:
    """Split `report` into classified statements in report order, section headers removed.

    Raises UserError for a non-str or blank report.
    """
    report = _require_str(report, "report")
    if not report.strip():
        raise UserError("report: empty text")
    pieces: list[tuple[int, int, str | None]] = []  # (start, end, section opened here)
    for start, end in _pieces(report):
        section = None
        m = _HEADER.match(report, start, end)
        while m is not None:
            section = SECTION_HEADERS[" ".join(m.group(1).lower().split())]
            start = m.end()
            m = _HEADER.match(report, start, end) if start < end else None
        pieces.append((start, end, section))
    current = "header" if any(section == "findings" for _, _, section in pieces) else "findings"
    statements = []
    for start, end, section in pieces:
        current = section or current
        if start < end:
            text = report[start:end]
            statements.append(Statement(text, classify_statement(text), current, start, end))
    return statements


def findings(report: str) -> list[Statement]:
    """The statements of the report's "findings" section (see `split_statements`)."""
    return [s for s in split_statements(report) if s.section == "findings"]


def _size_of(measurement: str) -> float | None:
    """Largest dimension in mm of one measurement ("14 x 10 mm" -> 14.0); None without a unit."""
    parts = [(float(m.group(1).replace(",", ".")), m.group(2)) for m in _SIZE_PART.finditer(measurement)]
    values, unit = [], None
    for value, own_unit in reversed(parts):  # a dimension without a unit takes the next one's
        unit = own_unit or unit
        if unit is not None:
            values.append(value * _UNIT_MM[unit.lower().rstrip("s")])
    return max(values) if values else None


def stated_size_mm(text: str) -> float | None:
    """The first size stated in `text`, in mm: "14 mm" -> 14.0, "1.4 cm" -> 14.0, "1,4 cm" -> 14.0,
    "14 x 10 mm" -> 14.0 (largest dimension of the first measurement), no size -> None."""
    text = _require_str(text, "text")
    for m in _SIZE.finditer(text):
        size = _size_of(m.group(0))
        if size is not None:
            return size
    return None


def without_measurements(text: str) -> str:
    """`text` with its measurements ("14 mm", "1.4 x 1 cm") and bare numbers removed and spaces tidied:
    "A 14 mm hypodense lesion in the upper liver." -> "A hypodense lesion in the upper liver."."""
    text = _require_str(text, "text")
    return re.sub(r"\s+([.,;:])", r"\1", " ".join(_SIZE.sub(" ", text).split()))


def mentions(text: str, vocabulary: dict[str, list[str]]) -> list[str]:
    """The keys of `vocabulary` that `text` names, in order of first appearance, each once.

    `vocabulary` maps a key to its synonyms, e.g. {"liver": ["liver", "hepatic"], "kidney_left":
    ["left kidney"]}. Case-insensitive, on word boundaries, any white space between words; the
    longest synonyms are matched first and a matched span is not matched again, so "left kidney"
    names "kidney_left" and not also a bare "kidney" entry. Raises UserError for a bad vocabulary.
    """
    text = _require_str(text, "text")
    if not isinstance(vocabulary, dict):
        raise UserError(f"vocabulary: expected a mapping of key -> list of synonyms, got {type(vocabulary).__name__}")
    synonyms: list[tuple[str, str]] = []
    for key, words in vocabulary.items():
        if not isinstance(words, (list, tuple)):
            raise UserError(f"vocabulary.{key}: expected a list of synonyms, got {type(words).__name__}")
        for word in words:
            if not isinstance(word, str) or not word.strip():
                raise UserError(f"vocabulary.{key}: synonyms must be non-empty strings, got {word!r}")
            synonyms.append((" ".join(word.split()), str(key)))
    taken: list[tuple[int, int, str]] = []
    for word, key in sorted(synonyms, key=lambda item: -len(item[0])):  # stable: ties keep vocabulary order
        for m in re.finditer(_phrase(word), text, re.IGNORECASE):
            if all(m.end() <= s or m.start() >= e for s, e, _ in taken):
                taken.append((m.start(), m.end(), key))
    keys: list[str] = []
    for _, _, key in sorted(taken):
        if key not in keys:
            keys.append(key)
    return keys
