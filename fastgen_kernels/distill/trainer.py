"""The trainer: runs a method's training steps with its optimizers, on one process or several.

Per iteration: the method says which optimizers step (``optimizers_at``); the global batch is split
into ``grad_accumulation`` micro-batches and each into one slice per process; each micro-batch's
losses are back-propagated (gradients synchronized across processes on the last one only: the same
gradient as the whole batch's, except for a method whose loss is normalized per micro-batch,
``Method.batch_statistics``, of which the trainer warns), the
gradients of each stepping optimizer clipped to ``clip_grad_norm`` and the optimizers stepped, with
the learning rate of a linear warm-up followed by a constant, cosine or linear decay. The student's
EMAs (several decay rates, one fused pass) follow each student step.

Data order and every random draw are functions of (seed, iteration): a resumed run continues the
interrupted one's loss trajectory exactly, and N processes see what one process would. Checkpoints
(one safetensors file each, written atomically) hold every trainable network, the student's EMAs,
every optimizer's state, the RNG states, the iteration and the resolved config; they are full
(unsharded) tensors, so a run may resume on another number of processes.

Output folder: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON line per logged
iteration), ``checkpoints/``, and at the end ``student/`` and ``student_ema<decay>/``
(``Denoiser.save_pretrained``: they load with ``Denoiser.from_pretrained`` and sample at once).
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fastgen_kernels.config import save_yaml, to_dict
from fastgen_kernels.denoiser import Denoiser
from fastgen_kernels.distill import checkpoint as ckpt
from fastgen_kernels.distill import parallel
from fastgen_kernels.distill.base import Batch, Method, batch_seed, forward_backward
from fastgen_kernels.distill.cuda_graph import GraphedStep
from fastgen_kernels.distill.ema import EMA

OPTIMIZERS = {"adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}


class ResumeRefused(ValueError):
    """The output folder's checkpoint cannot continue this run (the CLI says so in one line)."""


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "radam"] = "adamw"
    lr: float = 1e-4
    learning_rates: dict[str, float] = field(default_factory=dict)  # per optimizer name, e.g. fake_score
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_iterations: int = 0
    decay: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0
    clip_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        _check_at_least("optimizer", self, ("warmup_iterations", 0))
        for name, value in (("lr", self.lr), ("eps", self.eps),
                            *((f"learning_rates.{k}", v) for k, v in self.learning_rates.items())):
            if not value > 0:
                raise ValueError(f"optimizer.{name} must be > 0, got {value}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"optimizer.clip_grad_norm must be > 0 or None (no clipping), got {self.clip_grad_norm}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"optimizer.betas must be in [0, 1), got {self.betas}")


@dataclass(frozen=True)
class TrainerConfig:
    iterations: int = 1000
    batch_size: int = 64                  # the global batch: all processes and micro-batches
    grad_accumulation: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    ema_decays: tuple[float, ...] = (0.999,)
    seed: int = 0
    output_dir: str = "runs/run"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = True
    log_every: int = 10
    progress: bool | None = None          # a tqdm bar (default: when stderr is a terminal)
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    cuda_graph: bool = False              # replay each micro-batch's forward + backward from a CUDA graph
    wandb_project: str | None = None      # log to Weights & Biases too (if installed)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self) -> None:
        # checked here, not where a value is first used: some of them only after a checkpoint
        _check_at_least("trainer", self, ("iterations", 0), ("batch_size", 1), ("grad_accumulation", 1),
                        ("checkpoint_every", 1), ("keep_checkpoints", 1), ("log_every", 1))


def _check_at_least(prefix: str, config: Any, *fields: tuple[str, int]) -> None:
    for name, low in fields:
        value = getattr(config, name)
        if value < low:
            raise ValueError(f"{prefix}.{name} must be >= {low}, got {value}")


def learning_rate_factor(config: OptimizerConfig, iteration: int, iterations: int) -> float:
    """Warm-up (linear from 1 / warmup to 1), then constant / cosine / linear decay to min_lr_ratio."""
    warmup = config.warmup_iterations
    if iteration < warmup:
        return (iteration + 1) / warmup
    if config.decay == "constant":
        return 1.0
    progress = min(1.0, (iteration - warmup) / max(1, iterations - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.decay == "cosine" else 1 - progress
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape


class Trainer:
    """``Trainer(method, data, config).train()``.

    data: (x (N, ...) tensor, labels (N,) or None), the whole dataset (small enough to index in
    memory; each process reads its own rows). ``config_record``: the dataclass to write as
    config.yaml and into checkpoints (the caller's full run config; default: the trainer's).
    """

    def __init__(self, method: Method, data: tuple[Tensor, Tensor | None], config: TrainerConfig | None = None,
                 *, device: str | torch.device | None = None, config_record: Any = None) -> None:
        self.config = config = config or TrainerConfig()
        x, labels = data
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise ValueError(f"Trainer: data[0] must be an (N, ...) tensor, got {getattr(x, 'shape', type(x))}")
        if labels is not None and labels.shape != (x.shape[0],):
            raise ValueError(f"Trainer: data[1] must be ({x.shape[0]},) labels, got {tuple(labels.shape)}")
        self.rank, self.world, self.device = parallel.init(device)
        if self.world > 1 and config.parallel == "none":  # each process would train its own copy
            raise ValueError(f"Trainer: launched as {self.world} processes (torchrun) with parallel='none': "
                             "set trainer.parallel to 'ddp' or 'fsdp'")
        per_step = config.batch_size // config.grad_accumulation
        if config.batch_size % (config.grad_accumulation * self.world):
            raise ValueError(f"Trainer: batch_size {config.batch_size} must be a multiple of grad_accumulation "
                             f"({config.grad_accumulation}) x processes ({self.world})")
        self.micro_global, self.micro_local = per_step, per_step // self.world
        if config.grad_accumulation > 1 and method.batch_statistics:
            warnings.warn(f"Trainer: {type(method).__name__} normalizes its loss by a statistic of each "
                          f"micro-batch of {per_step}, so grad_accumulation={config.grad_accumulation} "
                          "approximates, not equals, a step on the whole batch", stacklevel=2)
        self.x, self.labels = x, labels
        self._orders: dict[int, Tensor] = {}
        self.method = method.to(self.device)
        self.method.wrap(parallel.wrapper(config.parallel, self.device))
        self.names = method.optimizer_names
        opt = config.optimizer
        unknown = set(opt.learning_rates) - set(self.names)
        if unknown:
            raise ValueError(f"Trainer: optimizer.learning_rates names {sorted(unknown)}, but this method's "
                             f"optimizers are {list(self.names)}")
        self.base_lr = {n: opt.learning_rates.get(n, opt.lr) for n in self.names}
        self.optimizers = {n: OPTIMIZERS[opt.name]([p for p in method.network(n).parameters() if p.requires_grad],
                                                   lr=self.base_lr[n], betas=opt.betas, eps=opt.eps,
                                                   weight_decay=opt.weight_decay,
                                                   **({"decoupled_weight_decay": True} if opt.name == "radam" else {}))
                           for n in self.names}
        self.ema = EMA(method.network("student"), config.ema_decays) if config.ema_decays else None
        self.autocast_dtype = torch.bfloat16 if config.precision == "bf16" else None
        self.graphed = None
        if config.cuda_graph:
            if self.world > 1 or config.parallel != "none":  # gradient hooks a graph cannot hold
                raise ValueError(f"Trainer: cuda_graph=True needs one process, got {self.world} with "
                                 f"parallel={config.parallel!r}")
            self.graphed = GraphedStep(self.method, self.autocast_dtype)
        self.out = Path(config.output_dir)
        self.config_record = to_dict(config if config_record is None else config_record)
        self.iteration = 0
        self.wandb = None

    # data ---------------------------------------------------------------------------------------

    def _order(self, epoch: int) -> Tensor:
        """The permutation of the dataset for one epoch (a function of seed and epoch), kept for
        the current and the next epoch only: drawn once per epoch, not once per batch."""
        if epoch not in self._orders:
            seed = int(np.random.SeedSequence([self.config.seed, epoch]).generate_state(1)[0])
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = torch.randperm(self.x.shape[0], generator=torch.Generator().manual_seed(seed))
        return self._orders[epoch]

    def batch(self, iteration: int, micro: int) -> Batch:
        """This process's rows of micro-batch ``micro`` of ``iteration``."""
        start = iteration * self.config.batch_size + micro * self.micro_global + self.rank * self.micro_local
        positions = torch.arange(start, start + self.micro_local)
        n = self.x.shape[0]
        epochs = (positions // n).tolist()
        orders = {e: self._order(e) for e in set(epochs)}
        index = torch.stack([orders[e][p] for e, p in zip(epochs, (positions % n).tolist())])
        x0 = self.x[index].to(self.device)
        cond = None if self.labels is None else self.labels[index].to(self.device)
        # draws are made for the whole global batch, so neither the processes nor the micro-batches
        # change them
        return Batch(x0, cond, batch_seed(self.config.seed, iteration), self.config.batch_size,
                     start - iteration * self.config.batch_size)

    # one iteration ------------------------------------------------------------------------------

    def step(self, iteration: int) -> dict[str, Tensor]:
        """One iteration: forward/backward over the micro-batches, clip, step; the metrics."""
        cfg, names = self.config, self.method.optimizers_at(iteration)
        for name in names:
            for group in self.optimizers[name].param_groups:
                group["lr"] = self.base_lr[name] * learning_rate_factor(cfg.optimizer, iteration, cfg.iterations)
        stepping = [self.method.network(n) for n in names]
        metrics: dict[str, Tensor] = {}
        for micro in range(cfg.grad_accumulation):
            batch = self.batch(iteration, micro)
            if self.graphed is not None:
                out = self.graphed(batch, iteration, names, 1 / cfg.grad_accumulation)
            else:
                # the backward inside too: FSDP2 reduces gradients in it
                with parallel.no_gradient_sync(stepping, skip=micro < cfg.grad_accumulation - 1):
                    out = forward_backward(self.method, batch, iteration, names, 1 / cfg.grad_accumulation,
                                           self.autocast_dtype)
            for key, value in out.items():
                if key not in self.optimizers:
                    metrics[key] = metrics.get(key, 0) + value.float() / cfg.grad_accumulation
        for name in names:
            if cfg.optimizer.clip_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(self.optimizers[name].param_groups[0]["params"],
                                                      cfg.optimizer.clip_grad_norm)
                metrics[f"grad_norm/{name}"] = parallel.replicated(norm.detach()).float()
            self.optimizers[name].step()
        for optimizer in self.optimizers.values():  # the generator's GAN loss reaches the discriminator too
            optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and "student" in names:
            self.ema.update()
        return metrics

    # the loop -----------------------------------------------------------------------------------

    def train(self) -> list[dict[str, Any]]:
        """Runs (or resumes) to ``config.iterations``; returns the logged metrics of this run."""
        cfg = self.config
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        start = self.resume() if cfg.resume else self._start_fresh()
        if self.rank == 0:  # after resume's checks: a refused run leaves the folder's config as it was
            save_yaml(self.config_record, self.out / "config.yaml")
        log = self._open_log(start)
        self._start_wandb()
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        bar = None
        if show and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.iterations, initial=start, desc=type(self.method).__name__, dynamic_ncols=True)
        records = []
        # each logged metric is its mean over the iterations of the window that reported it (a
        # method's student metrics come from its student iterations only: one iteration's alone
        # missed them whenever log_every was a multiple of student_every); windows also end at
        # checkpoints, so a resumed run logs what the uninterrupted one does
        sums: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        self.method.train()
        tic = time.perf_counter()
        for iteration in range(start, cfg.iterations):
            for key, value in self.step(iteration).items():
                sums[key] = sums[key] + value.detach() if key in sums else value.detach()
                counts[key] = counts.get(key, 0) + 1
            done = iteration + 1
            if done % cfg.log_every == 0 or done == cfg.iterations:
                metrics = {key: total / counts[key] for key, total in sums.items()}
                factor = learning_rate_factor(cfg.optimizer, iteration, cfg.iterations)
                # the student's learning rate, and that of each optimizer given another one
                rates = {"lr": self.base_lr["student"] * factor,
                         **{f"lr_{name}": lr * factor for name, lr in self.base_lr.items()
                            if name != "student" and lr != self.base_lr["student"]}}
                record = {"iteration": iteration, **parallel.all_reduce_mean(metrics), **rates,
                          "seconds": round(time.perf_counter() - tic, 3)}
                records.append(record)
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if self.wandb is not None:
                    self.wandb.log(record, step=iteration)
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k not in ("iteration", "seconds")},
                                    refresh=False)
            if bar is not None:
                bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                self.save(done)
            if done % cfg.log_every == 0 or done % cfg.checkpoint_every == 0:
                sums, counts = {}, {}
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        self.export()
        return records

    def _open_log(self, start: int):
        """metrics.jsonl, with the lines of iterations a resumed run repeats dropped."""
        if self.rank != 0:
            return None
        path = self.out / "metrics.jsonl"
        kept = []
        if path.exists() and start > 0:
            kept = [line for line in path.read_text().splitlines() if _logged_before(line, start)]
        path.write_text("".join(line + "\n" for line in kept))
        return path.open("a")

    def _start_wandb(self) -> None:
        if self.config.wandb_project is None or self.rank != 0:
            return
        try:
            import wandb
        except ImportError:
            warnings.warn("wandb_project is set but wandb is not installed: logging to metrics.jsonl only",
                          stacklevel=2)
            return
        self.wandb = wandb.init(project=self.config.wandb_project, config=self.config_record,
                                dir=str(self.out), resume="allow")

    # checkpoints --------------------------------------------------------------------------------

    def _ema_states(self, in_parameter_dtypes: bool = False) -> dict[str, dict[str, Tensor]]:
        """{"ema<k>": the student's full state dict with shadow k in place of its parameters}, in
        the shadows' fp32 (checkpoints: a resumed run continues the same averages; cast to bf16
        parameters and back they would lose what the fp32 shadows keep) or, for the exported
        weights, the parameters' dtypes. A collective under FSDP2."""
        student = self.method.network("student")
        state = parallel.model_state(student)  # the buffers, and every key a parameter is saved under
        keys = parallel.parameter_keys(student)
        states = {}
        for k in range(len(self.ema.decays) if self.ema else 0):
            shadow = dict(state)
            for p, p_keys, value in zip(student.parameters(), keys, self.ema.full_shadow(k)):
                value = value.to("cpu", p.dtype if in_parameter_dtypes else None)
                shadow.update((key, value) for key in p_keys)
            states[f"ema{k}"] = shadow
        return states

    def save(self, iteration: int) -> None:
        """Writes checkpoints/checkpoint-<iteration>.safetensors (every process takes part in
        gathering sharded state; process 0 writes)."""
        groups: dict[str, dict[str, Tensor]] = {}
        meta: dict[str, Any] = {"iteration": iteration, "method": type(self.method).__name__,
                                "config": self.config_record,
                                "ema_decays": list(self.ema.decays) if self.ema else [], "optimizers": {}}
        optimizer_states = {}
        for name in self.names:
            net = self.method.network(name)
            groups[f"model.{name}"] = parallel.model_state(net)
            optimizer_states[name] = parallel.optimizer_state(net, self.optimizers[name])
        groups.update(self._ema_states())
        rng, meta["rng"] = ckpt.rng_state()
        groups["rng"] = rng
        if self.rank == 0:  # the gathered states are on process 0 only
            for name, state in optimizer_states.items():
                groups[f"optimizer.{name}"], meta["optimizers"][name] = ckpt.optimizer_to_tensors(state)
            directory = self.out / "checkpoints"
            ckpt.save_checkpoint(ckpt.checkpoint_path(directory, iteration), groups, meta)
            ckpt.prune_checkpoints(directory, self.config.keep_checkpoints)
        if parallel.world_size() > 1:
            torch.distributed.barrier()

    def _start_fresh(self) -> int:
        """resume=False: this run replaces an earlier one in its output folder, its checkpoints too
        (left there, a later resume would load them, and pruning would delete this run's)."""
        if self.rank == 0:
            stale = ckpt.delete_checkpoints(self.out / "checkpoints")
            if stale:
                warnings.warn(f"resume=False: deleted {len(stale)} checkpoints of an earlier run in "
                              f"{self.out / 'checkpoints'}", stacklevel=2)
        if parallel.world_size() > 1:
            torch.distributed.barrier()
        return 0

    def resume(self) -> int:
        """Loads the newest checkpoint in the output folder, if any; the iteration to start at."""
        path = ckpt.latest_checkpoint(self.out / "checkpoints")
        if path is None:
            return 0
        groups, meta = ckpt.load_checkpoint(path)
        if meta["iteration"] > self.config.iterations:
            raise ResumeRefused(f"resume: {path} is at iteration {meta['iteration']}, beyond trainer.iterations "
                             f"{self.config.iterations}; raise iterations, or start over with trainer.resume=false")
        method, held = type(self.method).__name__, sorted(g[6:] for g in groups if g.startswith("model."))
        if meta.get("method", method) != method or held != sorted(self.names):
            raise ResumeRefused(f"resume: {path} is a checkpoint of {meta.get('method', 'another method')} (networks "
                             f"{held}), not of {method} (networks {sorted(self.names)}): use another output_dir, "
                             "or start over with trainer.resume=false")
        if self.ema is not None and list(self.ema.decays) != meta["ema_decays"]:
            raise ResumeRefused(f"resume: {path} has EMA decays {meta['ema_decays']}, the config "
                                f"{list(self.ema.decays)}")
        for name in self.names:
            net = self.method.network(name)
            try:
                parallel.load_model_state(net, groups[f"model.{name}"])
            except RuntimeError as error:  # another run's networks (torch's size mismatch)
                raise ResumeRefused(f"resume: {path} holds a {name} network of other shapes than the config's "
                                    f"({str(error).splitlines()[-1].strip()}): use another output_dir, or start "
                                    "over with trainer.resume=false") from error
            state = ckpt.optimizer_from_tensors(groups[f"optimizer.{name}"], meta["optimizers"][name])
            parallel.load_optimizer_state(net, self.optimizers[name], state)
        if self.ema is not None:  # whole fp32 shadows -> this process's (after the networks: their shapes checked)
            keys = parallel.parameter_keys(self.method.network("student"))
            for k in range(len(self.ema.decays)):
                self.ema.load_full_shadow(k, [groups[f"ema{k}"][p_keys[0]] for p_keys in keys])
        ckpt.set_rng_state(groups["rng"], meta["rng"])
        return int(meta["iteration"])

    def export(self) -> None:
        """student/ and student_ema<decay>/ as Denoiser.save_pretrained folders."""
        student: Denoiser = self.method.student
        net = self.method.network("student")
        states = {"student": parallel.model_state(net)}
        for k, state in self._ema_states(in_parameter_dtypes=True).items():
            states[f"student_ema{self.ema.decays[int(k[3:])]}"] = state
        if self.rank == 0:
            for folder, state in states.items():
                student.save_pretrained(self.out / folder, state_dict=state)


def train(method: Method, data: tuple[Tensor, Tensor | None], config: TrainerConfig | None = None,
          **kwargs) -> list[dict[str, Any]]:
    """``Trainer(method, data, config, **kwargs).train()``."""
    return Trainer(method, data, config, **kwargs).train()


def _logged_before(line: str, start: int) -> bool:
    """Whether a metrics.jsonl line records an iteration before ``start`` (a line cut short by a
    killed process is dropped, not a resume's crash)."""
    try:
        return json.loads(line)["iteration"] < start
    except (json.JSONDecodeError, KeyError, TypeError):
        return False

