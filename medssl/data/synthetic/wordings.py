"""Report wordings that no part of medssl was developed on, for the grounding evaluation (`unseen_wordings.json`).

They were written by someone who had not seen the grounding parser's vocabulary (medssl.text.concepts) and
whose words were not added to it afterwards: a test of how the parser and its MiniLM concept reading cope
with a radiologist's own words (synonyms of organs, kinds and places, other sentence structures).

The file holds, per lesion-bearing organ and kind, sentence templates with {size} (mm) and {loc} (the lesion's
place in other words: `location` lists alternatives for each place word); whole-organ prompts per organ; and
templates of findings to ask about organs that hold none ({size} only).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

_FILE = Path(__file__).with_name("unseen_wordings.json")


@functools.lru_cache(maxsize=1)
def unseen_wordings() -> dict:
    """The parsed file."""
    return json.loads(_FILE.read_text(encoding="utf-8"))


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] if text else text


def unseen_finding_sentences(finding: dict) -> list[str]:
    """Every unseen template of the finding's organ and kind, rendered (template j takes alternative j of each
    place word); [] for an organ or kind the file does not cover. finding: organ, kind, location, size_mm."""
    data = unseen_wordings()
    templates = data["findings"].get(finding["organ"], {}).get(finding["kind"], [])
    out = []
    for j, template in enumerate(templates):
        places = [data["location"][word][j % len(data["location"][word])] for word in finding["location"].split()]
        out.append(_sentence(template.format(size=finding["size_mm"], loc=" ".join(places))))
    return out


def unseen_organ_prompts(organ: str) -> list[str]:
    """Whole-organ prompts of an organ label ([] when the file has none)."""
    return list(unseen_wordings()["organs"].get(organ, []))


def unseen_absent_sentences(organ: str, size_mm: int) -> list[str]:
    """Findings in the organ, in unseen wording, to ask of a study whose organ holds none."""
    return [_sentence(t.format(size=size_mm)) for t in unseen_wordings()["absent"].get(organ, [])]
