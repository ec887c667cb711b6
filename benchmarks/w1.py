"""Workload W1 (shared/FACTS.md): SwinUNETR(feature_size 48, 1->2), sliding window over 240x240x160, ROI 96^3,
sw_batch 8, overlap 0.5. The measurement now lives in the package: this script is a shortcut for

    python -m monai_trt bench --workload w1 [bench flags...]

e.g. ``python benchmarks/w1.py --out w1_results --precisions fp16 --budget 420`` (see docs/cli.md, `bench`).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from monai_trt.cli.commands import main

    sys.argv = [sys.argv[0], "bench", "--workload", "w1", *sys.argv[1:]]
    main()
