"""Build a tiny CUDA .pt2, then time aoti_load_package in fresh processes, step by step, with a cProfile (GPU)."""

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
STEPS = (
    "import time;t0=time.perf_counter();import torch;t1=time.perf_counter();torch.cuda.init();"
    "torch.zeros(1,device='cuda');t2=time.perf_counter();import torch._inductor;t3=time.perf_counter();"
    "import cProfile,pstats,io;pr=cProfile.Profile();pr.enable();"
    f"r=torch._inductor.aoti_load_package({path!r},device_index=0);pr.disable();t4=time.perf_counter();"
    "print('IMPORT_TORCH',round(t1-t0,2),'CUDA_INIT',round(t2-t1,2),'IMPORT_INDUCTOR',round(t3-t2,2),"
    "'LOAD',round(t4-t3,2));s=io.StringIO();ps=pstats.Stats(pr,stream=s);ps.sort_stats('cumulative').print_stats(40);"
    "ps.sort_stats('tottime').print_stats(25);print(s.getvalue())"
)
for label, extra in (("default", {}), ("again", {})):
    env = {**os.environ, **extra}
    proc = subprocess.run([sys.executable, "-u", "-c", STEPS], capture_output=True, text=True, env=env)
    print(f"==== {label} rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
