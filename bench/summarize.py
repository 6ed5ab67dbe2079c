"""Prints a table from pytest-benchmark JSON: median, rate (GB/s for memory-bound ops, TFLOP/s for
attention), the fraction of the ceiling measured in the same run on the same device (copy
bandwidth; matmul rate in the same dtype, bf16's for fp16), and the speedup over the peer.

    python bench/summarize.py results.json [more.json ...]

Several files (one per benchmark file of a run) make one table; the ceilings may come from any
(the last file's, where several have one). Where a row's group (op, device, dtype, mode, shape)
also has a second peer a goal names, the speedup over it follows: torch.compile's (the losses'
1.3x), and ``_scaled_mm`` alone for fp8_linear (0.95x).
"""

import json
import sys

CEILING_OPS = ("copy", "matmul")
SECOND_PEERS = {"fp8_linear": "scaled_mm"}  # the provider whose row is a goal's second peer; else "compile"


def ceiling_key(b: dict) -> tuple:
    if "tflops" in b:
        return ("matmul", b["device"], "torch.bfloat16" if b["dtype"] == "torch.float16" else b["dtype"])
    return ("copy", b["device"])


def main(paths: list[str]) -> None:
    benches = []
    for path in paths:
        with open(path) as f:
            # a run stopped at its time limit (bench/gpu_check.sh) leaves its last benchmark without extra_info
            benches += [b["extra_info"] | {"name": b["name"]} for b in json.load(f)["benchmarks"]
                        if "op" in b["extra_info"]]
    ceilings = {}
    for b in benches:
        if b["op"] == "copy":
            ceilings[("copy", b["device"])] = b["gbps"]
        elif b["op"] == "matmul":
            ceilings[("matmul", b["device"], b["dtype"])] = b["tflops"]
    print(f"{'op':<22}{'device':<24}{'dtype':<10}{'mode':<18}{'shape':<20}{'provider':<36}"
          f"{'ms':>10}{'rate':>16}{'of ceiling':>11}{'vs peer':>16}")
    order = lambda b: (b["op"], b["device"], b["dtype"], b["mode"], b["shape"], b["provider"])  # noqa: E731
    group = lambda b: (b["op"], b["device"], b["dtype"], b["mode"], str(b["shape"]))  # noqa: E731
    group_ms = {(*group(b), b["provider"]): b["median_ms"] for b in benches}
    for b in sorted(benches, key=order):
        if b["op"] in CEILING_OPS:
            continue
        rate, frac = "-", "-"
        if "tflops" in b or "gbps" in b:
            rate = f"{b['tflops']:.2f} TFLOP/s" if "tflops" in b else f"{b['gbps']:.1f} GB/s"
            ceiling = ceilings.get(ceiling_key(b))
            frac = f"{(b.get('tflops') or b['gbps']) / ceiling:.0%}" if ceiling else "-"
        memory = f", memory {b['memory_vs_peer']:.2f}x" if "memory_vs_peer" in b else ""
        second = SECOND_PEERS.get(b["op"], "compile")
        second_ms = group_ms.get((*group(b), second))
        if second_ms is not None and b["provider"] != second:
            memory = f", {second_ms / b['median_ms']:.2f}x {second}{memory}"
        provider = b["provider"]
        if b.get("variant") and b["variant"] not in provider:  # the kernel variant the op chose
            provider += f" ({b['variant']})"
        print(f"{b['op']:<22}{b['device'][:23]:<24}{b['dtype'][6:]:<10}{b['mode']:<18}"
              f"{'x'.join(map(str, b['shape'])):<20}{provider:<36}{b['median_ms']:>10.3f}"
              f"{rate:>16}{frac:>11}{b['speedup_vs_peer']:>8.2f}x {b['peer']}{memory}")
    for key, value in ceilings.items():
        unit = "GB/s" if key[0] == "copy" else "TFLOP/s"
        print(f"{' '.join(key)} ceiling: {value:.1f} {unit}")


if __name__ == "__main__":
    main(sys.argv[1:])
