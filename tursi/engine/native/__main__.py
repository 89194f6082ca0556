"""python -m tursi.engine.native: build the fused decode kernels for this machine."""

import sys

from . import build

if __name__ == "__main__":
    try:
        print(f"tursi native kernels: {build(verbose='-v' in sys.argv)}")
    except Exception as exc:  # reported; the server runs without them
        print(f"tursi native kernels not built: {exc}", file=sys.stderr)
        sys.exit(1)
