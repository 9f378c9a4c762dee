"""``python -m aftrec``: the same command line as ``aftrec``, with the same exit status."""

import sys

from aftrec.cli import main

if __name__ == "__main__":
    sys.exit(main())
