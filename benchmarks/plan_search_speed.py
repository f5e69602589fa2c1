"""How long `plait plan` takes to search a 4096-GPU job (target: under 10 s on this machine).

.venv/bin/python benchmarks/plan_search_speed.py
"""

from __future__ import annotations

import sys
import time

from plait.plan import get_hardware, get_model, search

CASES = [("gpt3-175b", "a100-80gb", 4096, 2048), ("llama3-405b", "h100-sxm", 4096, 2048)]


def main() -> int:
    worst = 0.0
    for model, hw, gpus, batch in CASES:
        t0 = time.perf_counter()
        res = search(get_model(model), get_hardware(hw), gpus, batch)
        dt = time.perf_counter() - t0
        worst = max(worst, dt)
        print(
            f"{model} on {gpus} x {hw}, batch {batch}: {dt:.2f} s, {res.considered} configurations "
            f"costed, best {res.best.config.label()} ({res.best.step_time_s:.2f} s/step)"
        )
    print(f"slowest search {worst:.2f} s (target < 10 s)")
    return 0 if worst < 10 else 1


if __name__ == "__main__":
    sys.exit(main())
