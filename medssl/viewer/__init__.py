"""Pure functions behind the attention-map viewer: windowing, orientation-aware slicing, overlays,
region statistics and grounding metrics, the clinician review table and safe path handling.

No module here imports streamlit; the app calls these functions. One job per module:
`windowing`, `slicing`, `overlay`, `stats`, `review`, `paths`.
"""
