"""Run `train(config)` in this fresh process and print its peak memory growth as JSON.

The baseline is the resident set after the heavy imports (torch, transformers, DeepSpeed), so what the
run adds is measured: the peak resident set (`ru_maxrss`) minus that baseline. Used by test_plan.py.
"""

from __future__ import annotations

import json
import resource
import sys


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(config_path: str) -> None:
    import deepspeed  # noqa: F401  (imported by the run; counted in the baseline)

    from moe_recipes.config import load_config
    from moe_recipes.train.metrics import peak_rss_bytes
    from moe_recipes.train.trainer import train

    cfg = load_config(config_path)
    baseline = _rss_bytes()
    rc = train(cfg)
    peak = peak_rss_bytes()  # not ru_maxrss: it starts at the test session's size, inherited across exec
    print(json.dumps({"rc": rc, "baseline": baseline, "growth": peak - baseline}))


if __name__ == "__main__":
    main(sys.argv[1])
