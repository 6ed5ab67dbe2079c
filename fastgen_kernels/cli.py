"""The ``fastgen-kernels`` command (also ``python -m fastgen_kernels``).

    fastgen-kernels info     versions, what the extension was built with, the GPU, and which
                             backend each op would use on each device and dtype
"""

from __future__ import annotations

import argparse
import platform

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
        f"CPU loss ISA    {torch.ops.fastgen_C.cpu_loss_isa() if _extension.cpu_built() else '-'}",
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
        backward = getattr(module, "backward_dispatcher", None)  # inference-only ops have none
        for dispatcher in [module.forward_dispatcher] + ([backward] if backward else []):
            for device in devices:
                for dtype in (torch.float32, torch.bfloat16):
                    args = module.example_args(device, dtype)
                    if dispatcher is backward:
                        args = module.example_backward_args(*args)
                    choice = backends.choice(dispatcher, *args)
                    lines.append(f"{dispatcher.name:<34}{device.type:<8}{str(dtype)[6:]:<10}{choice}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastgen-kernels", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, build, GPU and the backend of each op")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    return 0
