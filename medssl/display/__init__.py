"""The display library: what heads and the app share to show volumes and maps, without Streamlit.

`windowing` (width/level presets, the window a phrase opens in), `slicing` (orientation-true planes, mm),
`overlay` (map and label compositing, colour bars, PNG with provenance), `figures` (figures the heads write).
"""
