"""``python -m impl.model_cache ...`` is ``python -m impl.zoo ...``: one CLI for the cache and its models."""

from __future__ import annotations

import sys

from impl.zoo.__main__ import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m impl.model_cache"))
