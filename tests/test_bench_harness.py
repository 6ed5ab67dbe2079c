"""The benchmark harness's own measurements (bench/conftest.py, bench/summarize.py), on the CPU:
peak memory that includes what an op allocates and frees inside itself, and the table's speedups
over a goal's second peer."""

import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).parent.parent / "bench"


def _module(name: str):
    # bench/conftest.py under a name of its own: tests/conftest.py is `conftest` here
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.library.custom_op("fastgen_test::with_a_temporary", mutates_args=())
def _with_a_temporary(x: torch.Tensor) -> torch.Tensor:
    temporary = torch.ones(8 * 2**20)  # 32 MiB, freed before the op returns
    return x + temporary[0]


def test_cpu_peak_includes_what_an_op_frees_inside_itself():
    """The peak of the allocator's running total: an op's 32 MiB temporary counts though the op
    frees it (its own net memory is its small output; the sum of the ops' net memory read 0)."""
    conftest = _module("conftest")
    x = torch.randn(16)
    assert conftest.peak_extra_bytes(lambda: _with_a_temporary(x), "cpu") >= 32 * 2**20
    held = []
    assert conftest.peak_extra_bytes(lambda: held.append(torch.empty(2**20)), "cpu") == 4 * 2**20


def test_summary_gives_the_speedup_over_a_goals_second_peer(tmp_path, capsys):
    def row(op, provider, ms, peer):
        info = dict(op=op, provider=provider, median_ms=ms, device="GPU", dtype="torch.float32", mode="cuda_graph",
                    shape=[8, 4], peer=peer, speedup_vs_peer=1.0, gbps=1.0)
        return {"name": provider, "extra_info": info}

    rows = [row("vsd_loss", "cuda", 1.0, "eager"), row("vsd_loss", "compile", 2.5, "eager"),
            row("fp8_linear", "fused", 2.0, "scaled_mm + epilogue"), row("fp8_linear", "scaled_mm", 1.8, "x")]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": rows}))
    _module("summarize").main([str(path)])
    lines = {line.split()[5]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["cuda"].endswith("eager, 2.50x compile")
    assert lines["fused"].endswith("scaled_mm + epilogue, 0.90x scaled_mm")
    assert "x compile" not in lines["compile"] and "x scaled_mm" not in lines["scaled_mm"].split("x ", 1)[1]
