"""The embedded default, end to end at the --quick budget: every output is written and sane."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

from fastgen_kernels import cli  # noqa: E402


def test_demo_quick_writes_the_table_grid_and_samples(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["model"], r["steps"]): r for r in results["rows"]}
    assert set(rows) == {("teacher", 50), ("DMD2", 1), ("sCD", 1), ("sCD", 2)}
    for row in rows.values():
        assert np.isfinite(row["fd"]) and 0 <= row["accuracy"] <= 1 and row["ms_per_image"] > 0
    assert rows[("teacher", 50)]["accuracy"] > 0.9          # the shipped teacher draws the asked digits
    assert rows[("DMD2", 1)]["speedup"] > 5                  # 1 evaluation against 50
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = np.load(tmp_path / "samples_dmd2_1step.npz")
    assert samples["samples"].shape == (100, 1, 8, 8) and samples["labels"].shape == (100,)
    assert "| DMD2 | 1 |" in (tmp_path / "results.md").read_text()
    assert "| teacher | 50 |" in capsys.readouterr().out
