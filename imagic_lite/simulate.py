"""Peak GPU memory without a GPU: the project's own encode, stage A, B, C and decode code runs on fake tensors
(shapes, dtypes and autograd real; no memory, no arithmetic) while a dispatch-level counter follows every live
storage on the compute device, which is what CUDA's `max_memory_allocated` reports.

Why it can be trusted, and where it cannot (README "GPU memory (simulated)"):
- autograd on a fake CUDA device aborts in a CPU-only torch (no CUDA device guard), so the compute device is a fake
  CPU and offloaded modules wait on `meta` (Components.host); CUDA's autocast policy is put on the CPU's autocast
  key for the run (norms, softmax, upsampling and reductions in fp32, as on the card), so activations get CUDA's
  dtypes; SDPA takes the CPU flash kernel, which saves what CUDA's flash/memory-efficient kernels save;
- bitsandbytes NF4/int8 layers cannot run on fake tensors: a stand-in layer holds exactly the bytes bitsandbytes
  stores and makes the same dequantized-weight transient (said in each result's `stand_ins`);
- not counted: cuDNN/cuBLAS workspaces and allocator rounding (in the card allowance), the CUDA context.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .config import Preset, load_preset
from .errors import InputError
from .vram import PARTS, SCHEMA, _native, assumptions, environment, family_name, model_path, verdict

PROMPT = "a photo of a dog lying down"

# ---------------------------------------------------------------------------------------------------------------
# The counter


class LiveBytes(TorchDispatchMode):
    """Bytes of every live storage on `device_type`, by part, with the peak and what it was made of.

    Each op's outputs are registered by storage (views share one); a `weakref.finalize` on the storage takes its
    bytes off when it dies, which is when the caching allocator would get the block back. Parts are set when a
    storage is made (activations unless said otherwise) and moved by `retag` when it becomes a weight, a
    trainable, a gradient or optimizer state. On fake tensors `.item()` answers 0.5 (and `bool()` True): the stage
    loops read the loss."""

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, list] = {}  # id(storage) -> [bytes, part]
        self.parts = dict.fromkeys(PARTS, 0)
        self.now = 0
        self.where = ""
        self.formulas = flop_formulas()
        self.flops = 0
        self.reset()

    def reset(self) -> None:
        """Start a new window: the peak so far is what is live now."""
        self.peak = self.now
        self.peak_parts = dict(self.parts)
        self.peak_where = self.where
        self._largest: list[tuple[int, int, str, str]] = []  # (bytes, key, op, where): the 16 largest new storages

    def track(self, tensor: torch.Tensor, part: str = "activations", op: str = "") -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device_type or tensor.is_sparse:
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        entry = self.live.get(key)
        if entry is not None:
            if part != "activations" and entry[1] != part:
                self._move(entry, part)
            return
        size = storage.nbytes()
        self.live[key] = [size, part, op, self.where]
        self.parts[part] += size
        self.now += size
        weakref.finalize(storage, self._free, key)
        if part == "activations" and (len(self._largest) < 16 or size > self._largest[-1][0]):
            self._largest = sorted([*self._largest, (size, key, op, self.where)], reverse=True)[:16]

    @property
    def largest(self) -> tuple[int, str, str]:
        """(bytes, op, where) of the largest storage made in this window that stayed an activation or transient (a
        module moved onto the device arrives through `_to_copy` too, and is a weight from then on)."""
        for size, key, op, where in self._largest:
            entry = self.live.get(key)
            if entry is None or entry[1] == "activations":
                return size, op, where
        return 0, "", ""

    def retag(self, tensor: torch.Tensor | None, part: str) -> None:
        if tensor is not None:
            self.track(tensor, part)

    def _move(self, entry: list, part: str) -> None:
        self.parts[entry[1]] -= entry[0]
        self.parts[part] += entry[0]
        entry[1] = part

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.parts[entry[1]] -= entry[0]
            self.now -= entry[0]

    def _check_peak(self) -> None:
        if self.now >= self.peak:  # >=: a later equal peak (steady state, tags settled) describes it best
            self.peak = self.now
            self.peak_parts = dict(self.parts)
            self.peak_where = self.where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            return True if args[0].dtype == torch.bool else 0.5
        out = func(*args, **kwargs)
        formula = self.formulas.get(func.overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        name = str(func.overloadpacket.__name__)
        for t in tree_flatten(out)[0]:
            self.track(t, op=name)
        self._check_peak()
        return out


def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


# ---------------------------------------------------------------------------------------------------------------
# CUDA's autocast policy on the CPU autocast key


# Ops the CUDA autocast runs in fp32 (aten/src/ATen/autocast_mode.cpp, `fp32` and `fp32_set_opt_dtype` lists) that
# the CPU autocast leaves in the input's dtype and that occur in SD UNets, VAEs and losses. (Both autocasts put
# convolutions, linear layers, matmuls and SDPA in half precision alike.)
FP32_CAST = ("group_norm", "layer_norm", "native_layer_norm", "exp", "log", "rsqrt", "pow.Tensor_Scalar",
             "pow.Tensor_Tensor", "softplus", "mse_loss", "upsample_nearest2d", "upsample_nearest2d.vec",
             "upsample_bilinear2d", "upsample_bilinear2d.vec", "logsumexp", "l1_loss")
FP32_DTYPE = ("softmax.int", "log_softmax.int", "sum", "sum.dim_IntList", "cumsum", "prod")


def _fp32(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _autocast_kernel(op, set_dtype: bool) -> Callable:
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def kernel(*args, **kwargs):
        first = args[0]
        eligible = isinstance(first, torch.Tensor) and first.is_floating_point() and first.dtype != torch.float64
        if set_dtype:
            if eligible and kwargs.get("dtype") is None:
                kwargs = {**kwargs, "dtype": torch.float32}
        else:
            args, kwargs = tree_map(_fp32, (args, kwargs))
        with torch._C._ExcludeDispatchKeyGuard(keys):
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """While open, `torch.autocast("cpu")` casts like `torch.autocast("cuda")` does for the ops above."""
    import warnings

    lib = torch.library.Library("aten", "IMPL")  # noqa: TOR901 - a temporary override, destroyed below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for names, set_dtype in ((FP32_CAST, False), (FP32_DTYPE, True)):
                for name in names:
                    base, _, overload = name.partition(".")
                    op = getattr(getattr(torch.ops.aten, base), overload or "default")
                    lib.impl(name, _autocast_kernel(op, set_dtype), "AutocastCPU")
        yield
    finally:
        lib._destroy()


# ---------------------------------------------------------------------------------------------------------------
# Stand-ins for what bitsandbytes keeps on the card


def nf4_bytes(rows: int, cols: int, blocksize: int = 64) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors bitsandbytes' Linear4bit stores (nf4, blocksize 64, compress_statistics=True): the packed weight,
    the absmax per block quantized to uint8 with an fp32 absmax per 256 of them, and the two codebooks."""
    n = rows * cols
    blocks = math.ceil(n / blocksize)
    return {"weight": (((n + 1) // 2, 1), torch.uint8), "absmax": ((blocks,), torch.uint8),
            "absmax2": ((math.ceil(blocks / 256),), torch.float32), "code2": ((256,), torch.float32),
            "offset": ((), torch.float32), "code": ((16,), torch.float32)}


def int8_bytes(rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Linear8bitLt (has_fp16_weights=False): the int8 weight and one fp32 scale per row (SCB)."""
    return {"weight": ((rows, cols), torch.int8), "SCB": ((rows,), torch.float32)}


class _DequantLinearFn(torch.autograd.Function):
    """As bitsandbytes' MatMul4Bit: the weight is dequantized to the compute dtype for the matmul in forward and
    again in backward; only the stored (quantized) tensors are kept for backward."""

    @staticmethod
    def forward(ctx, x, stored, shape, bias):
        ctx.save_for_backward(stored)
        ctx.shape = shape
        w = stored.new_empty(shape, dtype=x.dtype)  # the dequantized weight, a transient on the card
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        (stored,) = ctx.saved_tensors
        w = stored.new_empty(ctx.shape, dtype=grad.dtype)
        return grad @ w, None, None, None


class StoredLinear(nn.Linear):
    """A Linear layer holding exactly the bytes a bitsandbytes NF4 or int8 layer stores (simulation only). An
    nn.Linear to PEFT, as Fp8Linear is, so the LoRA wraps it (PEFT wraps a real bitsandbytes layer with its bnb
    variant, which adds one short-lived copy of the layer's output)."""

    def __init__(self, linear: nn.Linear, kind: str, compute_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        layout = (nf4_bytes if kind == "nf4" else int8_bytes)(self.out_features, self.in_features)
        device = linear.weight.device
        for name, (shape, dtype) in layout.items():
            tensor = torch.empty(shape, dtype=dtype, device=device)
            if name == "weight":
                self.weight = nn.Parameter(tensor, requires_grad=False)
            else:
                self.register_buffer(name, tensor)
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().to(compute_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = _DequantLinearFn.apply(x.to(self.compute_dtype), self.weight, (self.out_features, self.in_features),
                                     bias)
        return out.to(dtype)


def stand_in_bnb(model: nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device) -> int:
    """`quant.quantize_bnb`'s stand-in on the meta device: every Linear becomes a StoredLinear."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, StoredLinear(linear, kind, compute_dtype))
    return len(targets)


# ---------------------------------------------------------------------------------------------------------------
# Fake components


def fakeify(modules: list[nn.Module], mode, device: torch.device) -> None:
    """Replace every meta parameter and buffer by a fake tensor on `device` (shared tensors stay shared)."""
    from torch._subclasses.fake_tensor import FakeTensor

    made: dict[int, torch.Tensor] = {}
    for module in modules:
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for name, t in table.items():
                    if t is None:
                        continue
                    if id(t) not in made:
                        fake = FakeTensor(mode, t.data if t.device.type == "meta" else t.data.to("meta"), device)
                        made[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad) if isinstance(
                            t, nn.Parameter) else fake
                    table[name] = made[id(t)]


def _overwriting_apply(counter: LiveBytes) -> Callable:
    """Module._apply as torch had it before tensor swapping: a moved or cast tensor is a new Parameter/buffer (fake
    parameters refuse `torch.utils.swap_tensors`: the fake mode holds weak references to them). What lands on the
    device is a weight from then on."""

    def apply(self: nn.Module, fn: Callable, recurse: bool = True) -> nn.Module:
        if recurse:
            for module in self.children():
                module._apply(fn)
        for key, param in self._parameters.items():
            if param is None:
                continue
            with torch.no_grad():
                applied = fn(param)
            if applied is not param:
                new = nn.Parameter(applied, requires_grad=param.requires_grad)
                if param.grad is not None:
                    with torch.no_grad():
                        new.grad = fn(param.grad)
                self._parameters[key] = new
                counter.track(new, "trainable" if new.requires_grad else "weights")
        for key, buf in self._buffers.items():
            if buf is not None:
                self._buffers[key] = fn(buf)
                counter.track(self._buffers[key], "weights")
        return self

    return apply


def _foreach_as_on_cuda(params: list, differentiable: bool, use_fused: bool = False) -> tuple[bool, bool]:
    """torch's optimizers take the multi-tensor (foreach) path for CUDA parameters, which holds whole-list
    intermediates (e.g. sqrt of every exp_avg_sq at once); CPU and fake parameters would get the per-tensor loop."""
    return False, not differentiable


@contextlib.contextmanager
def cuda_like() -> Iterator[None]:
    """What makes a CPU run allocate as a CUDA run would: CUDA's autocast policy, CUDA's optimizer path."""
    with cuda_autocast_policy(), mock.patch("torch.optim.adam._default_to_fused_or_foreach", _foreach_as_on_cuda):
        yield


@contextlib.contextmanager
def _fake_world(mode, counter: LiveBytes) -> Iterator[None]:
    """Fake tensors with the counter on top, run as on CUDA, with a Module.to() that works on fake parameters."""
    with mock.patch.object(nn.Module, "_apply", _overwriting_apply(counter)), cuda_like(), mode, counter:
        yield


class _Watch:
    """Global module and optimizer hooks that keep the counter's parts and `where` right: a top module's weights are
    weights (or trainables) when it runs, gradients are grads once accumulated, optimizer state after a step."""

    def __init__(self, counter: LiveBytes, tops: dict[nn.Module, nn.Module], names: dict[int, str]) -> None:
        self.counter, self.tops, self.names = counter, tops, names
        self.stage = ""
        self.phase = ""
        self.stack: list[str] = []
        self.handles: list = []
        self.marks: dict[str, int] = {}  # FLOPs counted when stage C's decode began

    def __enter__(self) -> _Watch:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post),
                        register_optimizer_step_pre_hook(self._step_pre),
                        register_optimizer_step_post_hook(self._step_post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def set(self, stage: str, phase: str = "") -> None:
        self.stage, self.phase = stage, phase
        self._where()

    def _where(self) -> None:
        inner = self.stack[-1] if self.stack else ""
        self.counter.where = " ".join(x for x in (self.stage, self.phase, inner) if x)

    def _pre(self, module: nn.Module, args) -> None:
        owner = self.tops.get(module)
        if owner is not None:
            self._tag_module(owner)
            if self.stage == "C" and owner is not module and "decode" not in self.marks:
                self.marks["decode"] = self.counter.flops
            if self.phase == "backward":
                self.phase = "backward (recompute)"
            elif not self.phase.startswith("backward"):
                self.phase = "forward"
        self.stack.append(self.names.get(id(module), type(module).__name__))
        self._where()

    def _post(self, module: nn.Module, args, out) -> None:
        if self.stack:
            self.stack.pop()
        if module in self.tops and torch.is_grad_enabled() and self.tops[module] is module \
                and self.phase == "forward" and self.stage in ("A", "B"):
            self.phase = "backward"
        self._where()

    def _tag_module(self, module: nn.Module) -> None:
        for p in module.parameters():
            self.counter.retag(p, "trainable" if p.requires_grad else "weights")
            if p.requires_grad and not getattr(p, "_sim_grad_hook", False):
                p._sim_grad_hook = True  # marked on the tensor: ids of moved-away parameters get reused
                p.register_post_accumulate_grad_hook(lambda q: self.counter.retag(q.grad, "grads"))
        for b in module.buffers():
            self.counter.retag(b, "weights")

    def _step_pre(self, optimizer, args, kwargs) -> None:
        self.phase = "optimizer step"
        self._where()
        for group in optimizer.param_groups:
            for p in group["params"]:
                self.counter.retag(p.grad, "grads")

    def _step_post(self, optimizer, args, kwargs) -> None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self.counter.retag(value, "optimizer")
        self.phase = ""
        self._where()


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


def _sdpa_cpu_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_formulas() -> dict:
    """torch.utils.flop_counter's formulas by op, plus the CPU flash-attention kernel (which the simulation takes
    where CUDA takes flash/memory-efficient attention) with torch's own SDPA formulas: 4·B·H·L·S·D forward, 2.5x
    that backward. Called from the counter's dispatch: FlopCounterMode itself tracks modules with autograd hooks
    that kept each step's graph alive (the counter saw it as a leak)."""
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    aten = torch.ops.aten
    return {**flop_registry,
            aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(_sdpa_cpu_flops),
            aten._scaled_dot_product_flash_attention_for_cpu_backward: shape_wrapper(_sdpa_cpu_backward_flops)}


# ---------------------------------------------------------------------------------------------------------------
# One preset


@dataclass(frozen=True)
class SimSettings:
    """What a simulated run does: one A step and two B steps (B's second step is its steady state, with the LoRA's or
    the UNet's optimizer state present; A's optimizer state is Adam's on the embedding, under 2 MB even on SDXL, so
    a second A step is left out for time), one DDIM step and the decode of one batch of the preset's size."""

    embed_steps: int = 1
    tune_steps: int = 2
    sample_steps: int = 1
    auto_eta: bool = False  # also the `--auto-eta` search after C (eta 0's render and the judge), as stage "eta"


def _components(model: str, preset: Preset):
    """The model built by the product's loader on the meta device, every memory knob applied (no fake mode yet:
    module casts on fake parameters would need tensor swaps that fake tensors refuse)."""
    from .models import load_components

    return load_components(model, preset.memory, torch.device("cpu"), empty=True, quantize=stand_in_bnb)


def _no_images(x: torch.Tensor) -> list[None]:
    return [None] * x.shape[0]


def run_stages(c, preset: Preset, side: int, counter: LiveBytes, watch: _Watch | None,
               settings: SimSettings) -> dict[str, dict]:
    """encode, A, B, C (with decode) as `imagic-lite bench` runs them, each in its own window of the counter.
    Works on real tensors as well as fake ones (the proof compares the two)."""
    from .imagic import finetune, generate, optimize_embedding
    from .models import encode

    def window(stage: str) -> None:
        counter.reset()
        if watch is not None:
            watch.set(stage)
        counter.flops = 0

    def close(stage: str, steps: int) -> dict:
        size, op, where = counter.largest
        return {"peak_allocated_bytes": int(counter.peak), "parts_at_peak": dict(counter.peak_parts),
                "where_at_peak": counter.peak_where, "largest_transient": {"bytes": size, "op": op, "where": where},
                "end_bytes": int(counter.now), "flops": counter.flops, "steps": steps}

    out: dict[str, dict] = {}
    pixels = torch.rand((1, 3, side, side), generator=torch.Generator().manual_seed(0)) * 2 - 1
    window("encode")
    enc = encode(c, pixels, PROMPT)
    out["encode"] = close("encode", 1)
    window("A")
    e_opt, _ = optimize_embedding(c, enc.latent, enc.e_tgt, replace(preset.embed, steps=settings.embed_steps))
    out["A"] = close("A", settings.embed_steps)
    window("B")
    finetune(c, enc.latent, e_opt, replace(preset.tune, steps=settings.tune_steps))
    out["B"] = close("B", settings.tune_steps)
    window("C")
    batch = preset.sample.batch
    sample = replace(preset.sample, steps=settings.sample_steps, etas=(1.0,) * batch, seeds=(0,))
    # stage C turns the decoded pixels into PIL images on the host: not memory on the card, and not possible on
    # fake tensors; every other line of generate() and decode() runs as written
    with mock.patch("imagic_lite.images.from_tensor", _no_images):
        samples = generate(c, enc.e_tgt, e_opt, enc.uncond, sample, side, side)
    out["C"] = close("C", settings.sample_steps)
    if settings.auto_eta:
        from .eta import AutoEtaSettings, choose_eta, diffusion_judge

        window("eta")
        auto = AutoEtaSettings()
        judge, name, calls = diffusion_judge(c, enc.e_tgt, e_opt, auto)
        # the judge reads the rendered images back from host pixels, here a stand-in of the same shape
        with mock.patch("imagic_lite.images.from_tensor", _no_images), \
                mock.patch("imagic_lite.images.to_tensor", lambda image: torch.zeros((1, 3, side, side))):
            choose_eta(c, enc.e_tgt, e_opt, enc.uncond, sample, side, side, samples, judge, calls, name, auto)
        out["eta"] = close("eta", settings.sample_steps)
    return out


def _measure(c, preset: Preset, side: int, counter: LiveBytes, settings: SimSettings) -> dict[str, dict]:
    """Run the stages on loaded components with the counter already on; the watch names where things happen."""
    tops = {c.unet: c.unet, c.vae.encoder: c.vae, c.vae.decoder: c.vae, c.vae.quant_conv: c.vae,
            c.vae.post_quant_conv: c.vae, **{e: e for e in c.text_encoders}}
    names = {id(m): f"unet.{n}" if n else "unet" for n, m in c.unet.named_modules()}
    names.update({id(m): f"vae.{n}" if n else "vae" for n, m in c.vae.named_modules()})
    for i, e in enumerate(c.text_encoders):
        names.update({id(m): f"text_encoder{i + 1}.{n}" for n, m in e.named_modules()})
    for module in (c.unet, c.vae, *c.text_encoders):  # what is on the device before encode: weights
        for t in (*module.parameters(), *module.buffers()):
            counter.track(t, "weights")
    with _Watch(counter, tops, names) as watch:
        stages = run_stages(c, preset, side, counter, watch, settings)
    decode = watch.marks.get("decode")
    stages["C"]["decode_flops"] = None if decode is None else stages["C"]["flops"] - decode
    return stages


def _stand_ins(preset: Preset) -> list[str]:
    if preset.memory.storage not in ("nf4", "int8"):
        return []
    return [f"bitsandbytes {preset.memory.storage} Linear layers: a stand-in holding the same stored bytes and making "
            "the same dequantized-weight transient (imagic_lite.simulate.StoredLinear)"
            + ("; int8's outlier columns are not modelled" if preset.memory.storage == "int8" else "")]


def simulate_preset(model: str, preset: Preset, resolution: int | None = None,
                    settings: SimSettings | None = None, host: str = "meta") -> dict[str, Any]:
    """Simulated peak allocated bytes per stage of `preset` (resolved for the model's family) at `resolution`.

    `host="cpu"` keeps every module on the compute device, as a CPU run does (the proof against real tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .models import detect_family, resolve_model

    preset = preset.for_family(detect_family(resolve_model(model)).name)
    settings = settings or SimSettings()
    start = time.perf_counter()
    c = _components(model, preset)
    side = _side(c, resolution)
    counter = LiveBytes("cpu")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with _fake_world(mode, counter):
        fakeify([c.unet], mode, c.device)
        fakeify([c.vae, *c.text_encoders], mode, torch.device(host))
        c = replace(c, host=torch.device(host))
        stages = _measure(c, preset, side, counter, settings)
    return {"settings": preset.to_dict(), "side": side, "compute_dtype": str(c.dtype).removeprefix("torch."),
            "notes": list(c.notes), "stand_ins": _stand_ins(preset), "stages": stages,
            "seconds_to_simulate": round(time.perf_counter() - start, 1)}


def measure_real(model: str, preset: Preset, resolution: int | None = None,
                 settings: SimSettings | None = None) -> dict[str, Any]:
    """The same stages and the same counter on real CPU tensors: what `simulate_preset(..., host="cpu")` must match.
    bitsandbytes runs for real here, so compare presets without NF4/int8 storage."""
    from .models import detect_family, load_components, resolve_model

    preset = preset.for_family(detect_family(resolve_model(model)).name)
    settings = settings or SimSettings()
    start = time.perf_counter()
    c = load_components(model, preset.memory, torch.device("cpu"))
    side = _side(c, resolution)
    counter = LiveBytes("cpu")
    with cuda_like(), counter:
        stages = _measure(c, preset, side, counter, settings)
    return {"settings": preset.to_dict(), "side": side, "compute_dtype": str(c.dtype).removeprefix("torch."),
            "stages": stages, "seconds": round(time.perf_counter() - start, 1)}


def _side(c, resolution: int | None) -> int:
    side = resolution or c.native
    if side % c.multiple:
        raise InputError(f"--resolution {side} must be a multiple of {c.multiple} for this model")
    return side


def simulate_presets(model: str, names: list[str], resolution: int | None = None, command: str = "",
                     on_event: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Every named preset simulated for `model` at `resolution` (native if None), with verdicts and projections."""
    presets = [load_preset(n) for n in dict.fromkeys(names)]  # unknown names fail before any work
    path = model_path(model)
    family = family_name(path)
    result: dict[str, Any] = {"schema": SCHEMA, "kind": "simulated", "model": model, "family": family,
                              "resolution": resolution or _native(path), "env": environment(command),
                              "assumptions": assumptions(), "presets": {}}
    for preset in presets:
        entry = simulate_preset(model, preset, resolution)
        entry["verdict"] = verdict(entry, preset.for_family(family))
        result["presets"][preset.name] = entry
        if on_event is not None:
            on_event({"preset": preset.name, **entry["verdict"], "result": result})
    return result
