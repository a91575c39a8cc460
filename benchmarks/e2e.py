"""End-to-end long-video benchmark (Qwen2.5-VL-7B language model, dense SDPA vs ``backend="nsa"``, prefill and
decode); the code lives in `nsa_compile.bench`, this is ``nsa-compile bench --e2e``:

    python benchmarks/e2e.py [--tokens 16384 32768 65536 131072] [--out BENCHMARKS.md]
    python benchmarks/e2e.py --probe-only --modes dense
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, if not installed

from nsa_compile.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
