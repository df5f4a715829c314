"""CUDA's rules on CPU: run real code on the CPU while refusing what CUDA kernels refuse and CPU kernels forgive.

Two torch modes work together. `_CudaAutocast` (a function mode, above the dispatcher, where the autocast state is
still visible) makes CPU autocast cast what CUDA autocast casts: CUDA runs norms, softmax and a few more in fp32
under autocast and CPU autocast leaves them alone, so without it the checks below would see mixed dtypes CUDA never
sees. `_KernelRules` (a dispatch mode) then checks every aten op, forward and backward, as a CUDA kernel would:
  - norms: input, weight and bias of one dtype (CUDA's group_norm/layer_norm read gamma as the input's type);
  - matmul/conv/attention: every floating operand of one dtype;
  - index ops: integer indices (int64 where CUDA insists);
  - float8 tensors only converted, copied or viewed, never computed with (CUDA has no fp8 arithmetic kernels);
  - one device per op (0-dim CPU tensors excepted, as on CUDA). On a CPU-only run everything is on the CPU, so
    this rule only bites on mixes with other devices (meta); the real check is gpu_check.sh.
Usage: `with cuda_rules(): ...`; a violation raises CudaRuleError naming the op and the dtypes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten


class CudaRuleError(RuntimeError):
    """An op that a CUDA kernel would refuse."""


# CUDA autocast's fp32 list (torch.amp docs, "CUDA Ops that can autocast to float32") as far as CPU autocast does
# not cover it and our models call it; its lower-precision list where CPU's lacks an entry.
CUDA_FP32 = {
    F.group_norm, torch.group_norm, F.layer_norm, torch.layer_norm,
    F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax,
    torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__,
    torch.rsqrt, torch.Tensor.rsqrt, torch.sum, torch.Tensor.sum, torch.cumsum, torch.Tensor.cumsum,
    F.softplus, F.normalize, torch.norm, torch.Tensor.norm, F.mse_loss,
}
CUDA_LOWER = {torch.mv, torch.Tensor.mv, torch.addmv, torch.addr, torch.chain_matmul, torch.linalg.multi_dot}

_SPECIAL = CUDA_FP32 | CUDA_LOWER | {torch.Tensor.backward}


def _cast_floats(tree, dtype: torch.dtype):
    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


def _backward(tensor, gradient=None, retain_graph=None, create_graph=False, inputs=None) -> None:
    """Tensor.backward with this mode on: a mode is off inside its own handler, and gradient checkpointing
    recomputes forward (norms included) inside backward. Calls the engine as torch.autograd.backward does."""
    from torch.autograd.graph import _engine_run_backward

    grad = torch.ones_like(tensor) if gradient is None else gradient
    with _CudaAutocast():
        _engine_run_backward((tensor,), (grad,), create_graph if retain_graph is None else retain_graph, create_graph,
                             tuple(inputs or ()), allow_unreachable=True, accumulate_grad=True)


class _CudaAutocast(TorchFunctionMode):
    """Under CPU autocast, cast the arguments of CUDA-autocast ops exactly as CUDA autocast would."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _SPECIAL:  # most calls (attribute reads included): straight through
            return func(*args, **kwargs)
        if func is torch.Tensor.backward:
            return _backward(*args, **kwargs)
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.float32 if func in CUDA_FP32 else torch.get_autocast_dtype("cpu")
            args, kwargs = _cast_floats((args, kwargs), dtype)
            with torch.autocast("cpu", enabled=False):  # CUDA autocast runs the op itself with autocast off
                return func(*args, **kwargs)
        return func(*args, **kwargs)


NORMS = {  # op -> positions of the tensors that must share one dtype
    aten.native_group_norm.default: (0, 1, 2),
    aten.native_layer_norm.default: (0, 2, 3),
    aten.native_group_norm_backward.default: (0, 1, 4),
    aten.native_layer_norm_backward.default: (0, 1, 5, 6),
}
SAME_DTYPE = {  # op -> positions that must share one floating dtype (None: every floating tensor argument)
    **dict.fromkeys([
        aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.addbmm.default,
        aten.mv.default, aten.addmv.default, aten.dot.default, aten.linear.default, aten.matmul.default,
        aten.convolution.default, aten.convolution_backward.default, aten._convolution.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,  # q, k, v and a float attn_mask
        aten.scaled_dot_product_attention.default, aten._scaled_dot_product_attention_math.default,
    ]),
    # grad_out, q, k, v, out; the logsumexp is fp32 on CUDA too
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: (0, 1, 2, 3, 4),
}
LONG = (torch.int64,)
INT = (torch.int64, torch.int32)
INDEX = {  # op -> (position of the index tensor(s), dtypes CUDA accepts)
    aten.embedding.default: (1, INT),
    aten.embedding_dense_backward.default: (1, INT),
    aten.index_select.default: (2, INT),
    aten.gather.default: (2, LONG),
    aten.scatter.src: (2, LONG), aten.scatter.value: (2, LONG), aten.scatter_add.default: (2, LONG),
    aten.index.Tensor: (1, (*INT, torch.bool, torch.uint8)),
    aten.index_put.default: (1, (*INT, torch.bool, torch.uint8)),
    aten.index_put_.default: (1, (*INT, torch.bool, torch.uint8)),
}
FP8 = {torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz}
FP8_OK = {  # conversions, copies and views: what CUDA does with fp8 outside _scaled_mm
    "_to_copy", "copy_", "clone", "detach", "alias", "view", "_unsafe_view", "reshape", "t", "transpose",
    "permute", "expand", "slice", "select", "contiguous", "empty_like", "empty", "empty_strided", "lift_fresh",
    "set_", "as_strided", "unsqueeze", "squeeze", "split", "split_with_sizes", "_has_compatible_shallow_copy_type",
    "new_empty", "new_empty_strided", "zeros_like", "_local_scalar_dense", "unfold", "flatten", "chunk",
}


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensor arguments of an aten op (one level of lists: cat, index); cheaper than a pytree walk."""
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, list | tuple):
            found.extend(t for t in a if isinstance(t, torch.Tensor))
    return found


def _name(func) -> str:
    return func._schema.name.split("::")[-1]


_KINDS: dict = {}  # aten op -> which rule applies, worked out once per op


def _kind(func) -> str:
    kind = _KINDS.get(func)
    if kind is None:
        kind = _KINDS[func] = ("view" if _name(func) in FP8_OK else "norm" if func in NORMS else
                               "same" if func in SAME_DTYPE else "index" if func in INDEX else "other")
    return kind


def _check(func, args: tuple, kwargs: dict) -> None:
    kind = _kind(func)
    if kind == "view":  # conversions, copies, views: fp8 allowed, and a copy may cross devices as on CUDA
        return
    tensors = _tensors(args, kwargs)
    if len(tensors) > 1:
        devices = {t.device for t in tensors if t.dim() or t.device.type != "cpu"}
        if len(devices) > 1:
            raise CudaRuleError(f"{_name(func)}: tensors on several devices {sorted(map(str, devices))}")
    if any(t.dtype in FP8 for t in tensors):
        raise CudaRuleError(f"{_name(func)}: computes with float8 tensors; CUDA only converts them")
    if kind == "norm":
        dtypes = [args[i].dtype for i in NORMS[func] if i < len(args) and isinstance(args[i], torch.Tensor)]
        if len(set(dtypes)) > 1:
            raise CudaRuleError(f"{_name(func)}: input/weight/bias dtypes {dtypes} differ (CUDA: expected scalar "
                                f"type {str(dtypes[0]).replace('torch.', '')} for all)")
    elif kind == "same":
        positions = SAME_DTYPE[func]
        operands = tensors if positions is None else [args[i] for i in positions]
        dtypes = {t.dtype for t in operands if t.is_floating_point()}
        if len(dtypes) > 1:
            raise CudaRuleError(f"{_name(func)}: operands of dtypes {sorted(map(str, dtypes))}; CUDA needs one")
    elif kind == "index":
        position, allowed = INDEX[func]
        index = args[position] if position < len(args) else None
        indices = index if isinstance(index, list | tuple) else [index]
        bad = [t.dtype for t in indices if isinstance(t, torch.Tensor) and t.dtype not in allowed]
        if bad:
            raise CudaRuleError(f"{_name(func)}: index dtype {bad[0]}; CUDA needs one of {[str(d) for d in allowed]}")


class _KernelRules(TorchDispatchMode):
    """Checks every aten op (backward included) against the rules in the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _check(func, args, kwargs)
        self.ops += 1
        return func(*args, **kwargs)


@contextmanager
def cuda_rules():
    """Run the body under CUDA's autocast policy and kernel rules; yields the rule mode (`.ops` counts ops seen)."""
    rules = _KernelRules()
    with _CudaAutocast(), rules:
        yield rules
