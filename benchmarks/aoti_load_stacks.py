"""Where does a fresh process spend the load of a cached .pt2? Dumps all stacks every 3 s while loading it.

Usage (GPU): python benchmarks/aoti_load_stacks.py PATH.pt2 > stacks.txt 2>&1
"""

import faulthandler
import sys
import time

start = time.perf_counter()
import torch  # noqa: E402

from monai_trt.backends.aoti import load_package  # noqa: E402

print("import", round(time.perf_counter() - start, 2), flush=True)
torch.zeros(1, device="cuda")
print("cuda init", round(time.perf_counter() - start, 2), flush=True)
faulthandler.dump_traceback_later(3, repeat=True)
runner = load_package(sys.argv[1], 0)
faulthandler.cancel_dump_traceback_later()
print("loaded", round(time.perf_counter() - start, 2), flush=True)
