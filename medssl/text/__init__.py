"""The text side of report grounding: `statements` (report -> classified statements, sizes,
mentions), `tokenizer` (a WordPiece tokenizer fitted on the training reports) and `encoders`
(text -> token and pooled features). Submodules are imported explicitly, so importing
`medssl.text` pulls in neither torch nor `tokenizers`."""
