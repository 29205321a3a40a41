"""The text side of report grounding: `statements` (report -> classified statements, sizes, mentions),
`concepts` (the vocabulary of organs, finding kinds, places and sides), `query` (a phrase -> what to find
where) and `encoders` (the frozen MiniLM sentence encoder that reads unknown words). Submodules are imported
explicitly, so importing `medssl.text` pulls in neither torch nor transformers."""
