#!/usr/bin/env python
"""Redraw the RoPE pictures of the README into scripts/img/ (the code lives in llama_min/inspect/rope_viz.py).

    python scripts/rope_viz.py                       # all pictures into scripts/img/
    python scripts/rope_viz.py --only decay scaling  # just these two
    python scripts/rope_viz.py --out /tmp/rope --dpi 150

Needs matplotlib: pip install 'llama_min[viz]'.
"""

import sys
from pathlib import Path

from llama_min.inspect.rope_viz import main

if __name__ == "__main__":
    sys.exit(main(default_out=Path(__file__).resolve().parent / "img"))
