"""A phrase of a report -> a grounding query: which organ (and side), what finding, where in the organ,
how large, and whether it is asserted at all.

`parse_query(text, organs, matcher)`:
1. the statement's kind (`medssl.text.statements.classify_statement`: finding, negated, normal) and its
   stated size (`stated_size_mm`, "1.4 cm" -> 14.0);
2. the concepts of `medssl.text.concepts` matched on word boundaries, longest surface form first, with a
   hyphen read as a space ("ground-glass" = "ground glass"); the model's own organ labels (`organs`) are
   added to the organ vocabulary ("kidney_left" is also "kidney left" and "left kidney"); in a finding,
   what a negation scope covers is not asked ("No lesion in the liver but a cyst in the left kidney" asks
   for a cyst in the left kidney); "lobe" names a lung unless another organ is named;
3. every other word that is not filler (articles, report verbs, units, negation and normal cues) is
   *unknown*; with a `ConceptMatcher` (the frozen all-MiniLM-L6-v2 sentence encoder) an unknown word is
   read as the concept whose surface form is nearest in cosine, when that cosine reaches the matcher's
   threshold and the concept leads its slot by a margin (`read_word`); the reading and its cosine (the
   confidence) are kept in the query; a read organ only fills an empty slot, a read kind competes with the
   known ones on specificity, a read place is added;
4. sides: a paired organ ("kidney", "lung") takes the side word nearest to it ("left", "right"; none or
   "bilateral": both sides);
5. the finding kind is the most specific kind word (`concepts.SPECIFICITY`: "cystic lesion" is a cyst); a
   phrase with a size but no kind word names a generic "lesion"; a phrase with neither names an organ
   only (`Query.organ_prompt`).

A phrase that is not a string, empty, over `MAX_PHRASE_CHARS` characters, or names neither an organ nor a
finding (only unknown words, or only places) is a UserError naming it. Organs outside `organs` are kept in
`Query.unknown_organs` so that the caller can refuse them by name.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from medssl.errors import UserError
from medssl.text import concepts
from medssl.text.statements import (
    NEGATION_POST,
    NEGATION_PRE,
    PSEUDO_TRIGGERS,
    TERMINATORS,
    classify_statement,
    negation_scopes,
    stated_size_mm,
    without_measurements,
)

MAX_PHRASE_CHARS = 1000
SLOTS = ("organ", "kind", "location", "side")
_WORD = re.compile(r"[a-z][a-z']*")
_CUE_WORDS = frozenset(w for cue in NEGATION_PRE + NEGATION_POST + PSEUDO_TRIGGERS + TERMINATORS
                       for w in _WORD.findall(cue)) | frozenset(
    "unremarkable normal normally clear intact patent preserved limits remains remain looks look "
    "seems seem change changed stable unchanged interval since prior previous compared comparison".split())


@dataclass(frozen=True)
class MappedWord:
    """An unknown word read as a concept by the sentence encoder: slot ("organ", "kind", "location",
    "side"), concept, cosine (the confidence) and whether the query used it (its slot was still empty)."""

    word: str
    slot: str
    concept: str
    confidence: float
    used: bool


@dataclass(frozen=True)
class Query:
    """What a phrase asks for. organs: label names to search (empty: every organ); kind: a finding kind of
    `concepts.KIND_WORDS`, or None when the phrase names an organ only; locations: places inside the organ
    (`concepts.LOCATION_WORDS`); size_mm: the stated size; statement: finding / negated / normal."""

    text: str
    statement: str
    organs: tuple[str, ...]
    kind: str | None
    locations: tuple[str, ...]
    size_mm: float | None
    unknown_organs: tuple[str, ...] = ()
    mapped: tuple[MappedWord, ...] = ()
    unknown: tuple[str, ...] = ()
    sides: tuple[str, ...] = field(default=())

    @property
    def organ_prompt(self) -> bool:
        """The phrase names an organ and no finding ("the left kidney")."""
        return self.kind is None

    @property
    def asserted(self) -> bool:
        """A finding or organ the phrase says is there (not a negated or normal statement)."""
        return self.statement == "finding"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for map sidecars and results.json)."""
        out = asdict(self)
        out["mapped"] = [asdict(m) for m in self.mapped]
        return out

    def describe(self) -> str:
        """One line: "liver | hypodense lesion | upper posterior | 14 mm"."""
        parts = [", ".join(self.organs) or "any organ", self.kind or "organ", " ".join(self.locations) or "anywhere"]
        if self.size_mm is not None:
            parts.append(f"{self.size_mm:g} mm")
        return " | ".join(parts)


@dataclass(frozen=True)
class _Form:
    words: str  # normalised surface form
    slot: str
    concept: str


def normalise(text: str) -> str:
    """Lower case, hyphens and slashes as spaces, single spaces."""
    return " ".join(re.sub(r"[-/]", " ", text.lower()).split())


def _label_forms(label: str) -> list[str]:
    words = label.replace("_", " ").lower().split()
    forms = [" ".join(words)]
    if len(words) > 1 and words[-1] in ("left", "right"):
        forms.append(" ".join([words[-1]] + words[:-1]))
    return forms


@functools.lru_cache(maxsize=64)
def vocabulary(organs: tuple[str, ...]) -> tuple[_Form, ...]:
    """Every surface form, longest first: the concepts plus the label names in `organs`."""
    forms: list[_Form] = []
    for concept, words in concepts.ORGAN_WORDS.items():
        forms += [_Form(normalise(w), "organ", concept) for w in words]
    for concept, words in concepts.OTHER_ORGANS.items():
        forms += [_Form(normalise(w), "organ", concept) for w in words]
    for label in organs:
        forms += [_Form(normalise(w), "organ", label) for w in _label_forms(label)]
    for slot, table in (("kind", concepts.KIND_WORDS), ("location", concepts.LOCATION_WORDS),
                        ("side", concepts.SIDE_WORDS)):
        forms += [_Form(normalise(w), slot, concept) for concept, words in table.items() for w in words]
    unique = {(f.words, f.slot): f for f in forms}  # a label name equal to a built-in form: the label wins
    return tuple(sorted(unique.values(), key=lambda f: (-len(f.words), f.words)))


@dataclass(frozen=True)
class _Hit:
    start: int  # word index
    end: int
    form: _Form


def _match(words: list[str], forms: Sequence[_Form]) -> list[_Hit]:
    """Non-overlapping matches of `forms` (longest first) in the word list."""
    taken = [False] * len(words)
    hits = []
    for form in forms:
        n = len(form.words.split())
        target = form.words.split()
        for i in range(len(words) - n + 1):
            if words[i:i + n] == target and not any(taken[i:i + n]):
                hits.append(_Hit(i, i + n, form))
                taken[i:i + n] = [True] * n
    return sorted(hits, key=lambda h: h.start)


def check_phrase(text: object, field: str = "phrase") -> str:
    """The phrase, or a UserError naming `field` for a non-string, empty or over-long one."""
    if not isinstance(text, str):
        raise UserError(f"{field}: expected text, got {type(text).__name__}")
    if not text.strip():
        raise UserError(f"{field}: empty; give the words to ground")
    if len(text) > MAX_PHRASE_CHARS:
        raise UserError(f"{field}: {len(text)} characters, at most {MAX_PHRASE_CHARS} (one statement of a report; "
                        "give a report file for a whole report)")
    return text.strip()


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_query(text: str, organs: Iterable[str] = (), matcher: ConceptMatcher | None = None) -> Query:
    """The query of one phrase (module docstring). `organs`: the label names the model knows."""
    text = check_phrase(text)
    known_labels = tuple(organs)
    statement = classify_statement(text)
    size = stated_size_mm(text)
    stripped = without_measurements(text) or text
    lowered = re.sub(r"[-/]", " ", stripped.lower())  # as `normalise`, keeping every character's place
    spans = [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(lowered)]
    words = [w for w, _, _ in spans]
    hits = _match(words, vocabulary(known_labels))
    if statement == "finding":  # "No lesion in the liver but a cyst in the left kidney": the liver is not asked
        scopes = negation_scopes(stripped)
        hits = [h for h in hits if not any(s <= spans[h.start][1] and spans[h.end - 1][2] <= e for s, e in scopes)]
    if any(h.form.slot == "organ" and h.form.concept != "lung" for h in hits):  # "the right lobe of the liver"
        hits = [h for h in hits if h.form.words not in ("lobe", "lobes")]
    covered = {i for h in _match(words, vocabulary(known_labels)) for i in range(h.start, h.end)}
    unknown_words = [w for i, w in enumerate(words) if i not in covered and w not in concepts.FILLER_WORDS
                     and w not in _CUE_WORDS and len(w) > 1]
    found: dict[str, list[tuple[int, str]]] = {slot: [] for slot in SLOTS}
    for hit in hits:
        found[hit.form.slot].append((hit.start, hit.form.concept))
    mapped: list[MappedWord] = []
    still_unknown: list[str] = []
    if unknown_words and matcher is not None:
        for word, (slot, concept, confidence) in zip(unknown_words, matcher.match(unknown_words, known_labels)):
            if slot is None:
                still_unknown.append(word)
                continue
            adds = slot in ("kind", "location") or not found[slot]  # the most specific kind wins below
            mapped.append(MappedWord(word, slot, concept, round(confidence, 3), adds))
            if adds:
                found[slot].append((words.index(word), concept))
    else:
        still_unknown = unknown_words
    organ_labels, unknown_organs, sides = _resolve_organs(found["organ"], found["side"], known_labels)
    kinds = [concept for _, concept in found["kind"]]
    kind = max(kinds, key=lambda k: concepts.SPECIFICITY[k]) if kinds else (concepts.GENERIC_KIND if size else None)
    mapped = [m if m.slot != "kind" else replace(m, used=m.concept == kind) for m in mapped]
    locations = _locations([concept for _, concept in sorted(found["location"])])
    if not organ_labels and not unknown_organs and kind is None:
        what = f"; unknown words: {', '.join(still_unknown[:6])}" if still_unknown else ""
        raise UserError(f"phrase {_short(text)!r}: names no organ or finding the model knows{what}")
    return Query(text, statement, organ_labels, kind, locations, size, unknown_organs, tuple(mapped),
                 tuple(still_unknown), sides)


def _locations(found: list[str]) -> tuple[str, ...]:
    """Places in phrase order without repeats; of two opposite places the first one wins."""
    out: list[str] = []
    for place in found:
        if place not in out and concepts.OPPOSITE_LOCATIONS.get(place) not in out:
            out.append(place)
    return tuple(out)


def _resolve_organs(organs: list[tuple[int, str]], sides: list[tuple[int, str]], labels: tuple[str, ...]
                    ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(label names to search, organs named that `labels` lacks, sides used). A base organ ("kidney") takes
    the nearest side word; without one, or with "both", every side."""
    out: list[str] = []
    unknown: list[str] = []
    used_sides: list[str] = []
    for position, concept in organs:
        if concept in concepts.PAIRED_ORGANS:
            side = min(sides, key=lambda s: abs(s[0] - position))[1] if sides else "both"
            used_sides.append(side)
            pair = concepts.PAIRED_ORGANS[concept]
            chosen = [pair[0]] if side == "left" else [pair[1]] if side == "right" else list(pair)
        else:
            chosen = [concept]
        for label in chosen:
            if labels and label not in labels:
                unknown.append(label)
            elif label not in out:
                out.append(label)
    return tuple(out), tuple(dict.fromkeys(unknown)), tuple(used_sides)


class ConceptMatcher:
    """Unknown words -> the nearest concept surface form under a frozen sentence encoder (all-MiniLM-L6-v2,
    `medssl.text.encoders.FrozenMiniLM`), accepted at cosine >= `threshold` (`calibrated_threshold`)."""

    def __init__(self, encoder: Any = None, threshold: float | None = None):
        if encoder is None:
            from medssl.text.encoders import FrozenMiniLM

            encoder = FrozenMiniLM()
        self.encoder = encoder
        self.threshold = MATCH_THRESHOLD if threshold is None else float(threshold)
        self._forms: dict[tuple[str, ...], tuple[list[_Form], Any]] = {}

    def embed(self, texts: Sequence[str]) -> Any:
        """(N, D) unit vectors."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            return F.normalize(self.encoder(list(texts)).pooled.float(), dim=-1)

    def _table(self, labels: tuple[str, ...]) -> tuple[list[_Form], Any]:
        if labels not in self._forms:
            forms = list(vocabulary(labels))
            self._forms[labels] = (forms, self.embed([f.words for f in forms]))
        return self._forms[labels]

    def scores(self, words: Sequence[str], labels: tuple[str, ...] = ()) -> tuple[list[_Form], Any]:
        """(the surface forms, (W, F) cosines of each word with each form)."""
        forms, table = self._table(labels)
        return forms, self.embed(words) @ table.T

    def match(self, words: Sequence[str], labels: tuple[str, ...] = ()
              ) -> list[tuple[str | None, str | None, float]]:
        """(slot, concept, cosine) per word (`read_word`)."""
        if not words:
            return []
        forms, cosines = self.scores(words, labels)
        return [read_word(word, forms, row, self.threshold) for word, row in zip(words, cosines.tolist())]


def read_word(word: str, forms: Sequence[_Form], cosines: Sequence[float], threshold: float
              ) -> tuple[str | None, str | None, float]:
    """(slot, concept, cosine) of an unknown word from its cosines with the surface forms: the concept of
    the nearest form when its cosine reaches `threshold` and beats every other concept of the same slot by
    `MATCH_MARGIN` (a sentence encoder puts antonyms close: "superior" / "inferior", "high" / "low
    attenuation"); an ambiguous kind is the generic "lesion" (no polarity claimed), an ambiguous organ or
    place nothing (slot and concept None). A word with a hypo- / hyper- prefix is that kind (cosine 1)."""
    prefix = next((kind for start, kind in concepts.KIND_PREFIXES.items() if word.startswith(start)), None)
    if prefix is not None:
        return "kind", prefix, 1.0
    best: dict[tuple[str, str], float] = {}
    for form, value in zip(forms, cosines):
        key = (form.slot, form.concept)
        best[key] = max(best.get(key, -1.0), value)
    (slot, concept), value = max(best.items(), key=lambda kv: kv[1])
    rival = max((v for (s, c), v in best.items() if s == slot and c != concept), default=-1.0)
    if value < threshold:
        return None, None, value
    if value - rival >= MATCH_MARGIN:
        return slot, concept, value
    return ("kind", concepts.GENERIC_KIND, value) if slot == "kind" else (None, None, value)


# an unknown word is read as a concept at cosine >= MATCH_THRESHOLD and a lead of MATCH_MARGIN over the slot's
# next concept: chosen by leaving each one-word surface form of the vocabulary out in turn (`leave_one_out`): 66 %
# of the 129 forms are then read as their own concept, 9 % as another, and 4 % of filler and plain words as any
MATCH_THRESHOLD = 0.6
MATCH_MARGIN = 0.08


@functools.lru_cache(maxsize=1)
def default_matcher() -> ConceptMatcher:
    """The process's MiniLM matcher, loaded on first use (about 4 s)."""
    return ConceptMatcher()


# words of no concept for `leave_one_out` beside the filler words: report descriptors and imaging terms
_PLAIN_WORDS = """incidental redemonstrated again stable unchanged new enlarging subtle well defined circumscribed
ill rounded oval irregular smooth margins borders enhancement arterial phase contrast patient study image
scan""".split()


def leave_one_out(matcher: ConceptMatcher) -> dict[str, float]:
    """How the matcher reads words it does not know, measured on its own vocabulary: each single surface form
    of an organ, kind or place is read with itself left out of the table (the other forms of its concept
    stay); "right" / "wrong": shares read as their own / another concept (the rest: not read), "plain_read":
    the share of filler and plain words read as any concept (they should not be)."""
    forms = list(vocabulary(()))
    table = matcher.embed([f.words for f in forms])
    cosines = (table @ table.T).tolist()
    right = wrong = tested = 0
    for i, form in enumerate(forms):
        if form.slot == "side" or " " in form.words:
            continue
        row = list(cosines[i])
        row[i] = -1.0
        slot, concept, _ = read_word(form.words, forms, row, matcher.threshold)
        tested += 1
        right += (slot, concept) == (form.slot, form.concept)
        wrong += slot is not None and (slot, concept) != (form.slot, form.concept)
    plain = sorted(concepts.FILLER_WORDS) + _PLAIN_WORDS
    read = sum(slot is not None for slot, _, _ in matcher.match(plain))
    return {"forms": tested, "right": right / tested, "wrong": wrong / tested, "plain_read": read / len(plain)}
