"""Synthetic cohorts (`medssl synth`): the hospital (`hospital`, built from `anatomy`, `reports` and
`signals`) and the MNI152 brain-tissue cohort (`mni152`); `cohorts` names them."""
