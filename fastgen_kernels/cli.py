"""The ``fastgen-kernels`` command (also ``python -m fastgen_kernels``).

    fastgen-kernels info      versions, what the extension was built with, the GPU, and which
                              backend each op would use on each device and dtype
    fastgen-kernels train     train a model from data (SFT): --config run.yaml key=value ...
    fastgen-kernels distill   distill a teacher (cm, scm, meanflow, dmd2, f_distill, ladd): same
    fastgen-kernels sample    sample a saved model: --model DIR --steps N --out samples.npz
    fastgen-kernels bench     the benchmarks (pytest bench/ of a source checkout)
    fastgen-kernels demo      the embedded default: distill the shipped digits teacher, evaluate

train and distill read a YAML run config (fastgen_kernels.distill.run.RunConfig) with dotted
overrides, run under torchrun for several processes, and write the resolved config next to the
checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from fastgen_kernels import __version__, _extension, backends, ops


def _triton_version() -> str:
    if not backends.triton_installed():
        return "not installed"
    import triton

    interpreting = " (interpreter: TRITON_INTERPRET=1)" if backends.interpreting_triton() else ""
    return triton.__version__ + interpreting


def info() -> str:
    """A report of the environment and the backend each op would choose."""
    lines = [
        f"fastgen_kernels {__version__}",
        f"python          {platform.python_version()}",
        f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton          {_triton_version()}",
        f"extension CPU   {'built' if _extension.cpu_built() else _extension.unavailable_reason()}",
        f"CPU ISA         {torch.ops.fastgen_C.cpu_isa() if _extension.cpu_built() else '-'}",
        f"extension CUDA  {'built' if _extension.cuda_built() else 'not built'}",
    ]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"GPU {index}           {props.name} (sm_{props.major}{props.minor}, "
                         f"{props.total_memory / 2**30:.0f} GiB)")
        devices.append(torch.device("cuda"))
    else:
        lines.append("GPU             none")
    forced, source = backends.forced_backend()
    lines.append(f"backend         {f'{forced} (forced by {source})' if forced else 'automatic'}")
    lines.append("")
    lines.append(f"{'op':<34}{'device':<8}{'dtype':<10}backend")
    for name, module in ops.OP_MODULES.items():
        # the backward (inference-only ops have none) and the forward-mode rule's kernel, where the
        # op has one, with arguments matching the forward's example
        derived = [(getattr(module, dispatcher, None), getattr(module, f"example_{kind}_args", None))
                   for dispatcher, kind in (("backward_dispatcher", "backward"), ("jvp_dispatcher", "jvp"))]
        rows = [(module.forward_dispatcher, None)] + [(d, make) for d, make in derived if d and make]
        for dispatcher, make_args in rows:
            for device in devices:
                for dtype in (torch.float32, torch.bfloat16):
                    args = module.example_args(device, dtype)
                    if make_args is not None:
                        args = make_args(*args)
                    choice = backends.choice(dispatcher, *args)
                    lines.append(f"{dispatcher.name:<34}{device.type:<8}{str(dtype)[6:]:<10}{choice}")
    return "\n".join(lines)


class UsageError(Exception):
    """What the user gave (a config, an override, a folder) is wrong: printed without a traceback."""


@contextlib.contextmanager
def _user_input() -> Iterator[None]:
    """Errors raised inside the block come from the command line's arguments: UsageError."""
    try:
        yield
    except (ValueError, TypeError, OSError) as error:
        raise UsageError(str(error)) from error


def _positive_int(text: str) -> int:
    """argparse type of counts (steps, batch size): exit 2 with argparse's one line otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _finite_float(text: str) -> float:
    """argparse type of a finite number (a NaN guidance scale made every sample NaN)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {value}")
    return value


def _device(text: str | None) -> torch.device:
    """--device, checked before any loading: a name torch knows, and CUDA only where present."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise UsageError(f"--device {text!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text!r}: this machine has no CUDA device")
    return device


def _output_path(option: str, text: str, suffix: str = "") -> Path:
    """An output file whose folder exists (checked before sampling), with ``suffix`` added where
    the writer adds it (np.savez: ".npz")."""
    path = Path(text if text.endswith(suffix) else text + suffix)
    if not path.parent.is_dir():
        raise UsageError(f"{option} {text}: the folder {path.parent} does not exist")
    return path


def _train(args: argparse.Namespace) -> int:
    from fastgen_kernels import config as configs
    from fastgen_kernels.distill import METHODS
    from fastgen_kernels.distill.run import RunConfig, prepare
    from fastgen_kernels.distill.trainer import ResumeRefused

    with _user_input():
        config = configs.load(RunConfig, args.config, args.overrides)
        if config.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {config.method!r}")
        if (config.method == "sft") != (args.command == "train"):
            raise ValueError(f"method {config.method!r} belongs to "
                             f"`fastgen-kernels {'train' if config.method == 'sft' else 'distill'}`")
        trainer = prepare(config)
    try:
        trainer.train()
    except ResumeRefused as error:  # the output folder holds another run's checkpoints
        raise UsageError(str(error)) from error
    if trainer.rank == 0:  # under torchrun: once
        print(f"saved to {config.trainer.output_dir}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import numpy as np

    from fastgen_kernels import Denoiser, sample
    from fastgen_kernels.images import save_grid

    device = _device(args.device)
    out = _output_path("--out", args.out, ".npz")
    grid = _output_path("--grid", args.grid) if args.grid else None
    with _user_input():
        model = Denoiser.from_pretrained(args.model, device=device)
    cond = None
    if args.label is not None:
        if model.null_cond is None or not 0 <= args.label < int(model.null_cond):
            classes = "an unconditional model" if model.null_cond is None else f"classes 0-{int(model.null_cond) - 1}"
            raise UsageError(f"--label {args.label}: the model has {classes}")
        cond = torch.full((args.batch_size,), args.label, device=device, dtype=torch.long)
    elif model.null_cond is not None:  # class-conditional: cycle through the classes
        cond = torch.arange(args.batch_size, device=device) % int(model.null_cond)
    with _user_input():  # e.g. guidance for an unconditional model, a model saved without its shape
        x = sample(model, args.steps, batch_size=args.batch_size, cond=cond, guidance_scale=args.guidance_scale,
                   seed=args.seed)
    arrays = {"samples": x.float().cpu().numpy()}
    if cond is not None:
        arrays["labels"] = cond.cpu().numpy()
    np.savez(out, **arrays)
    if grid:
        save_grid(x, grid)
    print(f"{tuple(x.shape)} samples saved to {out}" + (f", grid {grid}" if grid else ""))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import pytest

    bench = Path(__file__).resolve().parents[1] / "bench"
    if not bench.is_dir():
        raise SystemExit("fastgen-kernels bench: the benchmarks live in bench/ of a source checkout "
                         "(pip install -e .); this install has none")
    return pytest.main([str(bench), *args.pytest_args])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastgen-kernels", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, build, GPU and the backend of each op")
    for name, what in (("train", "train a model from data (method sft)"),
                       ("distill", "distill a teacher into a few-step student")):
        command = commands.add_parser(name, help=what)
        command.add_argument("--config", help="a YAML run config (fastgen_kernels.distill.run.RunConfig)")
        command.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.iterations=2000")
    command = commands.add_parser("sample", help="sample a saved model")
    command.add_argument("--model", required=True, help="a Denoiser.save_pretrained folder")
    command.add_argument("--steps", type=_positive_int, default=1)
    command.add_argument("--batch-size", type=_positive_int, default=16)
    command.add_argument("--label", type=int, default=None, help="one class for all samples")
    command.add_argument("--guidance-scale", type=_finite_float, default=1.0)
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--device", default=None)
    command.add_argument("--out", default="samples.npz")
    command.add_argument("--grid", default=None, help="also write a PNG grid here")
    command = commands.add_parser("bench", help="run the benchmarks (a source checkout's bench/)")
    command.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed to pytest")
    command = commands.add_parser("demo", help="distill the shipped digits teacher and evaluate")
    from fastgen_kernels.demo import add_arguments

    add_arguments(command)
    # overrides may come before and after --config
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` (but a leading --) is pytest's, in its order
        args = parser.parse_args(["bench"])
        args.pytest_args = argv[2:] if argv[1:2] == ["--"] else argv[1:]
        extra = []
    else:
        args, extra = parser.parse_known_args(argv)
    if extra and (args.command not in ("train", "distill") or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "info":
            with _user_input():  # a FASTGEN_BACKEND that names no backend
                print(info())
        elif args.command in ("train", "distill"):
            args.overrides += extra
            return _train(args)
        elif args.command == "sample":
            return _sample(args)
        elif args.command == "bench":
            return _bench(args)
        elif args.command == "demo":
            from fastgen_kernels.demo import demo

            return demo(args)
    except UsageError as error:
        parser.exit(2, f"fastgen-kernels {args.command}: error: {error}\n")
    return 0
