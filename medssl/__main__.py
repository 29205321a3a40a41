"""`python -m medssl` runs the command line."""

from medssl.cli import main

if __name__ == "__main__":
    main()
