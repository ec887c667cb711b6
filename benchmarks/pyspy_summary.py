"""Summarise a `py-spy record --idle --threads --format raw` profile: where one thread's wall time went.

For the chosen thread (default `MainThread`), every function's inclusive share of the samples (a function counted
once per sample however deep it recurses), largest first, and the leaf frames that held the most samples. With
`--idle`, samples spent waiting (on a compiler subprocess, a lock, a worker pool) are kept, so the shares are of wall
time, not CPU time.

Usage: python benchmarks/pyspy_summary.py PROFILE.txt [--rate 20] [--thread MainThread] [--top 60]
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def _function(frame: str) -> str:
    """`name (path/file.py:123)` -> `name (path/file.py)`: one entry per function, not per line."""
    match = _FRAME.match(frame.strip())
    return f"{match['name']} ({match['file']})" if match else frame.strip()


def summarise(path: Path, thread: str, rate: float, top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if not frames[0].endswith(thread):
            continue
        samples = int(count)
        total += samples
        functions = [_function(f) for f in frames[1:]]
        for function in set(functions):
            inclusive[function] += samples
        if functions:
            leaves[functions[-1]] += samples
    if not total:
        return f"no samples for thread {thread!r} in {path}"
    lines = [f"{path.name}: thread {thread}, {total} samples = {total / rate:.1f} s at {rate:g} Hz", "",
             "inclusive s   share  function"]
    lines += [f"{n / rate:11.1f}  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "leaf s        share  function"]
    lines += [f"{n / rate:11.1f}  {n / total:6.1%}  {f}" for f, n in leaves.most_common(top // 2)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--rate", type=float, default=20.0, help="the sampling rate given to py-spy (Hz)")
    parser.add_argument("--thread", default="MainThread")
    parser.add_argument("--top", type=int, default=60)
    args = parser.parse_args()
    print(summarise(args.profile, args.thread, args.rate, args.top))


if __name__ == "__main__":
    main()
