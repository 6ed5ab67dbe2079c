"""Training and distillation: the distillation methods and the trainer.

``METHODS`` maps a method's name (as in configs and the CLI) to its class; each class has a
``Config`` frozen dataclass of options. See :mod:`fastgen_kernels.distill.base` for the protocol.
"""

from fastgen_kernels.distill.base import Batch, Method
from fastgen_kernels.distill.cm import CM, CMConfig
from fastgen_kernels.distill.dmd2 import DMD2, DMD2Config, FDistill, FDistillConfig
from fastgen_kernels.distill.ladd import LADD, LADDConfig
from fastgen_kernels.distill.meanflow import MeanFlow, MeanFlowConfig
from fastgen_kernels.distill.scm import SCM, SCMConfig
from fastgen_kernels.distill.sft import SFT, SFTConfig

METHODS: dict[str, type[Method]] = {
    "sft": SFT,
    "cm": CM,
    "scm": SCM,
    "meanflow": MeanFlow,
    "dmd2": DMD2,
    "f_distill": FDistill,
    "ladd": LADD,
}

__all__ = ["Batch", "CM", "CMConfig", "DMD2", "DMD2Config", "FDistill", "FDistillConfig", "LADD", "LADDConfig",
           "METHODS", "MeanFlow", "MeanFlowConfig", "Method", "SCM", "SCMConfig", "SFT", "SFTConfig"]
