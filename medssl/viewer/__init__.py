"""Grounding and region statistics of maps (`stats`). The app moved to `medssl.app`, the display library to
`medssl.display`; the grounding metrics here move to `medssl.downstream.grounding` with issue #16."""
