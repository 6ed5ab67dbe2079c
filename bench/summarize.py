"""Prints a table from pytest-benchmark JSON: median, GB/s, fraction of the measured copy
bandwidth of the same run and device, and speedup against the eager composition.

    python bench/summarize.py results.json
"""

import json
import sys


def main(path: str) -> None:
    with open(path) as f:
        benches = [b["extra_info"] | {"name": b["name"]} for b in json.load(f)["benchmarks"]]
    ceiling = {b["device"]: b["gbps"] for b in benches if b["op"] == "copy"}
    print(f"{'op':<22}{'device':<24}{'dtype':<16}{'mode':<18}{'shape':<16}{'provider':<9}"
          f"{'ms':>9}{'GB/s':>9}{'of copy':>9}{'vs eager':>9}")
    for b in sorted(benches, key=lambda b: (b["op"], b["device"], b["dtype"], b["mode"], b["shape"], b["provider"])):
        if b["op"] == "copy":
            continue
        frac = f"{b['gbps'] / ceiling[b['device']]:.0%}" if b["device"] in ceiling else "-"
        print(f"{b['op']:<22}{b['device'][:23]:<24}{b['dtype'][6:]:<16}{b['mode']:<18}"
              f"{'x'.join(map(str, b['shape'])):<16}{b['provider']:<9}{b['median_ms']:>9.3f}"
              f"{b['gbps']:>9.1f}{frac:>9}{b['speedup_vs_eager']:>8.2f}x")
    for device, gbps in ceiling.items():
        print(f"copy ceiling on {device}: {gbps:.1f} GB/s")


if __name__ == "__main__":
    main(sys.argv[1])
