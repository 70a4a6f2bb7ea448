"""Train a MambaLiteSR teacher, or distill a student from one.

    python -m trainers.train --role teacher --preset teacher --iterations 2000 --out-dir runs/teacher
    python -m trainers.train --role student --teacher runs/teacher/last.pt --alpha 0.5 --out-dir runs/student
    python -m trainers.train ... --resume            # continue from OUT_DIR/last.pt

Without ``--train-data`` the built-in image set is used. Student loss (seed paper):
``alpha * L1(student, teacher) + (1 - alpha) * L1(student, HR)``, the teacher frozen and run
without gradients. Adam with step decay (halved at fractions of the run by default), AMP on CUDA.
Every ``checkpoint_every`` steps ``last.pt`` is replaced atomically; the data for step k depends
only on (seed, k), so ``--resume`` continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edge_agent import argtypes, contract, errors, preflight
from edge_agent.contract import credential_problem
from edge_agent.errors import UserError
from model import ModelConfig, build_model, count_flops, count_params, preset
from model.conv import CONV_PRESETS, ConvConfig
from model.inherit import (
    CRITERIA,
    DEFAULT_CRITERION,
    InheritError,
    compatibility_problem,
    in_teacher_topology,
    inherit,
)
from model.mambalitesr import PRESETS, SCALES, MambaLiteSR, config_from_dict, load_model
from model.runtime import keep_freed_memory
from model.scan import SCAN_FORMS, resolve_scan
from trainers.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainers.data import ImagePair, PatchSampler, load_sets, require_measurable
from trainers.energy import EnergyMeter, EnergyReading
from trainers.evaluate import evaluate_set
from trainers.inference import resolve_device, super_resolve
from trainers.metrics import finite_or_none
from trainers.tracking import ConsoleTracker, MLflowTracker, MultiTracker, Tracker

log = logging.getLogger(__name__)
ROLES = ("teacher", "student")
INITS = ("scratch", "teacher")  # where a student's weights start: random, or picked from its teacher
INIT_TOPOLOGIES = ("teacher", "own")  # with init teacher: the teacher's topology, or the model's as given
EXPERIMENT = contract.EXPERIMENT  # MLflow experiment of standalone training runs


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    role: str = "student"  # "teacher" (L1 to HR) or "student" (distilled)
    # a MambaLiteSR; or a convolutional reference's ConvConfig (model/conv.py), trained the same way
    model: ModelConfig | ConvConfig = field(default_factory=lambda: PRESETS["student"])
    teacher: str | None = None  # teacher checkpoint; required by a student with alpha > 0
    alpha: float = 0.5  # weight of L1(student, teacher); 1 - alpha goes to L1(student, HR)
    init: str = "scratch"  # "teacher": the student starts from its teacher's weights (model/inherit.py)
    init_criterion: str = DEFAULT_CRITERION  # which channels it keeps: "weights" or "activations"
    # "teacher": a student that inherits takes its teacher's topology switches (embed_norm,
    # block_residual), where it keeps more of the teacher; "own": model's are kept as given
    init_topology: str = "teacher"
    # a checkpoint of this same network whose weights the run starts from, with a fresh optimizer and
    # schedule (a search trial's, continued by its finalization); "": as ``init`` says
    init_weights: str = ""
    lr: float = 2e-4  # Adam, as the paper
    lr_milestones: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)  # fractions of the run where lr halves
    lr_gamma: float = 0.5
    batch_size: int = 16  # the paper uses 128 on a GPU
    patch_size: int = 64  # LR patch side, the deployment tile
    iterations: int = 1000
    val_every: int = 200  # validate (and checkpoint) every N steps, and at the end
    checkpoint_every: int = 0  # 0: with each validation
    log_every: int = 10
    seed: int = 0
    train_data: tuple[str, ...] = ()  # folders; empty: the built-in set
    val_data: tuple[str, ...] = ()
    val_max_images: int = 0  # 0: all validation images
    out_dir: str = "outputs/train"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    amp: bool = True  # mixed precision on CUDA (bf16 where supported)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"TrainConfig.role must be one of {ROLES}, got {self.role!r}")
        if self.init not in INITS:
            raise ValueError(f"TrainConfig.init must be one of {INITS}, got {self.init!r}")
        if self.init_criterion not in CRITERIA:
            raise ValueError(
                f"TrainConfig.init_criterion must be one of {CRITERIA}, got {self.init_criterion!r}"
            )
        if self.init_topology not in INIT_TOPOLOGIES:
            raise ValueError(
                f"TrainConfig.init_topology must be one of {INIT_TOPOLOGIES}, got {self.init_topology!r}"
            )
        if self.init == "teacher" and self.role != "student":
            raise ValueError("init 'teacher' is for a student; a teacher starts from scratch")
        if getattr(self.model, "arch", None) == "bicubic":
            raise ValueError("TrainConfig.model: bicubic interpolation has no weights to train")
        if self.init == "teacher" and not isinstance(self.model, ModelConfig):
            raise ValueError(
                f"init 'teacher' picks a Mamba student's weights from a Mamba teacher; the {self.model.arch} "
                "reference net has nothing to take from it: use init 'scratch'"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"TrainConfig.alpha must be in [0, 1], got {self.alpha}")
        for name in ("batch_size", "patch_size", "iterations", "val_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.checkpoint_every < 0 or self.val_max_images < 0 or self.seed < 0:
            raise ValueError("TrainConfig.checkpoint_every, val_max_images and seed must be >= 0")
        if not self.lr > 0 or not 0 < self.lr_gamma <= 1:
            raise ValueError(
                f"TrainConfig.lr must be > 0 and lr_gamma in (0, 1], got {self.lr}, {self.lr_gamma}"
            )
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ValueError(
                f"TrainConfig.lr_milestones are fractions of the run in (0, 1), got {self.lr_milestones}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training config key(s) {unknown}; known keys: {sorted(known)}")
        values = dict(values)
        if isinstance(values.get("model"), dict):
            values["model"] = config_from_dict(values["model"])
        for key in ("lr_milestones", "train_data", "val_data"):
            if key in values and values[key] is not None:
                values[key] = tuple(values[key])
        return TrainConfig(**values)


@dataclass(frozen=True)
class TrainResult:
    step: int  # steps completed
    checkpoint: str
    val_psnr_y: float
    val_ssim_y: float
    params: int
    flops_g: float  # at a 64x64 LR input
    patches_per_s: float  # LR patches per second of training steps (validation excluded)
    teacher_share: float | None  # mean share of a step spent in the teacher's forward pass
    energy: EnergyReading
    cpu_s: float = float("nan")  # CPU seconds the run's process spent (every thread), resumes included


def distill_loss(
    sr: torch.Tensor, teacher_sr: torch.Tensor | None, hr: torch.Tensor, alpha: float
) -> torch.Tensor:
    """alpha * L1(student, teacher) + (1 - alpha) * L1(student, HR); plain L1 to HR without a teacher."""
    loss_hr = F.l1_loss(sr, hr)
    if teacher_sr is None:
        return loss_hr
    return alpha * F.l1_loss(sr, teacher_sr) + (1 - alpha) * loss_hr


def _step_lr(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.MultiStepLR:
    milestones = sorted({max(1, round(m * cfg.iterations)) for m in cfg.lr_milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.lr_gamma)


def validate(net: MambaLiteSR, pairs: list[ImagePair], device: torch.device) -> dict[str, float]:
    """Mean PSNR/SSIM (Y channel, border = scale) over whole validation images, measured the way
    ``python -m trainers.evaluate`` measures a checkpoint."""
    was_training = net.training
    net.eval()
    try:
        result = evaluate_set(lambda lr: super_resolve(net, lr, device), pairs, net.cfg.scale, "val")
    finally:
        net.train(was_training)
    return {"val_psnr_y": result.psnr_y, "val_ssim_y": result.ssim_y}


def starting_network(cfg: TrainConfig, teacher: MambaLiteSR | None, sampler: PatchSampler) -> MambaLiteSR:
    """The network a run starts from: random weights at ``cfg.seed``, or with ``init: teacher``
    weights picked from ``teacher`` (the activations criterion measures it on the first training
    batch's LR patches)."""
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.model)
    if cfg.init != "teacher" or teacher is None:
        return net
    device = next(teacher.parameters()).device
    calibration = (
        sampler.batch(0, cfg.batch_size)[0].to(device) if cfg.init_criterion == "activations" else None
    )
    log.info("the student starts from its teacher's weights (%s criterion)", cfg.init_criterion)
    return inherit(teacher, cfg.model, cfg.init_criterion, calibration, seed=cfg.seed)


def continue_from(net, model, path: str) -> None:
    """Load the weights of ``path``, a checkpoint of the same network (``model``), into ``net``."""
    state = load_checkpoint(Path(path))
    plain = lambda d: json.loads(json.dumps({k: v for k, v in d.items() if k != "scan"}))  # noqa: E731
    saved, wanted = plain(state.get("model_config") or {}), plain(dataclasses.asdict(model))
    diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if diff:
        raise CheckpointError(f"init_weights {path} holds another network (it differs in {diff})")
    net.load_state_dict(state["model"])
    log.info("the run starts from the weights of %s (step %s there)", path, state.get("step"))


def load_teacher(cfg: TrainConfig, device: torch.device) -> MambaLiteSR | None:
    """The frozen teacher: for distillation (alpha > 0) and for a student that starts from it."""
    if cfg.role != "student" or (cfg.alpha == 0 and cfg.init != "teacher"):
        return None
    if not cfg.teacher:
        if cfg.init == "teacher":
            raise ValueError("a student with --init teacher needs the teacher checkpoint (--teacher PATH)")
        raise ValueError(
            "a student with alpha > 0 needs a teacher checkpoint (--teacher PATH), or use --alpha 0"
        )
    from model import dvmsr

    try:
        teacher = load_model(str(dvmsr.resolve(cfg.teacher)) if dvmsr.is_spec(cfg.teacher) else cfg.teacher)
    except ValueError as exc:
        raise CheckpointError(f"cannot load the teacher: {exc}") from exc
    if teacher.cfg.scale != cfg.model.scale:
        raise ValueError(f"teacher scale x{teacher.cfg.scale} differs from the student's x{cfg.model.scale}")
    if cfg.init == "teacher":
        problem = compatibility_problem(teacher.cfg, cfg.model)
        if problem:
            raise InheritError(f"--init teacher: {problem}")
    teacher.to(device).eval().requires_grad_(False)
    return teacher


def _compare_configs(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    ignore = {"out_dir", "device", "log_every"}  # may differ between an interrupted run and its resume

    def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
        # the scan form changes speed, not the function: a run may resume on a machine with another one
        model = {k: v for k, v in (cfg.get("model") or {}).items() if k != "scan"}
        return {**cfg, "model": model}

    saved, current = comparable(saved), comparable(current)
    return sorted(k for k in set(saved) | set(current) if k not in ignore and saved.get(k) != current.get(k))


def train(cfg: TrainConfig, tracker: Tracker | None = None, resume: bool = False) -> TrainResult:
    """Run (or resume) one training run; see the module docstring.

    Raises:
        TrainingDiverged: NaN or infinite loss; ``last.pt`` still holds the last good state.
        CheckpointError, DataError, ValueError: bad inputs, with a message saying which.
    """
    tracker = tracker or ConsoleTracker()
    run = _Run(cfg, resume)  # data, teacher, network, optimizer; a resumed run's checkpoint
    run.log_params(tracker)
    with EnergyMeter(run.device.index or 0) if run.device.type == "cuda" else _NoMeter() as meter:
        run.loop(tracker)
    return run.finish(tracker, meter.reading)


class _Run:
    """One training run's state, in the order ``train`` uses it: set up (and restored when
    resuming), stepped and checkpointed by ``loop``, reported by ``finish``."""

    def __init__(self, cfg: TrainConfig, resume: bool):
        self.device = device = resolve_device(cfg.device)
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / "last.pt"
        train_pairs = load_sets(list(cfg.train_data), "train", cfg.model.scale)
        val_pairs = load_sets(list(cfg.val_data), "val", cfg.model.scale)
        self.val_pairs = val_pairs[: cfg.val_max_images] if cfg.val_max_images else val_pairs
        require_measurable(self.val_pairs, cfg.model.scale)
        self.sampler = PatchSampler(train_pairs, cfg.patch_size, cfg.model.scale, seed=cfg.seed)
        teacher = load_teacher(cfg, device)
        if cfg.init == "teacher" and cfg.init_topology == "teacher":  # before anything records cfg.model
            cfg = dataclasses.replace(cfg, model=in_teacher_topology(cfg.model, teacher.cfg))
        self.cfg = cfg

        # a resumed run takes its weights from its checkpoint, not from the teacher
        start_from = None if resume or cfg.init_weights else teacher
        self.net = starting_network(cfg, start_from, self.sampler).to(device)
        if cfg.init_weights and not resume:
            continue_from(self.net, cfg.model, cfg.init_weights)
        # alpha 0: the teacher gave the starting weights; distillation would multiply it by zero
        self.teacher = None if cfg.alpha == 0 else teacher
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.scheduler = _step_lr(cfg, self.optimizer)
        self.step, self.metrics = 0, {}
        self._cpu_t0 = time.process_time()
        if resume:
            self._restore()
        self.start_step = self.step
        self._cpu_before = self.metrics.get("cpu_s", 0.0)  # what the interrupted part spent

        self.use_amp = cfg.amp and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.params, self.flops_g = count_params(self.net), count_flops(cfg.model, 64, 64).gflops
        self.step_time = self.teacher_time = 0.0
        self.steps_timed = 0
        self.in_update = False  # True while weights, optimizer and step counter may disagree

    def _restore(self) -> None:
        state = load_checkpoint(self.ckpt_path)
        diff = _compare_configs(state.get("train_config", {}), self.cfg.to_dict())
        if diff:
            raise CheckpointError(
                f"{self.ckpt_path} was written with different settings for {diff}; resume with the same ones"
            )
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.metrics = state["step"], state.get("metrics", {})
        log.info("resuming %s at step %d", self.ckpt_path, self.step)

    def cpu_s(self) -> float:
        """The compute spent on this run: CPU time of this process (all its threads) so far."""
        return self._cpu_before + time.process_time() - self._cpu_t0

    def checkpoint(self) -> None:
        self.metrics["cpu_s"] = self.cpu_s()
        state = {
            "model_config": dataclasses.asdict(self.cfg.model),
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "train_config": self.cfg.to_dict(),
            "metrics": self.metrics,
        }
        save_checkpoint(state, self.ckpt_path)

    def log_params(self, tracker: Tracker) -> None:
        cfg = self.cfg
        # what "auto" (or a missing kernel) comes to here; a convolutional reference has no scan
        scan_form = (
            resolve_scan(cfg.model.scan, self.device) if isinstance(cfg.model, ModelConfig) else "none"
        )
        log.info("%s training (selective scan: %s) on %s", cfg.role, scan_form, self.device)
        tracker.log_params(
            {**cfg.to_dict(), "params": self.params, "flops_g": self.flops_g, "scan_form": scan_form}
        )

    def loop(self, tracker: Tracker) -> None:
        """Steps until ``iterations``: logs, validates and checkpoints as the config says. A Ctrl-C
        keeps the steps done so far (``--resume`` continues from there)."""
        from tqdm import tqdm

        cfg = self.cfg
        ckpt_every = cfg.checkpoint_every or cfg.val_every
        bar = tqdm(total=cfg.iterations, initial=self.step, desc=cfg.role, disable=None, dynamic_ncols=True)
        self.net.train()
        try:
            while self.step < cfg.iterations:
                loss, sr, hr_patch = self._update()
                bar.update(1)
                step = self.step
                if step % cfg.log_every == 0:
                    self.metrics.update(
                        {
                            "loss": loss.item(),
                            "l1_hr": F.l1_loss(sr.detach(), hr_patch).item(),
                            "lr": self.scheduler.get_last_lr()[0],
                        }
                    )
                    tracker.log_metrics({k: self.metrics[k] for k in ("loss", "l1_hr", "lr")}, step)
                    psnr = self.metrics.get("val_psnr_y", float("nan"))
                    bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.2f}")
                if step % cfg.val_every == 0 or step == cfg.iterations:
                    self.metrics.update(validate(self.net, self.val_pairs, self.device), cpu_s=self.cpu_s())
                    tracker.log_metrics(
                        {k: self.metrics[k] for k in ("val_psnr_y", "val_ssim_y", "cpu_s")}, step
                    )
                    bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{self.metrics['val_psnr_y']:.2f}")
                if step % ckpt_every == 0 or step == cfg.iterations:
                    self.checkpoint()
        except KeyboardInterrupt:
            if not self.in_update:  # keep the steps done so far; --resume continues from here
                self.checkpoint()
            raise
        finally:
            bar.close()

    def _update(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step on the step's batch; returns (loss, the student's output, HR).

        Raises:
            TrainingDiverged: the loss is not finite (nothing is updated).
        """
        cfg, device = self.cfg, self.device
        lr_patch, hr_patch = self.sampler.batch(self.step, cfg.batch_size)
        lr_patch, hr_patch = lr_patch.to(device), hr_patch.to(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            sr = self.net(lr_patch).float()
            target = None
            if self.teacher is not None:
                t1 = _sync(device)
                with torch.no_grad():
                    target = self.teacher(lr_patch).float()
                self.teacher_time += _sync(device) - t1
            loss = distill_loss(sr, target, hr_patch, cfg.alpha)
        if not torch.isfinite(loss):
            written = self.ckpt_path if self.ckpt_path.exists() else "none written yet"
            raise TrainingDiverged(
                f"loss became {loss.item()} at step {self.step}; stopped. The last good checkpoint "
                f"({written}) is kept. Try a lower learning rate or check the data."
            )
        self.in_update = True
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self.in_update = False
        self.step_time += _sync(device) - t0
        self.steps_timed += 1
        return loss, sr, hr_patch

    def finish(self, tracker: Tracker, energy: EnergyReading) -> TrainResult:
        """The result; the last figures, the checkpoint and a few validation samples to the tracker."""
        ran = self.step > self.start_step  # False: resumed at the end, nothing left to run
        metrics = self.metrics
        if "val_psnr_y" not in metrics:
            metrics.update(validate(self.net, self.val_pairs, self.device))
        step_time = self.step_time
        result = TrainResult(
            step=self.step,
            checkpoint=str(self.ckpt_path),
            val_psnr_y=metrics["val_psnr_y"],
            val_ssim_y=metrics["val_ssim_y"],
            params=self.params,
            flops_g=self.flops_g,
            patches_per_s=self.cfg.batch_size * self.steps_timed / step_time if step_time else float("nan"),
            teacher_share=self.teacher_time / step_time if self.teacher is not None and step_time else None,
            energy=energy,
            cpu_s=self.cpu_s(),
        )
        final = {  # validation metrics were logged at this step already, if this call ran any step
            "params": self.params,
            "flops_g": self.flops_g,
            "patches_per_s": result.patches_per_s,
            **energy.metrics(),
        }
        if not ran:  # the tracker may be a new run (a resumed finalization): it gets the run's figures
            final.update({k: metrics[k] for k in ("val_psnr_y", "val_ssim_y", "cpu_s") if k in metrics})
        if result.teacher_share is not None:
            final["teacher_share"] = result.teacher_share
        tracker.log_metrics(final, self.step)
        if self.ckpt_path.exists():
            tracker.log_artifact(self.ckpt_path, "checkpoint")
        for path in _save_samples(self.net, self.val_pairs[:3], self.device, self.out / "samples"):
            tracker.log_artifact(path, "samples")
        return result


class _NoMeter:
    """Stands in for EnergyMeter off CUDA: there is no GPU sensor to read."""

    reading = EnergyReading(
        False, "unavailable", None, None, 0.0, 0, "training on the CPU: no GPU power sensor"
    )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _save_samples(net: MambaLiteSR, pairs: list[ImagePair], device: torch.device, folder: Path) -> list[Path]:
    """A few SR outputs as PNG for a quick look in the MLflow UI."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    net.eval()
    for pair in pairs:
        path = folder / f"{pair.name}_x{net.cfg.scale}.png"
        Image.fromarray(super_resolve(net, pair.lr, device)).save(path)
        paths.append(path)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainers.train", description=__doc__.split("\n")[0])
    d = TrainConfig()
    p.add_argument("--role", choices=ROLES, default="student")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS) + sorted(CONV_PRESETS),
        help="model preset (default: the role's); fsrcnn, espcn and fsrcnn-student are the "
        "convolutional reference nets (model/conv.py), trained from scratch",
    )
    p.add_argument("--embed-dim", type=argtypes.positive_int)
    p.add_argument("--rank", type=argtypes.positive_int)
    p.add_argument("--groups", type=argtypes.positive_int, dest="n_groups")
    p.add_argument("--blocks", type=argtypes.positive_int, dest="blocks_per_group")
    p.add_argument("--scale", type=int, choices=SCALES)
    p.add_argument(
        "--scan",
        choices=SCAN_FORMS,
        help="selective scan form (default auto: triton on CUDA, the fused kernel on the CPU)",
    )
    p.add_argument(
        "--teacher", help="teacher checkpoint, or dvmsr / dvmsr:PATH for DVMSR's weights (student role)"
    )
    p.add_argument(
        "--alpha", type=argtypes.fraction, help=f"distillation weight (student role, default {d.alpha})"
    )
    p.add_argument(
        "--init",
        choices=INITS,
        default=d.init,
        help="where the student's weights start: scratch (random) or teacher (picked from --teacher's; "
        "the student then takes the teacher's topology: its LayerNorm after the first conv, its blocks' "
        "residuals)",
    )
    p.add_argument(
        "--init-weights",
        metavar="CKPT",
        default="",
        help="start from the weights of CKPT, a checkpoint of the same network (say, a search trial's), "
        "with a fresh optimizer and schedule; --init still names the lineage (and the topology)",
    )
    p.add_argument(
        "--own-topology",
        action="store_true",
        help="with --init teacher: keep the preset's topology instead of taking the teacher's",
    )
    p.add_argument(
        "--init-criterion",
        choices=CRITERIA,
        help="with --init teacher: keep the channels with the largest weights or activations "
        f"(default {DEFAULT_CRITERION})",
    )
    p.add_argument("--lr", type=argtypes.positive_float, default=d.lr)
    p.add_argument(
        "--milestones",
        type=argtypes.finite_float,
        nargs="*",
        default=list(d.lr_milestones),
        help="fractions of the run where the learning rate is multiplied by --gamma",
    )
    p.add_argument("--gamma", type=argtypes.positive_float, default=d.lr_gamma)
    p.add_argument("--batch-size", type=argtypes.positive_int, default=d.batch_size)
    p.add_argument("--patch-size", type=argtypes.positive_int, default=d.patch_size)
    p.add_argument("--iterations", type=argtypes.positive_int, default=d.iterations)
    p.add_argument("--val-every", type=argtypes.positive_int, default=d.val_every)
    p.add_argument("--checkpoint-every", type=argtypes.nonnegative_int, default=d.checkpoint_every)
    p.add_argument("--log-every", type=argtypes.positive_int, default=d.log_every)
    p.add_argument("--val-max-images", type=argtypes.nonnegative_int, default=0)
    p.add_argument("--seed", type=argtypes.nonnegative_int, default=d.seed)
    p.add_argument("--train-data", nargs="*", default=[], help="training folders (default: built-in images)")
    p.add_argument("--val-data", nargs="*", default=[], help="validation folders (default: built-in images)")
    p.add_argument(
        "--out-dir",
        type=argtypes.writable_dir,
        help="where last.pt and samples go (default outputs/train/ROLE)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-amp", action="store_true", help="full precision on CUDA")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    p.add_argument("--tracking-uri", help="log to MLflow here (e.g. sqlite:///mlflow.db)")
    p.add_argument("--experiment", default=EXPERIMENT)
    p.add_argument("--run-name")
    p.add_argument("--json", type=argtypes.writable_file, help="write the result as JSON here")
    return p


FLAG_NAMES = {"n_groups": "groups", "blocks_per_group": "blocks"}  # config field -> its flag


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {
        k: getattr(args, k)
        for k in ("embed_dim", "rank", "n_groups", "blocks_per_group", "scale", "scan")
        if getattr(args, k) is not None
    }
    if args.preset in CONV_PRESETS:  # a convolutional reference (model/conv.py): only its scale is free
        mamba_only = sorted(k for k in overrides if k != "scale")
        if mamba_only:
            flags = ", ".join("--" + FLAG_NAMES.get(k, k).replace("_", "-") for k in mamba_only)
            raise ValueError(f"{flags} set(s) a Mamba knob; --preset {args.preset} is a convolutional net")
        model_cfg = CONV_PRESETS[args.preset].replace(**overrides)
    else:
        model_cfg = preset(args.preset or args.role, **overrides)
    return TrainConfig(
        role=args.role,
        model=model_cfg,
        teacher=args.teacher,
        alpha=TrainConfig.alpha if args.alpha is None else args.alpha,
        init=args.init,
        init_criterion=args.init_criterion or DEFAULT_CRITERION,
        init_topology="own" if args.own_topology else "teacher",
        init_weights=args.init_weights,
        lr=args.lr,
        lr_milestones=tuple(args.milestones),
        lr_gamma=args.gamma,
        batch_size=args.batch_size,
        patch_size=args.patch_size,
        iterations=args.iterations,
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        seed=args.seed,
        train_data=tuple(args.train_data),
        val_data=tuple(args.val_data),
        val_max_images=args.val_max_images,
        out_dir=args.out_dir or f"outputs/train/{args.role}",
        device=args.device,
        amp=not args.no_amp,
    )


def ignored_flags(args: argparse.Namespace) -> str | None:
    """Why a given flag would have no effect (None if every flag counts)."""
    if args.role == "teacher" and (args.teacher or args.alpha is not None):
        return "--teacher and --alpha are for --role student; a teacher trains on L1 to HR alone"
    if args.teacher and args.alpha == 0 and args.init != "teacher":
        return "--alpha 0 trains without the teacher; drop --teacher, give alpha > 0 or --init teacher"
    if args.own_topology and args.init != "teacher":
        return "--own-topology is for a student that inherits: add --init teacher or drop it"
    if args.init_criterion and args.init != "teacher":
        return "--init-criterion chooses what a student keeps of its teacher: add --init teacher or drop it"
    if not args.tracking_uri and (args.run_name or args.experiment != EXPERIMENT):
        return "--experiment and --run-name name an MLflow run: add --tracking-uri or drop them"
    return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        resolve_device(cfg.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problem = ignored_flags(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    problem = credential_problem(args.tracking_uri)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.tracking_uri:  # a dead server is a sentence in seconds, not minutes of retries
        preflight.limit_mlflow_retries()
        problem = preflight.tracking_server_problem(args.tracking_uri)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
    keep_freed_memory()
    tracker: Tracker = ConsoleTracker()
    if args.tracking_uri:
        mlflow_tracker = MLflowTracker(
            args.tracking_uri, args.experiment, args.run_name or cfg.role, tags={contract.ROLE: cfg.role}
        )
        tracker = MultiTracker(ConsoleTracker(), mlflow_tracker)
    status = "FAILED"
    try:
        result = train(cfg, tracker, resume=args.resume)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        print(
            f"interrupted; state saved to {Path(cfg.out_dir) / 'last.pt'}, continue with --resume",
            file=sys.stderr,
        )
        return 130
    except (UserError, ValueError) as exc:  # a student its teacher cannot hold is a usage error (2)
        return errors.fail(exc)
    finally:
        tracker.close(status)
    text = json.dumps(finite_or_none(dataclasses.asdict(result)), indent=2, allow_nan=False)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
