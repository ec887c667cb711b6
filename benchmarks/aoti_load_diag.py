"""Build a tiny CUDA .pt2, then time a fresh process's steps up to aoti_load_package; dump its stacks every 4 s.

Usage (GPU machine): python benchmarks/aoti_load_diag.py > diag.txt 2>&1
"""

import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.nets import TinySeg  # noqa: E402

path = os.path.join(tempfile.mkdtemp(), "tiny.pt2")
net = TinySeg().cuda().eval()
program = torch.export.export(net, (torch.randn(1, 1, 8, 8, 8, device="cuda"),))
torch._inductor.aoti_compile_and_package(program, package_path=path)
STEPS = f"""
import faulthandler, sys, time
faulthandler.enable()
faulthandler.dump_traceback_later(4, repeat=True)
t = time.perf_counter()
def step(name):
    global t
    now = time.perf_counter(); print('STEP', name, round(now - t, 2), flush=True); t = now
import torch; step('import torch')
torch.zeros(1, device='cuda'); step('cuda init')
import torch._inductor; step('import torch._inductor')
runner = torch._inductor.aoti_load_package({path!r}, device_index=0); step('aoti_load_package')
out = runner(torch.randn(1, 1, 8, 8, 8, device='cuda')); torch.cuda.synchronize(); step('first call')
faulthandler.cancel_dump_traceback_later()
"""
for label in ("first", "second"):
    proc = subprocess.run([sys.executable, "-u", "-c", STEPS], capture_output=True, text=True)
    print(f"==== {label} rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-20000:]}", flush=True)
