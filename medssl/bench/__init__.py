"""Benchmarks that print their numbers; `medssl bench NAME` runs them."""
