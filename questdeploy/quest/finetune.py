"""QuEST: PTQ initialisation, then selective finetuning with local + global supervision.

Method (see shared notes, quest-method.md):
* PTQ: weight scales by an L_p grid search, activation scale tables per timestep group from the
  FP trajectory; weight scales are frozen afterwards (the integer weight is re-derived from the
  finetuned FP weight with the frozen scale).
* TLA: train the ResNets' ``time_emb_proj`` weights/bias and their activation scales, group by group.
* CMA: train the attention-sensitive layers (feed-forward) plus every activation scale of the
  current group except the time-embedding ones; one weight optimizer across groups, a fresh scale
  optimizer per group (so only that group's row of each table moves).
* Loss: ``w_local * sum_l MSE(layer_l) + w_global * MSE(noise prediction)`` against the FP teacher
  (with 4-bit activations ``w_local`` defaults to 0: the global term alone did better, see ``W_LOCAL``).

``full`` trains every weight and every activation scale with the same losses and schedule (the
costlier EfficientDM-style baseline); ``ptq`` stops after initialisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..quant.gptq import gptq_quantize_layers
from ..quant.quantizers import ActQuantizer
from ..quant.sensitivity import choose_8bit_weights, weight_sensitivity
from ..quant.smoothing import apply_smoothing, compute_smoothing
from ..quant.wrap import QuantConfig, QuantizedUNet, quantize_unet
from .selection import SelectionPolicy

METHODS = ("ptq", "quest", "full")
# Weight learning rate per method. quest trains a quarter of the weights for a short schedule; full trains
# all of them, and at quest's rate it drifts (default model, W4A8: FID-proxy 140 at 1e-4 vs 23.7 at 1e-5,
# the paper's rate). Each method gets the rate it does best with, so the comparison is fair.
LR_WEIGHTS = {"ptq": 0.0, "quest": 1e-4, "full": 1e-5}
# Activation-scale learning rate per method and activation width. With 4-bit activations every scale is a
# large lever; on the default model at W4A4 (input smoothing, global loss only, 250 samples) quest's
# FID-proxy was 115 / 98 / 104 at 1e-3 / 3e-3 / 1e-2 and full's 90 / 73 / 105. With 8-bit activations
# 1e-3 (1e-2 broke quest W4A8: 26 dB vs 40).
LR_SCALES = {"ptq": {8: 0.0, 4: 0.0}, "quest": {8: 1e-3, 4: 3e-3}, "full": {8: 1e-3, 4: 3e-3}}
# Input smoothing (quant/smoothing.py) of the ResNet convs, by default only with 4-bit activations. On the
# default model at W4A4 the PTQ noise-prediction error is 0.032 without it, 0.020 at alpha 0.7 and 0.018 at
# 0.85; with the losses and rates above, quest's FID-proxy (250 samples) was 98 / 86 / 77 / 91 at alpha
# 0.7 / 0.8 / 0.85 / 0.95.
SMOOTH_ALPHA_4BIT = 0.85
# Weight of the local term (MSE of the selected layers' outputs vs FP) by activation width. With 4-bit
# activations it pulls against the global one: on the default model at W4A4 (250 samples) quest went from
# FID-proxy 114 and 21.0 dB with it to 104 and 24.8 dB without, full from 95 to 90 (the paper's ImageNet
# script drops it too). Without the local term the teacher's forward pass is skipped: its noise prediction
# is in the calibration data, so an iteration is cheaper for both methods.
W_LOCAL = {8: 1.0, 4: 0.0}
SMOOTH_SAMPLES_PER_STEP = 16  # calibration samples per recorded step that measure the channel ranges
WEIGHT_ROUNDINGS = ("nearest", "gptq")
_BITS = re.compile(r"^w(4|8)a(4|8|16)$")


def parse_bits(bits: str) -> tuple[int, int | None]:
    """'w4a8' -> (4, 8); 'w4a16' -> (4, None) (weight-only)."""
    m = _BITS.match(bits.strip().lower())
    if not m:
        raise ConfigError(f"unsupported --bits {bits!r}.",
                          hint="use w8a8, w4a8 or w4a4 (w8a16 / w4a16 for weight-only).")
    a = int(m.group(2))
    return int(m.group(1)), (None if a == 16 else a)


@dataclass
class FinetuneConfig:
    bits: str = "w4a8"
    method: str = "quest"
    num_groups: int = 10
    weight_granularity: str = "per_channel"
    block_size: int = 32
    target: str = "ort"
    weight_rounding: str = "gptq"      # "nearest" (RTN) or "gptq" (error-compensating, see quant/gptq.py)
    gptq_samples_per_step: int = 16    # calibration samples per recorded step that feed the GPTQ Hessians
    w8_budget: float = 0.1             # at W4: fraction of weights kept 8-bit, the most sensitive layers (0 = pure W4)
    sensitivity_samples_per_step: int = 1  # calibration samples per recorded step that score layer sensitivity
                                           # (default model: 1, 2 and 4 pick the same layers, 1 and 2 checked
                                           # at W4A8 and W4A4; the cost grows with it: 2 took 17 s, 4 32 s)
    calib_samples_per_step: int = 64   # samples of each calibration step used for scale initialisation
    batch_size: int = 16
    tla_iters_per_group: int = 10      # 10 + 20 per group matched 20 + 40 in quality on the default model
    cma_epochs: int = 1
    cma_iters_per_group: int = 20
    lr_weights: float | None = None    # None: the method's own rate (LR_WEIGHTS)
    lr_scales: float | None = None     # None: the method's rate for the activation width (LR_SCALES)
    w_local: float | None = None       # None: W_LOCAL for the activation width
    w_global: float = 2.0
    checkpoint_every: int = 25         # iterations between resume points (0 = never)
    device: str = "cpu"                # torch device of initialisation and training ("cuda", "cuda:1")
    smooth_alpha: float | None = None  # input smoothing strength; None: SMOOTH_ALPHA_4BIT at 4-bit activations, else off
    channel_shift: bool | None = None  # per-group channel shifts before the smoothed layers' 4-bit input quantizers;
                                       # None: on with 4-bit activations (QuantConfig.channel_shift)
    policy: SelectionPolicy = field(default_factory=SelectionPolicy)

    def __post_init__(self):
        a_bits = parse_bits(self.bits)[1] or 8  # weight-only runs take the 8-bit-activation defaults
        if isinstance(self.policy, dict):
            self.policy = SelectionPolicy(**{k: tuple(v) for k, v in self.policy.items()})
        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}.", hint=f"use one of {', '.join(METHODS)}.")
        if not 1 <= self.num_groups <= 1000:
            raise ConfigError(f"--groups {self.num_groups} is out of range.", hint="use 1..1000 timestep groups (1 = one static scale).")
        if isinstance(self.w8_budget, bool) or not 0.0 <= float(self.w8_budget) < 1.0:
            raise ConfigError(f"--w8-budget {self.w8_budget!r} is out of range.",
                              hint="use a fraction of the weights in [0, 1), e.g. 0.05; 0 keeps every weight at 4 bits.")
        for k in ("batch_size", "calib_samples_per_step", "sensitivity_samples_per_step"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be positive.", hint="e.g. --batch-size 32.")
        if self.target == "ort-int":  # that export form runs the ort quantizers through integer kernels
            self.target = "ort"
        if self.lr_weights is None:
            self.lr_weights = LR_WEIGHTS[self.method]
        if self.lr_scales is None:
            self.lr_scales = LR_SCALES[self.method][a_bits]
        if self.w_local is None:
            self.w_local = W_LOCAL[a_bits]
        if isinstance(self.w_local, bool) or not 0.0 <= float(self.w_local) or not 0.0 < float(self.w_global):
            raise ConfigError(f"loss weights w_local={self.w_local!r}, w_global={self.w_global!r} are out of range.",
                              hint="use --w-local >= 0 (0 = global loss only) and a positive global weight.")
        if self.smooth_alpha is None:
            self.smooth_alpha = SMOOTH_ALPHA_4BIT if a_bits == 4 else 0.0
        if isinstance(self.smooth_alpha, bool) or not 0.0 <= float(self.smooth_alpha) <= 1.0:
            raise ConfigError(f"--smooth-alpha {self.smooth_alpha!r} is out of range.",
                              hint="use a value in [0, 1], e.g. 0.7; 0 turns input smoothing off.")
        if self.channel_shift is None:
            self.channel_shift = a_bits == 4 and self.target != "trt"
        if not isinstance(self.channel_shift, bool):
            raise ConfigError(f"channel_shift={self.channel_shift!r} must be true or false.", hint="e.g. --no-channel-shift.")
        if self.channel_shift and self.target == "trt":
            raise ConfigError("--channel-shift has no TensorRT form.", hint="use --target ort, or --no-channel-shift.")
        if self.channel_shift and a_bits != 4:
            raise ConfigError(f"--channel-shift needs 4-bit activations (--bits {self.bits}).",
                              hint="use it with --bits w4a4, or leave it out.")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ConfigError(f"unknown --weight-rounding {self.weight_rounding!r}.",
                              hint=f"use one of {', '.join(WEIGHT_ROUNDINGS)}.")
        if min(self.tla_iters_per_group, self.cma_epochs, self.cma_iters_per_group) < 0:
            raise ConfigError("iteration counts must be >= 0.", hint="e.g. --tla-iters 40 --cma-iters 40.")
        check_device(self.device)

    def quant_config(self, num_train_timesteps: int) -> QuantConfig:
        w, a = parse_bits(self.bits)
        gran = self.weight_granularity if w == 4 else "per_channel"
        return QuantConfig(w_bits=w, a_bits=a, weight_granularity=gran, block_size=self.block_size,
                           num_groups=self.num_groups, num_train_timesteps=num_train_timesteps,
                           method=self.method, target=self.target, smooth_alpha=self.smooth_alpha or None,
                           channel_shift=self.channel_shift)


def check_device(device: str) -> torch.device:
    """``device`` as a torch device that exists here, or a ConfigError naming the fix."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown --device {device!r}.", hint="use cpu, cuda or cuda:N.") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r} is not supported.", hint="use cpu, cuda or cuda:N.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: torch sees no CUDA device here.",
                              hint="use --device cpu, or a CUDA build of torch on a GPU machine.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here.",
                              hint="use cuda:0 .. cuda:N-1.")
    return dev


class CalibOnDevice:
    """The calibration data, handing out its tensors on ``device`` (the model's) instead of the CPU."""

    def __init__(self, calib, device: torch.device):
        self._calib = calib
        self.device = device
        self.timesteps = calib.timesteps
        self.cond = None if calib.cond is None else calib.cond.to(device)

    def step(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.to(self.device) for t in self._calib.step(i))

    def __len__(self) -> int:
        return len(self._calib)


class _Capture:
    """Forward hooks that keep the outputs of named modules (the local-supervision taps)."""

    def __init__(self, root: nn.Module, names: list[str]):
        self.out: dict[str, torch.Tensor] = {}
        mods = dict(root.named_modules())
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def fn(_m, _i, o):
            self.out[name] = o

        return fn

    def close(self):
        for h in self.handles:
            h.remove()


def _group_of_steps(calib, bins) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(calib.timesteps):
        groups.setdefault(int(bins.group(t)), []).append(i)
    return groups


class _Batches:
    """Seeded minibatches of (x_t, t, cond, FP eps) from one calibration step of a group."""

    def __init__(self, calib, batch_size: int, seed: int):
        self.calib = calib
        self.bs = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def step(self, i):
        if i not in self.cache:
            self.cache[i] = self.calib.step(i)
        return self.cache[i]

    def draw(self, steps: list[int]):
        i = steps[int(torch.randint(len(steps), (1,), generator=self.gen))]
        x, eps = self.step(i)
        idx = torch.randperm(x.shape[0], generator=self.gen)[: self.bs].to(x.device)  # CPU generator: same draws anywhere
        cond = None if self.calib.cond is None else self.calib.cond[idx]
        t = torch.full((len(idx),), self.calib.timesteps[i], dtype=torch.long, device=x.device)
        return x[idx], t, cond, eps[idx]


def initialise(fp_unet: nn.Module, calib, cfg: FinetuneConfig, num_train_timesteps: int,
               progress: bool = False) -> QuantizedUNet:
    """PTQ: wrap a copy of the FP UNet and set weight scales and per-group activation scale tables.

    At W4 with ``w8_budget > 0`` the most sensitive layers (measured, see ``quant/sensitivity.py``) keep
    8-bit weights; their names join ``QuantConfig.weight_8bit`` and so the spec."""
    qconfig = cfg.quant_config(num_train_timesteps)
    smoothing = {}
    if qconfig.smooth_alpha is not None:
        smoothing = compute_smoothing(fp_unet, _calib_batches(calib, SMOOTH_SAMPLES_PER_STEP), qconfig.smooth_layers,
                                      qconfig.smooth_alpha, skip=qconfig.skip + qconfig.keep_float)
    if qconfig.w_bits == 4 and cfg.w8_budget > 0:
        qconfig = dataclasses.replace(qconfig, weight_8bit=qconfig.weight_8bit + tuple(
            pick_8bit_weights(fp_unet, calib, qconfig, cfg, progress, smoothing)))
    qunet = quantize_unet(fp_unet, qconfig)
    apply_smoothing(qunet.unet, smoothing)
    qunet.init_weight_scales()
    if cfg.weight_rounding == "gptq":
        round_weights_gptq(qunet, fp_unet, calib, cfg.gptq_samples_per_step)
    qunet.calibrate_activations(_calib_batches(calib, cfg.calib_samples_per_step), init_weights=False)
    return qunet


def pick_8bit_weights(fp_unet: nn.Module, calib, qconfig: QuantConfig, cfg: FinetuneConfig,
                      progress: bool = False, smoothing: dict | None = None) -> list[str]:
    """Names of the layers whose W4 weights cost the most noise-prediction error, within ``cfg.w8_budget``
    of the 4-bit weights (layers already 8-bit by ``qconfig.weight_8bit`` are neither scored nor counted)."""
    batches = _mixed_timestep_batches(calib, cfg.sensitivity_samples_per_step)
    sens = weight_sensitivity(fp_unet, qconfig, batches, progress=progress, smoothing=smoothing)
    modules = dict(fp_unet.named_modules())
    sizes = {n: modules[n].weight.numel() for n in sens}
    return choose_8bit_weights(sens, sizes, cfg.w8_budget)


def _mixed_timestep_batches(calib, n: int, max_batch: int = 32):
    """``n`` samples from every recorded step, each with its own timestep, in batches of ``max_batch``."""
    xs, ts, cs = zip(*_calib_batches(calib, n))
    x, t = torch.cat(xs), torch.cat(ts)
    c = None if cs[0] is None else torch.cat(cs)
    return [(x[i:i + max_batch], t[i:i + max_batch], None if c is None else c[i:i + max_batch])
            for i in range(0, len(x), max_batch)]


def weight_bits_summary(qunet: QuantizedUNet) -> dict:
    """Which layers carry 8-bit weights at W4, and what fraction of the quantized weights that is."""
    sizes = {n: (m.weight.numel(), m.weight_quantizer.bits) for n, m in qunet.quant_layers().items()
             if m.weight_quantizer is not None}
    total = sum(k for k, _ in sizes.values()) or 1
    eight = [n for n, (_, b) in sizes.items() if b == 8]
    return {"weight_8bit_layers": eight if qunet.quant_config.w_bits == 4 else "all",
            "weight_8bit_fraction": round(sum(sizes[n][0] for n in eight) / total, 4)}


def _calib_batches(calib, n: int):
    """``(x_t, t, cond)`` of the first ``n`` samples of every recorded calibration step."""
    for i, t in enumerate(calib.timesteps):
        x = calib.step(i)[0][: max(1, n)]
        cond = None if calib.cond is None else calib.cond[: x.shape[0]]
        yield x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), cond


def round_weights_gptq(qunet: QuantizedUNet, fp_unet: nn.Module, calib, samples_per_step: int) -> dict[str, float]:
    """GPTQ rounding of every quantized weight, Hessians from the FP teacher on the calibration inputs."""
    runs = (lambda x=x, t=t, c=c: fp_unet(x, t, **({} if c is None else {"encoder_hidden_states": c}))
            for x, t, c in _calib_batches(calib, samples_per_step))
    return gptq_quantize_layers(fp_unet, qunet.quant_layers(), runs)


def _loss(qunet, fp_unet, batch, taps, w_local, w_global):
    x, t, cond, eps_fp = batch
    taps = taps if w_local else []  # no local term: the teacher's output is already in the batch, skip its forward
    fp_out = {}
    if taps:
        fp_cap = _Capture(fp_unet, taps)
        with torch.no_grad():
            fp_unet(x, t, **({} if cond is None else {"encoder_hidden_states": cond}))
        fp_cap.close()
        fp_out = fp_cap.out
    q_cap = _Capture(qunet.unet, taps)
    out = qunet(x, t, cond)
    q_cap.close()
    local = sum(nn.functional.mse_loss(q_cap.out[n], fp_out[n]) for n in taps) if taps else out.new_zeros(())
    glob = nn.functional.mse_loss(out, eps_fp)
    return w_local * local + w_global * glob, float(local.detach()), float(glob.detach())


def finetune(qunet: QuantizedUNet, fp_unet: nn.Module, calib, cfg: FinetuneConfig, seed: int = 0,
             progress: bool = True, log: Callable[[str], None] = print, resume: Path | None = None,
             checkpoint_every: int = 0) -> dict:
    """Run the selected method's finetuning in place; returns a report (layers, params, losses, time).

    With ``resume`` set, the training state (trained tensors, optimizers, sampling RNG, iteration) is
    saved there every ``checkpoint_every`` iterations, and a run that finds the file continues from it
    to the same result, bit for bit on CPU, as an uninterrupted run.
    """
    started = time.time()
    if cfg.method == "ptq":
        return {"trainable_params": 0, "total_params": _count(qunet), "seconds": 0.0, "phases": []}
    layers = qunet.quant_layers()
    tla, cma = cfg.policy.select(layers)
    act = {n: q for n, q in qunet.quantizers().items() if isinstance(q, ActQuantizer)}
    tla_scales = [q.scales for n, q in act.items() if any(n.startswith(l + ".") for l in tla)]
    other_scales = [q.scales for n, q in act.items() if not any(n.startswith(l + ".") for l in tla)]
    if cfg.method == "full":
        weights = [p for l in layers.values() for p in (l.weight, l.bias) if p is not None]
        phases = [("full", weights, tla_scales + other_scales, tla + cma, cfg.tla_iters_per_group + cfg.cma_epochs * cfg.cma_iters_per_group, 1)]
    else:
        tla_w = [p for n in tla for p in (layers[n].weight, layers[n].bias) if p is not None]
        cma_w = [p for n in cma for p in (layers[n].weight, layers[n].bias) if p is not None]
        phases = [("tla", tla_w, tla_scales, tla, cfg.tla_iters_per_group, 1),
                  ("cma", cma_w, other_scales, cma, cfg.cma_iters_per_group, cfg.cma_epochs)]
    qunet.requires_grad_(False)
    trainable = {id(p): p for _, w, s, *_ in phases for p in (*w, *s)}
    for p in trainable.values():
        p.requires_grad_(True)
    names = {id(p): n for n, p in qunet.named_parameters()}
    fp_unet.requires_grad_(False)
    groups = _group_of_steps(calib, qunet.bins)
    order = sorted(groups, reverse=True)  # sampling order: high noise first
    batches = _Batches(calib, cfg.batch_size, seed)
    # One flat plan of iterations, so an interrupted run can restart at any iteration:
    # (phase index, group, first iteration of the phase, first iteration of the (epoch, group) segment)
    plan = []
    for pi, (_, _, _, _, iters, epochs) in enumerate(phases):
        for e in range(epochs):
            for gi, g in enumerate(order):
                plan += [(pi, g, e == 0 and gi == 0 and it == 0, it == 0) for it in range(iters)]
    losses: dict[str, list[float]] = {ph[0]: [] for ph in phases}
    k0, saved = 0, None
    if resume is not None and resume.exists():
        saved = torch.load(resume, weights_only=False)
        k0 = saved["k"]
        losses = saved["losses"]
        by_name = dict(qunet.named_parameters())
        with torch.no_grad():
            for n, t in saved["params"].items():
                by_name[n].copy_(t)
        batches.gen.set_state(saved["gen"])
        log(f"finetune: resuming at iteration {k0} of {len(plan)} from {resume}")
    bar = tqdm(total=len(plan), initial=k0, desc=f"finetune ({cfg.method})", disable=not progress)
    qunet.train()
    with _freeze_untrained(layers, trainable):
        opt_w = opt_s = None
        for k in range(k0, len(plan)):
            pi, g, first_of_phase, first_of_segment = plan[k]
            name, weights, scales, taps, _, _ = phases[pi]
            if opt_w is None or first_of_phase:
                opt_w = torch.optim.Adam(weights, lr=cfg.lr_weights) if weights else None
                if saved is not None and not first_of_phase and opt_w is not None:
                    opt_w.load_state_dict(saved["opt_w"])
            if opt_s is None or first_of_segment:
                qunet.set_timestep_group(g)
                opt_s = torch.optim.Adam(scales, lr=cfg.lr_scales) if scales else None
                if saved is not None and not first_of_segment and opt_s is not None:
                    opt_s.load_state_dict(saved["opt_s"])
            saved = None
            loss, _, _ = _loss(qunet, fp_unet, batches.draw(groups[g]), taps, cfg.w_local, cfg.w_global)
            for opt in (opt_w, opt_s):
                if opt:
                    opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in (opt_w, opt_s):
                if opt:
                    opt.step()
            with torch.no_grad():
                for sc in scales:
                    sc.clamp_(min=1e-8)
            losses[name].append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(phase=name, group=g, loss=f"{losses[name][-1]:.4g}")
            if resume is not None and checkpoint_every and (k + 1) % checkpoint_every == 0 and k + 1 < len(plan):
                _save_resume(resume, {
                    "k": k + 1, "losses": losses, "gen": batches.gen.get_state(),
                    "params": {names[id(p)]: p.detach().clone() for p in trainable.values()},
                    "opt_w": opt_w.state_dict() if opt_w else None, "opt_s": opt_s.state_dict() if opt_s else None,
                })
    bar.close()
    report = {"tla_layers": tla, "cma_layers": cma, "phases": [
        {"name": n, "iterations": len(v), "first_loss": v[0] if v else None,
         "last_loss": sum(v[-20:]) / len(v[-20:]) if v else None} for n, v in losses.items()]}
    qunet.eval()
    qunet.requires_grad_(False)
    report["trainable_params"] = sum(p.numel() for p in trainable.values())
    report["total_params"] = _count(qunet)
    report["seconds"] = round(time.time() - started, 2)
    return report


def _freeze_untrained(layers: dict[str, nn.Module], trainable: dict[int, nn.Parameter]) -> contextlib.ExitStack:
    """Fake-quantize once the weights that no phase trains (quest: about three quarters of them) instead of
    every iteration; the numbers are the same, the forward pass is cheaper."""
    stack = contextlib.ExitStack()
    for layer in layers.values():
        wq = layer.weight_quantizer
        if wq is not None and id(layer.weight) not in trainable and id(wq.scale) not in trainable:
            stack.enter_context(wq.frozen(layer.weight))
    return stack


def _save_resume(path, state: dict) -> None:
    """Atomic: a kill during the write leaves the previous resume point intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _count(qunet) -> int:
    return sum(p.numel() for n, p in qunet.unet.named_parameters() if "quantizer" not in n)
