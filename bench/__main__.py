"""``python -m inferpool.bench``: run the benchmark suite (see :mod:`inferpool.bench.runner`)."""

from __future__ import annotations

import sys

from inferpool.bench.runner import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
