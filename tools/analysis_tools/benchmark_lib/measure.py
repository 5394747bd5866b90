"""Measuring one workload: build its variants alike, then time, count and
profile their training steps and evaluation forwards, variants alternating.

Every variant is built after seeding the same generator; the parts outside
the backbone (neck, heads) are then copied from the first variant, and every
BatchNorm's statistics are calibrated on the batch (:func:`calibrate_batchnorm`),
so that each variant feeds the heads normalised features and a detector's
data-dependent work (proposals, RoIs, detections) is alike.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from orepa_mm import count_reparam_layers, feature_path_report, fuse_model
from orepa_mm.cli import log
from orepa_mm.compat import grad_scaler

from .counters import SavedTensorCounter, count_gflop, count_ops, model_tensors
from .workloads import Workload, build_variant, describe_variant

#: The optimizer of every training step, as the report names it.
OPTIMIZER = 'SGD(momentum=0.9, weight_decay=1e-4, foreach=True)'


@dataclass(frozen=True)
class RunSettings:
    """How a workload is measured (the command line's options)."""

    variants: Tuple[str, ...]
    rounds: int = 5
    warmup: int = 1
    iters: int = 1
    amp: bool = False
    #: 'float16' or 'bfloat16' under AMP; None: float16 on CUDA, bfloat16 on CPU.
    amp_dtype: Optional[str] = None
    lr: float = 0.0
    seed: int = 0
    skip_eval: bool = False


class Trainee:
    """One variant of one workload: the model, its optimizer and a train step."""

    def __init__(self, workload: Workload, variant: str, model: nn.Module, amp: bool, lr: float,
                 amp_dtype: Optional[str] = None) -> None:
        self.workload, self.variant, self.model = workload, variant, model
        self.device = workload.device
        # foreach: one operator per update over all parameters (the CUDA default), on every device
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                                         momentum=0.9, weight_decay=1e-4, foreach=True)
        default = torch.float16 if self.device.type == 'cuda' else torch.bfloat16
        self.amp_dtype = (getattr(torch, amp_dtype) if amp_dtype else default) if amp else None
        # float16 needs loss scaling (mmengine's AmpOptimWrapper uses a GradScaler); bfloat16 does not.
        self.scaler = grad_scaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.last_loss = float('nan')

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` under AMP, else nothing."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward_loss(self) -> Tensor:
        """The workload's loss of this model (under autocast with AMP)."""
        with self.autocast():
            return self.workload.loss(self.model)

    def backward_step(self, loss: Tensor) -> None:
        """Backward, optimizer step, then drop the gradients (set_to_none)."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self) -> None:
        """One training step: forward, backward, optimizer step."""
        torch.manual_seed(self.workload.seed)  # the same proposal sampling etc. for every variant
        loss = self.forward_loss()
        self.backward_step(loss)
        self.last_loss = loss.item()

    def memory_step(self) -> Dict[str, Optional[int]]:
        """A train step that counts the saved bytes (and the CUDA peak)."""
        cuda = self.device.type == 'cuda'
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        torch.manual_seed(self.workload.seed)
        with SavedTensorCounter(lambda: model_tensors(self.model)) as counter:
            loss = self.forward_loss()
        self.backward_step(loss)
        self.last_loss = loss.item()
        out: Dict[str, Optional[int]] = dict(saved_activation_bytes=counter.nbytes,
                                              saved_storages=counter.num_storages, cuda_max_allocated_bytes=None)
        if cuda:
            torch.cuda.synchronize(self.device)
            out['cuda_max_allocated_bytes'] = torch.cuda.max_memory_allocated(self.device) - base
        return out

    def flop_step(self) -> Dict[str, Any]:
        """A train step under ``FlopCounterMode``: the GEMM and convolution
        FLOPs (forward, backward, and for OREPA its kernel generation and
        recomputation), in total and by operator."""
        total, by_op = count_gflop(self.train_step)
        return dict(train_gflop=total, train_gflop_by_op=by_op)

    def op_step(self) -> Dict[str, Any]:
        """A train step under :class:`~.counters.OpCounter`: the ATen operators
        dispatched by forward, backward and the optimizer step (views apart).
        Run after a first step, which also creates the momentum buffers."""
        counter, _ = count_ops(self.train_step)
        return dict(train_ops=counter.total, train_view_ops=counter.views,
                    train_ops_by_op=dict(counter.by_op.most_common()))

    def state_bytes(self) -> Dict[str, int]:
        """Parameters, gradients (of trainable parameters) and optimizer state, in bytes."""
        params = list(self.model.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        grad_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        optim_bytes = sum(t.numel() * t.element_size() for state in self.optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t))
        return dict(params=sum(p.numel() for p in params),
                    trainable_params=sum(p.numel() for p in params if p.requires_grad),
                    param_bytes=param_bytes, grad_bytes=grad_bytes, optimizer_state_bytes=optim_bytes,
                    param_grad_optimizer_bytes=param_bytes + grad_bytes + optim_bytes)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, run: Callable[[], Any]) -> None:
    """Set every BatchNorm's running statistics to the statistics of ``run()``'s batch.

    Random weights give each variant different activation scales: the
    designed OREPA/DBB initialisations are not a plain conv's.  Where BNs run
    on running statistics (mmdet's ``norm_eval=True``, evaluation, fusing),
    the heads would then see features of very different magnitudes, and the
    data-dependent work of a detector (proposals surviving NMS, RoIs,
    detections above the score threshold) would differ between variants.
    Calibrated statistics make every variant's features normalised, as with
    pretrained weights.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    state = [(m, m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: exactly this batch's statistics
        m.train()
    run()
    for m, momentum, training in state:
        m.momentum = momentum
        m.train(training)


def share_weights(src: nn.Module, dst: nn.Module, skip_prefix: str) -> int:
    """Copy the entries of ``src``'s state_dict outside ``skip_prefix`` into
    ``dst`` where name and shape match; return how many were copied.  An
    empty ``skip_prefix`` (a bare backbone: nothing is shared) copies nothing."""
    if not skip_prefix:
        return 0
    dst_state = dst.state_dict()
    shared = {k: v for k, v in src.state_dict().items()
              if not k.startswith(skip_prefix) and k in dst_state and dst_state[k].shape == v.shape}
    dst.load_state_dict(shared, strict=False)
    return len(shared)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds taken by ``fn()`` (synchronising CUDA before and after)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def summary(values: Sequence[float]) -> Dict[str, Any]:
    """Median, min, max and every sample."""
    return dict(median=statistics.median(values), min=min(values), max=max(values), all=list(values))


def build_trainees(workload: Workload, variants: Sequence[str], settings: RunSettings) -> List[Trainee]:
    """Build every variant with the same seed, share the non-backbone weights,
    calibrate the BatchNorm statistics (:func:`calibrate_batchnorm`)."""
    trainees: List[Trainee] = []
    for variant in variants:
        torch.manual_seed(settings.seed)
        model = build_variant(workload, variant)
        if trainees:
            share_weights(trainees[0].model, model, workload.backbone_prefix)
        model.to(workload.device)
        calibrate_batchnorm(model, lambda: workload.features(model))
        model.train()
        trainees.append(Trainee(workload, variant, model, settings.amp, settings.lr, settings.amp_dtype))
        log(f'{workload.name}: built {variant} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M '
            'parameters)')
    return trainees


def _counting_step(trainee: Trainee, result: Dict[str, Any]) -> None:
    """The untimed step of one variant that counts bytes, FLOPs and operators."""
    result.update(trainee.memory_step())
    result.update(trainee.flop_step())
    result.update(trainee.op_step())
    result['workload'] = dict(train=trainee.workload.stats(trainee.model))
    plans = feature_path_report(trainee.model)
    if plans:  # which OREPA layers ran a branch on the feature map in that step
        result['feature_path_layers'] = sum(p['on_features'] for p in plans)
        result['feature_path_plans'] = plans
    cuda = result['cuda_max_allocated_bytes']
    log(f'{trainee.workload.name} | counting step | {trainee.variant} | saved for backward '
        f'{result["saved_activation_bytes"] / 1e6:.1f} MB, {result["train_gflop"]:.1f} GFLOP, '
        f'{result["train_ops"]} ops per step' + ('' if cuda is None else f', CUDA step peak {cuda / 1e6:.1f} MB')
        + (f', {result["feature_path_layers"]} of {len(plans)} layers with a branch on the feature map'
           if plans else ''))


def measure_workload(workload: Workload, settings: RunSettings) -> Dict[str, Dict[str, Any]]:
    """All measurements of one workload, its variants alternating; by variant."""
    name, device = workload.name, workload.device
    trainees = build_trainees(workload, settings.variants, settings)
    results: Dict[str, Dict[str, Any]] = {
        t.variant: dict(built=describe_variant(workload, t.variant), reparam_layers=count_reparam_layers(t.model))
        for t in trainees}

    # The counts are taken in the last warm-up step, or in an extra untimed
    # step, never in the very first step: that one also allocates the
    # momentum buffers and the library workspaces, and OREPA forms its groups
    # of same-shape layers in it (each new member regenerates its group).
    counts_in_warmup = settings.warmup >= 2
    steps = settings.warmup if counts_in_warmup else settings.warmup + 1
    for w in range(steps):
        for t in trainees:
            if w < steps - 1:
                t.train_step()
                log(f'{name} | warm-up {w + 1}/{settings.warmup} | {t.variant} | train step done')
            else:
                _counting_step(t, results[t.variant])

    step_times: Dict[str, List[float]] = {t.variant: [] for t in trainees}
    for r in range(settings.rounds):
        for t in trainees:
            seconds = timed(lambda: [t.train_step() for _ in range(settings.iters)], device) / settings.iters
            step_times[t.variant].append(seconds)
            log(f'{name} | round {r + 1}/{settings.rounds} | {t.variant} | train step {seconds:.4f} s '
                f'(loss {t.last_loss:.4g})')
    for t in trainees:
        results[t.variant]['train_step_s'] = summary(step_times[t.variant])
        results[t.variant].update(t.state_bytes())
        results[t.variant]['final_loss'] = t.last_loss

    if not settings.skip_eval:
        measure_eval(workload, trainees, results, settings)
    for t in trainees:  # free the memory before the next workload
        t.model, t.optimizer = None, None
    return results


def measure_eval(workload: Workload, trainees: Sequence[Trainee], results: Dict[str, Dict[str, Any]],
                 settings: RunSettings) -> None:
    """Eval-mode forward times (no_grad) before and after fusing, variants alternating."""
    device, name = workload.device, workload.name
    models: Dict[str, Dict[str, nn.Module]] = {}
    for t in trainees:
        t.model.eval()
        fused = fuse_model(t.model)
        fused.eval()  # (mmdet's ResNet.train() returns None: no chaining)
        results[t.variant]['fused_reparam_layers'] = count_reparam_layers(fused)
        models[t.variant] = dict(unfused=t.model, fused=fused)

    def forward(t: Trainee, model: nn.Module) -> Any:
        with torch.no_grad(), t.autocast():
            return workload.predict(model)

    for _ in range(max(settings.warmup, 1)):  # at least once: OREPA builds its eval kernel cache here
        for t in trainees:
            for model in models[t.variant].values():
                forward(t, model)
    times = {t.variant: dict(unfused=[], fused=[]) for t in trainees}
    for r in range(settings.rounds):
        for t in trainees:
            for kind, model in models[t.variant].items():
                seconds = timed(lambda: [forward(t, model) for _ in range(settings.iters)], device) / settings.iters
                times[t.variant][kind].append(seconds)
            log(f'{name} | eval round {r + 1}/{settings.rounds} | {t.variant} | unfused '
                f'{times[t.variant]["unfused"][-1]:.4f} s, fused {times[t.variant]["fused"][-1]:.4f} s')
    for t in trainees:
        for kind, model in models[t.variant].items():
            results[t.variant]['workload'][f'eval_{kind}'] = workload.stats(model, forward(t, model))
        results[t.variant]['eval_unfused_s'] = summary(times[t.variant]['unfused'])
        results[t.variant]['eval_fused_s'] = summary(times[t.variant]['fused'])
        t.model.train()


def profile_training(workload: Workload, variant: str, settings: RunSettings, steps: int, top: int) -> str:
    """:mod:`torch.profiler` over ``steps`` training steps of one variant (after
    the warm-up); return the table of the ``top`` operators by self CPU time
    (and, on CUDA, by self device time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = workload.device
    trainee = build_trainees(workload, [variant], settings)[0]
    for _ in range(max(settings.warmup, 1)):
        trainee.train_step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    log(f'profiling {steps} training steps of {workload.name} {variant}')
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            trainee.train_step()
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
    events = prof.key_averages()
    table = events.table(sort_by='self_cpu_time_total', row_limit=top)
    if device.type == 'cuda':  # the device-time key was renamed in torch 2.4
        key = 'self_device_time_total' if hasattr(events[0], 'self_device_time_total') else 'self_cuda_time_total'
        table += f'\n\nby {key}:\n' + events.table(sort_by=key, row_limit=top)
    return table
