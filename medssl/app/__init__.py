"""The clinician app (`app.py`, the Streamlit script `medssl app` runs), on top of everything else.

Only `app.py` imports streamlit. Everything it does is a function tested without it, one job per module:
`session` (data folders, cases, uploads, exports, review table's place), `grounding` (the one door to the
grounding model), `viewport` (what the NiiVue viewport in the browser is given; its web source and npm build
are in `viewport/`), `signals` (time-series saliency), `review` (the review table), `paths` (reads confined to
the data folders). Drawing and compositing come from the display library `medssl.display`.
"""
