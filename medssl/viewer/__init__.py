"""The clinician app (`app.py`, the Streamlit script `medssl app` runs) and the plain functions it calls.

Only `app.py` imports streamlit. Everything it does is a function tested without it, one job per module:
`windowing`, `slicing`, `render`, `overlay`, `stats`, `review`, `paths`, `session`, `signals`, `figures`;
`browser` drives the app in headless Chromium for the end-to-end test and the screenshots.
"""
