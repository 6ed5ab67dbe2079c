"""`python -m fastgen_kernels info` and the `fastgen-kernels` entry point."""

import shutil
import subprocess
import sys

import pytest

from fastgen_kernels import cli


def test_info_reports_versions_build_and_backends():
    report = cli.info()
    for needle in ("torch", "triton", "extension CPU", "extension CUDA", "GPU",
                   "fastgen.modulated_norm", "fastgen.gated_residual_backward", "fastgen.modulated_norm_jvp",
                   "fastgen.qk_norm_rope_jvp", "fastgen.attention_jvp"):
        assert needle in report


def test_info_names_a_bad_backend_variable(monkeypatch, capsys):
    monkeypatch.setenv("FASTGEN_BACKEND", "fastest")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["info"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "FASTGEN_BACKEND: unknown backend 'fastest'" in err and "Traceback" not in err


def test_bench_hands_every_argument_to_pytest(monkeypatch):
    """`bench -k x` exited 2 (unrecognized -k); `bench -- -k x` handed pytest the '--'."""
    import pytest as pytest_module

    seen = []
    monkeypatch.setattr(pytest_module, "main", lambda args: seen.append(args) or 0)
    for argv in (["bench", "-k", "gelu", "--benchmark-only"], ["bench", "--", "-k", "gelu", "--benchmark-only"]):
        assert cli.main(argv) == 0
        assert seen.pop()[1:] == ["-k", "gelu", "--benchmark-only"]


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "fastgen_kernels", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "fastgen.modulated_norm" in out


@pytest.mark.skipif(shutil.which("fastgen-kernels") is None, reason="package not installed")
def test_console_script_runs():
    out = subprocess.run(["fastgen-kernels", "info"], capture_output=True, text=True, check=True).stdout
    assert "backend" in out


def test_train_distill_and_sample_from_the_command_line(tmp_path):
    """train (SFT, YAML + dotted overrides) -> distill (DMD2 from it) -> sample, on a tiny DiT and
    random 8x8 data; every run writes its resolved config next to its checkpoints."""
    import numpy as np
    import torch
    import yaml

    import fastgen_kernels as fk

    torch.save({"x": torch.randn(64, 1, 8, 8), "labels": torch.randint(0, 3, (64,))}, tmp_path / "data.pt")
    config = {"student": {"net": {"input_size": 8, "in_channels": 1, "hidden_size": 32, "depth": 2,
                                  "num_heads": 2, "num_classes": 3}, "schedule": "trig", "prediction": "trig_F"},
              "data": {"source": str(tmp_path / "data.pt")},
              "trainer": {"iterations": 100, "batch_size": 16, "progress": False, "checkpoint_every": 2},
              "device": "cpu"}
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(config))
    teacher = tmp_path / "teacher"
    assert cli.main(["train", "trainer.iterations=3", "--config", str(tmp_path / "teacher.yaml"),
                     f"trainer.output_dir={teacher}", "trainer.optimizer.lr=1e-3"]) == 0   # before and after
    resolved = yaml.safe_load((teacher / "config.yaml").read_text())
    assert resolved["trainer"]["iterations"] == 3 and resolved["trainer"]["optimizer"]["lr"] == 1e-3
    assert (teacher / "checkpoints" / "checkpoint-00000003.safetensors").exists()
    model = fk.Denoiser.from_pretrained(teacher / "student_ema0.999")
    assert model.schedule.name == "trig" and model.null_cond == 3 and not model.distilled

    student = tmp_path / "student"
    assert cli.main(["distill", "method=dmd2", f"teacher={teacher / 'student'}", "student.init=teacher",
                     f"data.source={tmp_path / 'data.pt'}", "trainer.iterations=2", "trainer.batch_size=8",
                     "trainer.progress=false", f"trainer.output_dir={student}", "device=cpu",
                     "method_options.student_every=2"]) == 0
    assert fk.Denoiser.from_pretrained(student / "student").distilled
    resolved = yaml.safe_load((student / "config.yaml").read_text())   # as built and run
    assert resolved["method_options"]["student_every"] == 2 and "guidance_scale" in resolved["method_options"]
    assert resolved["student"]["net"]["hidden_size"] == 32 and resolved["student"]["null_cond"] == 3
    assert cli.main(["sample", "--model", str(student / "student"), "--steps", "1", "--batch-size", "6",
                     "--out", str(tmp_path / "s.npz"), "--grid", str(tmp_path / "s.png")]) == 0
    saved = np.load(tmp_path / "s.npz")
    assert saved["samples"].shape == (6, 1, 8, 8) and list(saved["labels"]) == [0, 1, 2, 0, 1, 2]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    # the teacher's folder again, with fewer iterations than its checkpoint: one line, exit 2
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", str(tmp_path / "teacher.yaml"), "trainer.iterations=2",
                  f"trainer.output_dir={teacher}"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("argv, message", [
    (["train", "method=dmd2"], "method 'dmd2' belongs to `fastgen-kernels distill`"),
    (["train", "method=nonsense"], "method must be one of"),
    (["distill", "method=nonsense"], "method must be one of"),
    (["train", "trainer.iteratons=3"], "unknown key 'trainer.iteratons'"),
    (["train", "trainer.iterations=abc"], "trainer.iterations: expected int"),
    (["train", "trainer.log_every=0"], "trainer.log_every must be >= 1"),
    (["distill", "method=dmd2", "method_options.foo=1"], "unknown key 'method_options.foo'"),
    (["train", "--config", "no-such.yaml"], "No such file"),
    (["sample", "--model", "no-such-folder"], "No such file"),
    (["sample", "--model", "{teacher}", "--label", "10"], "--label 10: the model has classes 0-9"),
    (["sample", "--model", "{teacher}", "--steps", "0"], "--steps: must be an integer >= 1, got 0"),
    (["sample", "--model", "{teacher}", "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (["sample", "--model", "{teacher}", "--steps", "abc"], "--steps: must be an integer >= 1, got 'abc'"),
    # these raised tracebacks (exit 1), the last after sampling:
    (["sample", "--model", "{teacher}", "--device", "foo"], "--device 'foo': Expected one of"),
    (["sample", "--model", "{teacher}", "--guidance-scale", "nan"], "--guidance-scale: must be finite"),
    (["sample", "--model", "{teacher}", "--out", "no-such-folder/x"], "the folder no-such-folder does not exist"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    """A wrong config, override or folder: exit status 2 and one line naming it, no traceback."""
    from pathlib import Path

    teacher = str(Path(cli.__file__).parent / "assets" / "digits_teacher")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([a.format(teacher=teacher) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
