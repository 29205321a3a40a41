"""The words a grounding query is made of, as data: organs, finding kinds, places inside an organ, sides.

Each concept lists its surface forms (lower case; several words allowed; a hyphen and a space are the same).
`medssl.text.query` matches them in a phrase, longest first. Organ concepts are keyed by the label names of
the synthetic hospital (and of most CT label sets): a model's own label names are added to the organ
vocabulary at query time, so a label set with other organs ("grey_matter") is understood by its names.
Organs that come in pairs have a base concept ("kidney") that a side word turns into a label ("kidney_left").
`OTHER_ORGANS` are organs a radiologist may name that the synthetic hospital has no label for: a query that
names one of them is refused when the model does not know it, instead of being grounded somewhere else.

Words that are not here are mapped to the nearest concept by a sentence encoder (`query.ConceptMatcher`)
with a confidence, so this vocabulary does not have to hold every synonym.
"""

from __future__ import annotations

ORGAN_WORDS: dict[str, tuple[str, ...]] = {
    "liver": ("liver", "hepatic", "hepatic parenchyma", "hepato"),
    "spleen": ("spleen", "splenic"),
    "kidney": ("kidney", "kidneys", "renal"),
    "lung": ("lung", "lungs", "pulmonary", "lobe", "lobes"),
    "heart": ("heart", "cardiac", "myocardium", "myocardial"),
    "spine": ("spine", "spinal", "vertebra", "vertebrae", "vertebral", "vertebral body", "vertebral bodies"),
    "body": ("body", "whole body", "torso", "trunk"),
}
PAIRED_ORGANS: dict[str, tuple[str, str]] = {"kidney": ("kidney_left", "kidney_right"),
                                              "lung": ("lung_left", "lung_right")}
OTHER_ORGANS: dict[str, tuple[str, ...]] = {
    "pancreas": ("pancreas", "pancreatic"), "gallbladder": ("gallbladder", "gall bladder", "cholecystic"),
    "adrenal": ("adrenal", "adrenals", "adrenal gland"), "bladder": ("urinary bladder", "bladder", "vesical"),
    "stomach": ("stomach", "gastric"), "bowel": ("bowel", "colon", "colonic", "intestine", "intestinal"),
    "aorta": ("aorta", "aortic"), "brain": ("brain", "cerebral", "cerebellum", "cerebellar"),
    "thyroid": ("thyroid",), "prostate": ("prostate", "prostatic"), "uterus": ("uterus", "uterine"),
    "ovary": ("ovary", "ovarian", "ovaries"), "oesophagus": ("oesophagus", "esophagus", "esophageal"),
    "breast": ("breast",), "bone": ("bone", "osseous", "rib", "ribs"),
    "lymph node": ("lymph node", "lymph nodes", "nodal"),
}

# finding kinds: the kinds of the synthetic hospital's reports, and "lesion", which names no kind in
# particular; SPECIFICITY decides between several kind words in one phrase ("cystic lesion" is a cyst)
KIND_WORDS: dict[str, tuple[str, ...]] = {
    "hypodense lesion": ("hypodense", "hypodensity", "hypodensities", "hypoattenuating", "hypoattenuation",
                         "low attenuation", "low density", "hypoattenuating lesion", "hypodense lesion"),
    "hyperdense lesion": ("hyperdense", "hyperdensity", "hyperdensities", "hyperattenuating", "hyperattenuation",
                          "high attenuation", "high density", "hyperdense lesion", "hyperattenuating lesion"),
    "cyst": ("cyst", "cysts", "cystic", "cystic lesion", "simple cyst"),
    "nodule": ("nodule", "nodules", "nodular", "solid nodule", "nodular opacity"),
    "ground-glass nodule": ("ground glass", "ground glass nodule", "ground glass opacity", "ground glass opacities",
                            "ggo", "ggn", "subsolid", "subsolid nodule", "non solid", "nonsolid", "part solid"),
    "lesion": ("lesion", "lesions", "mass", "masses", "focus", "foci", "focal lesion", "abnormality", "tumour",
               "tumor", "neoplasm", "metastasis", "metastases", "opacity", "opacities", "finding"),
}
KIND_PREFIXES: dict[str, str] = {"hypo": "hypodense lesion", "hyper": "hyperdense lesion"}  # hypoenhancing, ...
SPECIFICITY: dict[str, int] = {"ground-glass nodule": 5, "cyst": 4, "hypodense lesion": 3, "hyperdense lesion": 3,
                               "nodule": 2, "lesion": 1}
GENERIC_KIND = "lesion"

# places inside an organ, in the organ's own frame (`medssl.downstream.grounding.anatomy`)
LOCATION_WORDS: dict[str, tuple[str, ...]] = {
    "upper": ("upper", "superior", "cranial", "apical", "apex", "upper pole", "top", "dome"),
    "lower": ("lower", "inferior", "caudal", "basal", "base", "lower pole", "bottom"),
    "anterior": ("anterior", "ventral", "front"),
    "posterior": ("posterior", "dorsal", "back"),
    "medial": ("medial", "inner", "hilar", "hilum"),
    "lateral": ("lateral", "outer"),
    "central": ("central", "centre", "center", "centrally", "mid", "middle", "interpolar"),
}
OPPOSITE_LOCATIONS: dict[str, str] = {"upper": "lower", "lower": "upper", "anterior": "posterior",
                                      "posterior": "anterior", "medial": "lateral", "lateral": "medial"}

SIDE_WORDS: dict[str, tuple[str, ...]] = {"left": ("left", "left sided", "left side"),
                                          "right": ("right", "right sided", "right side"),
                                          "both": ("bilateral", "bilaterally", "both")}

# words that carry no concept: articles, verbs of reporting, units, sizes, report filler
FILLER_WORDS: frozenset[str] = frozenset("""
a an the of in on at to by for from with within without into onto as and or is are was were be been being this
that these those there here its it which who has have had seen noted note notes noting shows show showing shown
demonstrates demonstrated demonstrating identified visualised visualized present measuring measures measured
measure approximately approx about around roughly up mm cm millimetre millimetres millimeter millimeters
centimetre centimetres centimeter centimeters size sized diameter part portion portions aspect aspects region
regions area areas segment segments parenchyma side small large tiny new single solitary one two three few
several some also again likely probably possibly possible probable suspected suspicious consistent compatible
appears appear appearing see contains contain containing located lying situated found whole entire level pole
focal lobe lobes
""".split())
