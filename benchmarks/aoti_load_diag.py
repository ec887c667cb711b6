"""Build a tiny CUDA .pt2, then time aoti_load_package in fresh processes with a cProfile of each (GPU)."""

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
PROFILE = (
    "import cProfile,pstats,io,time,torch;t=time.perf_counter();pr=cProfile.Profile();pr.enable();"
    f"r=torch._inductor.aoti_load_package({path!r},device_index=0);pr.disable();"
    "print('LOAD',round(time.perf_counter()-t,2));s=io.StringIO();"
    "pstats.Stats(pr,stream=s).sort_stats('cumulative').print_stats(18);print(s.getvalue()[-3500:])"
)
for label, extra in (("default", {}), ("vec_isa_ok", {"TORCHINDUCTOR_VEC_ISA_OK": "1"})):
    env = {**os.environ, **extra}
    out = subprocess.run([sys.executable, "-c", PROFILE], capture_output=True, text=True, env=env).stdout
    print(f"==== {label}\n{out}")
    out = subprocess.run([sys.executable, "benchmarks/aoti_load_probe.py", path, "0"], capture_output=True,
                         text=True, env=env).stdout
    print(out[:1500])
