"""Why does loading a cached .pt2 take long in a fresh process? Times aoti_load_package and records any child
processes (compilers) spawned meanwhile. Usage: python benchmarks/aoti_load_probe.py PT2 [device_index]"""

from __future__ import annotations

import os
import sys
import threading
import time
import zipfile

import torch

path = sys.argv[1]
index = int(sys.argv[2]) if len(sys.argv) > 2 else -1
names = zipfile.ZipFile(path).namelist()
print("package files:", len(names), sorted({os.path.splitext(n)[1] for n in names}))
seen: set[str] = set()
stop = threading.Event()


def watch() -> None:
    me = str(os.getpid())
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if pid.isdigit() and pid != me:
                try:
                    if open(f"/proc/{pid}/stat").read().split()[3] == me:
                        seen.add(open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:200])
                except OSError:
                    pass
        time.sleep(0.05)


thread = threading.Thread(target=watch, daemon=True)
thread.start()
start = time.perf_counter()
runner = torch._inductor.aoti_load_package(path, device_index=index)
print(f"aoti_load_package: {time.perf_counter() - start:.2f} s")
stop.set()
thread.join()
print("child processes during load:", sorted(seen)[:10])
