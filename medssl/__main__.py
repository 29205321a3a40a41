"""`python -m medssl` runs the command line."""

from medssl.cli import main

main()
