"""``python -m aftrec``: the same command line as ``aftrec``."""

from aftrec.cli import main

if __name__ == "__main__":
    main()
