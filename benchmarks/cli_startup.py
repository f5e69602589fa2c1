"""How fast the command line answers: `plait --help`, `plait train --help` and an argument error.

Each command runs as a fresh process (as a user types it), five times; the median wall time is
printed beside the time Python takes to import torch alone on the same machine, the cost that
parsing arguments no longer pays. Run from the repository root:

    .venv/bin/python benchmarks/cli_startup.py --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

PLAIT = str(Path(sys.executable).with_name("plait"))
COMMANDS = {
    "plait --help": [PLAIT, "--help"],
    "plait train --help": [PLAIT, "train", "--help"],
    "plait train --steps 0 (argument error)": [PLAIT, "train", "--steps", "0"],
    "plait train --schedule nope (argument error)": [PLAIT, "train", "--schedule", "nope"],
    "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
}


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    medians = {}
    for _ in range(args.runs):  # interleaved, so a busy moment hits every command alike
        for name, cmd in COMMANDS.items():
            medians.setdefault(name, []).append(wall(cmd))
    print(f"{'command':<46} {'median s':>9} {'max s':>7}")
    for name, times in medians.items():
        print(f"{name:<46} {statistics.median(times):>9.3f} {max(times):>7.3f}")
    worst = max(statistics.median(t) for n, t in medians.items() if n.startswith("plait"))
    torch = statistics.median(medians["python -c 'import torch' (for scale)"])
    print(f"slowest plait answer {worst:.3f} s (target < 1 s); importing torch alone {torch:.3f} s")


if __name__ == "__main__":
    main()
