"""Fused LM head + cross-entropy: the loss and its gradients in one pass over token chunks.

With a 129k vocabulary the `tokens x vocab` logits dominate training memory (HF materialises them in fp32,
plus softmax and gradient copies of the same size). Here each chunk's logits are turned into the loss and,
immediately, into the gradients for the hidden states and the head weight, then dropped: memory holds one
chunk of logits at a time, and no logits are recomputed in the backward pass (same matmul count as the
unfused head, 3 per chunk, against 4 for a checkpointed chunk).

The softmax gradient of a chunk (`softmax(z) - onehot(target)`) is the elementwise work of the head: in
eager PyTorch it takes several passes over the (chunk x vocab) logits and, for bf16 logits, an fp32 copy of
them. With `kernel="compiled"` it is one `torch.compile`d function that reads the logits twice (row maximum
and sum, then the gradient) and writes the gradient in the logits' dtype, with no fp32 temporary: about 4x
less time for that part on CPU. It compiles once per process (seconds; needs a C++ compiler on CPU) and
falls back to the eager code, with a warning, where compiling fails (`is_compile_error`: a backend
compiler failure, a missing C++ compiler, a graph dynamo cannot capture). Any other error, e.g. running
out of memory or a shape mismatch, propagates: falling back would hide it and run slower ever after.

Needs the head weight as a plain tensor, so engines that shard parameters inside module calls (ZeRO-3)
use `chunked_causal_lm_loss` instead.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError, InvalidBackend, Unsupported
from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

KERNELS = ("auto", "compiled", "eager")
# "auto" compiles when a chunk has at least this many logits: below it the elementwise work is too small
# to repay the compile time (seconds, once per process).
AUTO_COMPILE_MIN_LOGITS = 1 << 25


# Written for the compiler: every (C, V) intermediate below is fused away. The softmax runs in fp32 (fp64
# for fp64 logits); z is a chunk's logits (C, V), target (C,) its labels, valid (C,) 1.0 on counted tokens.


def _xent_reduce(z: Tensor, target: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over the valid tokens, and the row logsumexp (C, 1) in softmax precision."""
    x = z.to(torch.promote_types(z.dtype, torch.float32))
    row_max = x.amax(dim=-1, keepdim=True)
    lse = row_max + torch.log(torch.exp(x - row_max).sum(dim=-1, keepdim=True))
    loss = ((lse - x.gather(1, target[:, None])).squeeze(1) * valid).sum()
    return loss, lse


def _xent_grad(z: Tensor, lse: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """d loss / d z = `(softmax(z) - onehot(target)) * valid`, in z's dtype: one elementwise pass."""
    x = z.to(lse.dtype)
    onehot = (torch.arange(x.shape[1], device=x.device)[None, :] == target[:, None]).to(x.dtype)
    return ((torch.exp(x - lse) - onehot) * valid[:, None]).to(z.dtype)


def _xent_grad_math(z: Tensor, target: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Loss sum and gradient in one compiled function: the logits are read twice (row reduction, then
    the gradient) and only the gradient is materialised. Not composed from `_xent_reduce` and
    `_xent_grad`: dividing by the row sum instead of subtracting the logsumexp compiles to a kernel that
    is ~1.4x faster on bf16 logits (CPU, 512 x 129k)."""
    x = z.to(torch.promote_types(z.dtype, torch.float32))
    row_max = x.amax(dim=-1, keepdim=True)
    e = torch.exp(x - row_max)
    total = e.sum(dim=-1, keepdim=True)
    loss = ((row_max + torch.log(total) - x.gather(1, target[:, None])).squeeze(1) * valid).sum()
    onehot = (torch.arange(x.shape[1], device=x.device)[None, :] == target[:, None]).to(x.dtype)
    return loss, ((e / total - onehot) * valid[:, None]).to(z.dtype)


def _xent_grad_in_place(z: Tensor, lse: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Overwrite z with its gradient. Compiled on its own, this pure elementwise pass is written straight
    into z (compiled together with the reduction, the compiler allocates a second (C, V) buffer)."""
    z.copy_(_xent_grad(z, lse, target, valid))
    return lse


# What compiling can fail with in torch 2.13: inductor failures reach the caller as BackendCompilerFailed
# (InductorError, wrapping e.g. InvalidCxxCompiler or CppCompileError); Unsupported is a graph dynamo cannot
# capture with fullgraph=True. TorchRuntimeError (an op failing on fake tensors while tracing: a shape
# error in the code) is deliberately not here, nor are errors raised while the compiled code runs.
COMPILE_ERRORS: tuple[type[BaseException], ...] = (
    BackendCompilerFailed,
    Unsupported,
    InternalTorchDynamoError,
    InvalidBackend,
    InvalidCxxCompiler,
    CppCompileError,
)


def is_compile_error(err: BaseException) -> bool:
    """Whether `err` means "this function cannot be compiled here" (fall back to eager), as opposed to an
    error the eager code would hit as well or that must not be hidden (out of memory while compiling)."""
    if not isinstance(err, COMPILE_ERRORS):
        return False
    inner = getattr(err, "inner_exception", None)
    return not isinstance(inner, torch.OutOfMemoryError | MemoryError)


def _describe(err: BaseException) -> str:
    """`Type: first line` of the error, and of the one it wraps (BackendCompilerFailed's own text is a
    preamble like "backend='inductor' raised:")."""
    parts = [err]
    inner = getattr(err, "inner_exception", None)
    if inner is not None:
        parts.append(inner)
    return " <- ".join(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}" for e in parts)


def isolate_inductor_cache() -> None:
    """Keep torch.compile's on-disk cache apart per CPU instruction-set limit, unless the user chose a
    cache folder (TORCHINDUCTOR_CACHE_DIR).

    Measured with torch 2.13: a kernel compiled in a process limited by ATEN_CPU_CAPABILITY=avx2 is found
    in the shared cache by a later unlimited process on the same machine and computes wrong values there
    (the LM-head loss was off by 0.5%; a bf16 run aborted). The cache key misses the limit, so the limit
    goes into the folder name."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return  # (torch itself fills the variable in with its default on import)
    capability = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "all")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default_cache_dir(), f"isa-{capability}-{onednn}")


class _CompiledKernel:
    """The compiled kernels, each built on first use; all disabled for the process after a compile error."""

    def __init__(self) -> None:
        self.fns: dict[str, Callable[..., Any]] = {}
        self.failed = False

    def run(self, fn: Callable[..., Any], *args: Tensor) -> Any:
        """`fn(*args)` compiled, or None when compiling is not possible here (a warning says why).

        Only compile errors (`is_compile_error`) turn to None; every other error propagates."""
        if self.failed:
            return None
        try:
            if fn.__name__ not in self.fns:
                isolate_inductor_cache()
                self.fns[fn.__name__] = torch.compile(fn, fullgraph=True)
            return self.fns[fn.__name__](*args)
        except Exception as err:
            if not is_compile_error(err):
                raise
            self.failed = True
            warnings.warn(
                f"the compiled LM-head loss kernel is not available ({_describe(err)}); using the eager kernel",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    def loss_and_grad(self, z: Tensor, target: Tensor, valid: Tensor) -> tuple[Tensor, Tensor] | None:
        """Loss sum and d loss / d z in z's dtype, or None. When z already has the softmax precision
        (fp32 logits) the gradient overwrites z, halving the chunk's memory at the same speed; for bf16
        logits the one-pass out-of-place kernel is faster and its bf16 gradient is small."""
        if z.dtype != torch.promote_types(z.dtype, torch.float32):
            return self.run(_xent_grad_math, z, target, valid)
        out = self.run(_xent_reduce, z, target, valid)
        if out is None or self.run(_xent_grad_in_place, z, out[1], target, valid) is None:
            return None
        return out[0], z


_COMPILED = _CompiledKernel()


def use_compiled_kernel(kernel: str, rows: int, vocab: int) -> bool:
    """Whether chunks of `rows` x `vocab` logits go through the compiled kernel under setting `kernel`."""
    if kernel not in KERNELS:
        raise ValueError(f"loss kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "auto":
        return rows * vocab >= AUTO_COMPILE_MIN_LOGITS
    return kernel == "compiled"


def _matmul_dtype(device: torch.device, fallback: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return fallback


def _chunk_loss(
    h: Tensor, w: Tensor, target: Tensor, acc: torch.dtype, logit_scale: float, softcap: float | None
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """One chunk: logits z (C, V) in `acc` precision, tanh(z/cap) when soft-capped, logsumexp (C,) and
    the per-token cross-entropy (C,)."""
    z = F.linear(h, w).to(acc)
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    tanh = None
    if softcap:
        tanh = torch.tanh(z / softcap)
        z = tanh * softcap
    lse = torch.logsumexp(z, dim=-1)
    return z, tanh, lse, lse - z.gather(1, target[:, None]).squeeze(1)


def _eager_chunk(
    h: Tensor,
    w: Tensor,
    target: Tensor,
    valid: Tensor,
    acc: torch.dtype,
    logit_scale: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor]:
    """Loss sum and d loss / d logits of one chunk in `acc` precision, without a compiler."""
    z, tanh, lse, token_loss = _chunk_loss(h, w, target, acc, logit_scale, softcap)
    # softmax(z) - onehot(target), zero for ignored tokens; computed in place in z
    grad_z = z.sub_(lse[:, None]).exp_()
    grad_z[torch.arange(h.shape[0], device=z.device), target] -= 1.0
    grad_z.mul_(valid[:, None])
    if tanh is not None:
        grad_z.mul_(1.0 - tanh * tanh)
    if logit_scale != 1.0:
        grad_z.mul_(logit_scale)
    return (token_loss * valid).sum(), grad_z


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        chunk_size: int,
        ignore_index: int,
        logit_scale: float,
        softcap: float | None,
        kernel: str,
    ) -> tuple[Tensor, Tensor]:
        # hidden (N, H), weight (V, H), labels (N,)
        mm_dtype = _matmul_dtype(hidden.device, weight.dtype)
        rows = min(chunk_size, hidden.shape[0])
        plain = logit_scale == 1.0 and not softcap  # the compiled kernel has no scale or soft-cap
        compiled = plain and use_compiled_kernel(kernel, rows, weight.shape[0])
        w = weight.to(mm_dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        acc = torch.promote_types(mm_dtype, torch.float32)  # softmax and accumulation precision
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
        valid_all = labels != ignore_index
        # Buffers allocated once per call rather than per chunk: fresh 100+ MB tensors cost page faults.
        logits_buf = torch.empty((rows, w.shape[0]), dtype=mm_dtype, device=w.device) if compiled else None
        gw_buf = torch.empty(w.shape, dtype=mm_dtype, device=w.device) if mm_dtype != acc else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:end].to(mm_dtype)  # (C, H)
            valid = valid_all[start:end]
            target = labels[start:end].masked_fill(~valid, 0)  # (C,)
            fast = None
            if logits_buf is not None:
                z = torch.mm(h, w.t(), out=logits_buf[: end - start])
                fast = _COMPILED.loss_and_grad(z, target, valid.to(acc))
            if fast is not None:
                chunk_loss, g = fast
                loss_sum += chunk_loss
            else:
                chunk_loss, g = _eager_chunk(h, w, target, valid, acc, logit_scale, softcap)
                loss_sum += chunk_loss
                g = g.to(mm_dtype)
            grad_hidden[start:end] = (g @ w).to(hidden.dtype)
            if gw_buf is None:
                grad_weight.addmm_(g.t(), h)
            else:  # bf16 product, fp32 sum
                grad_weight.add_(torch.mm(g.t(), h, out=gw_buf))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum, valid_all.sum()

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_count: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            (grad_weight * grad_loss).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    kernel: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Sum of token cross-entropies of `hidden @ weight.T` against `labels` (already shifted), and the count
    of counted tokens. hidden (..., H), weight (V, H), labels (...). Differentiable in hidden and weight.

    `kernel` picks the softmax-gradient code: "compiled", "eager", or "auto" (compiled for chunks of at
    least `AUTO_COMPILE_MIN_LOGITS` logits, where it repays its compile time)."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return _loss_only(
            flat_hidden, weight, flat_labels, max(int(chunk_size), 1), ignore_index, logit_scale, softcap
        )
    return _FusedLinearCrossEntropy.apply(
        flat_hidden,
        weight,
        flat_labels,
        max(int(chunk_size), 1),
        ignore_index,
        float(logit_scale),
        softcap,
        kernel,
    )


def _loss_only(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    chunk_size: int,
    ignore_index: int,
    logit_scale: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor]:
    """Evaluation: the same loss without computing any gradient."""
    mm_dtype = _matmul_dtype(hidden.device, weight.dtype)
    w = weight.to(mm_dtype)
    acc = torch.promote_types(mm_dtype, torch.float32)
    loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
    valid_all = labels != ignore_index
    for start in range(0, hidden.shape[0], chunk_size):
        valid = valid_all[start : start + chunk_size]
        target = labels[start : start + chunk_size].masked_fill(~valid, 0)
        h = hidden[start : start + chunk_size].to(mm_dtype)
        token_loss = _chunk_loss(h, w, target, acc, logit_scale, softcap)[3]
        loss_sum += (token_loss * valid).sum()
    return loss_sum, valid_all.sum()
