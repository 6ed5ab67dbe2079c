"""Several processes: torchrun with 2 CPU processes (gloo), DDP and FSDP2, against one process on
the same global batch: the same losses and the same weights, within reduction-order round-off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastgen_kernels as fk

RUN = r"""
import json, sys
sys.path.insert(0, {tests!r})
import torch
from toy import ToyNet, mixture
import fastgen_kernels as fk
from fastgen_kernels.distill import DMD2, SCM, DMD2Config, SCMConfig
from fastgen_kernels.distill.trainer import OptimizerConfig, Trainer, TrainerConfig
from fastgen_kernels.distill.parallel import model_state

method_name, parallel, out, iterations, resume = sys.argv[1:6]
torch.manual_seed(0)
den = lambda net: fk.Denoiser(net, "trig", "trig_F", sigma_data=1.0, null_cond=4, shape=(2,))
teacher = den(ToyNet()).eval()
if method_name == "dmd2":
    method = DMD2(den(ToyNet()), teacher, DMD2Config(student_every=2, gan_weight=0.1))
else:
    method = SCM(den(ToyNet()), teacher, SCMConfig(warmup_iterations=2))
config = TrainerConfig(iterations=int(iterations), batch_size=32, grad_accumulation=2, output_dir=out,
                       progress=False, checkpoint_every=3, log_every=1, parallel=parallel, ema_decays=(0.9,),
                       resume=resume == "resume", optimizer=OptimizerConfig(lr=1e-3))
trainer = Trainer(method, mixture(256), config, device="cpu")
records = trainer.train()
state = model_state(method.network("student"))
if trainer.rank == 0:
    torch.save(state, out + "/student.pt")
    with open(out + "/records.json", "w") as f:
        json.dump(records, f)
"""


def _launch(tmp_path: Path, method: str, parallel: str, iterations: int = 6, resume: bool = False,
            name: str = "") -> tuple[list, dict, dict]:
    """(records, the student's final weights, its exported EMA) of a run in tmp_path/<method>-<name>."""
    script = tmp_path / "run.py"
    script.write_text(RUN.format(tests=str(Path(__file__).parent)))
    out = tmp_path / f"{method}-{name or parallel}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, str(script), method, parallel, str(out), str(iterations),
               "resume" if resume else "fresh"]
    if parallel != "none":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   *command[1:]]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    records = json.loads((out / "records.json").read_text())
    return ([{k: v for k, v in r.items() if k != "seconds"} for r in records], torch.load(out / "student.pt"),
            load_file(out / "student_ema0.9" / "model.safetensors"))


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("method", ["dmd2", "scm"])
def test_two_processes_match_one(method, tmp_path):
    """Losses, weights and EMA of DDP and FSDP2 runs against one process; an FSDP2 run stopped
    after 3 iterations and resumed ends where the uninterrupted one does (its sharded EMA saved
    whole in fp32 and re-sharded)."""
    single_records, single_state, single_ema = _launch(tmp_path, method, "none")
    runs = {}
    for parallel in ("ddp", "fsdp"):
        records, state, ema = runs[parallel] = _launch(tmp_path, method, parallel)
        assert [r["iteration"] for r in records] == [r["iteration"] for r in single_records]
        for a, b in zip(records, single_records):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (parallel, a["iteration"], key)
        for ours, theirs, what in ((state, single_state, "weights"), (ema, single_ema, "EMA")):
            assert ours.keys() == theirs.keys()
            for key in ours:
                torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=f"{parallel} {what} {key}")
    _launch(tmp_path, method, "fsdp", iterations=3, name="fsdp-resumed")
    _, state, ema = _launch(tmp_path, method, "fsdp", resume=True, name="fsdp-resumed")
    for ours, theirs, what in ((state, runs["fsdp"][1], "weights"), (ema, runs["fsdp"][2], "EMA")):
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7, msg=f"resumed {what} {key}")


def test_fsdp_sharded_dit_returns_no_views(single_rank_process_group):
    """FSDP2 warns, on every rank and call, of a view among a sharded module's outputs (an in-place
    op on it would skip the backward's all-gather): the log-variance head's u was a view."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    from fastgen_kernels.models import DiT, DiTConfig

    net = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                        num_classes=3, logvar_head=True))
    for block in net.blocks:
        fully_shard(block, mesh=single_rank_process_group)
    fully_shard(net, mesh=single_rank_process_group)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, u = net(torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 1, 2]), return_logvar=True)
        (out.square().sum() + u.sum()).backward()


def test_fsdp_sharded_network_exports_its_own_class(single_rank_process_group, tmp_path):
    """FSDP2 swaps in a class of its own (FSDPDiT); the export names the network's, so that
    from_pretrained (and `fastgen-kernels sample`) load a student trained with trainer.parallel=fsdp."""
    from torch.distributed.fsdp import fully_shard

    from fastgen_kernels.models import DiT, DiTConfig

    net = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                        num_classes=3))
    model = fk.Denoiser(net, "trig", "trig_F", sigma_data=0.5, distilled=True, null_cond=3, shape=(1, 8, 8))
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    for block in net.blocks:
        fully_shard(block, mesh=single_rank_process_group)
    fully_shard(net, mesh=single_rank_process_group)
    assert type(net).__name__ == "FSDPDiT"
    assert model.config()["net"]["class"] == "fastgen_kernels.models.dit.DiT"
    model.save_pretrained(tmp_path / "student", state_dict=expected)
    loaded = fk.Denoiser.from_pretrained(tmp_path / "student")
    assert type(loaded.net) is DiT
    assert all(torch.equal(v, expected[k]) for k, v in loaded.net.state_dict().items())

