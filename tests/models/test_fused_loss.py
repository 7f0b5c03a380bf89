import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import InvalidCxxCompiler

from moe_recipes.models import fused_loss
from moe_recipes.models.fused_loss import fused_linear_cross_entropy


def _no_cxx_reason() -> str | None:
    """Why torch.compile cannot build CPU kernels here (no C++ compiler), or None when it can."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as err:
        return f"no C++ compiler for torch.compile on CPU, the compiled kernel cannot be built: {err}"
    return None


needs_cxx = pytest.mark.skipif(_no_cxx_reason() is not None, reason=str(_no_cxx_reason()))


@pytest.fixture
def compiled_kernel(monkeypatch):
    """A fresh compiled-kernel cache; the test fails if compiling fell back to eager (no silent pass)."""
    kernel = fused_loss._CompiledKernel()
    monkeypatch.setattr(fused_loss, "_COMPILED", kernel)
    yield kernel
    assert not kernel.failed, "compiling the LM-head loss kernel failed: the test ran the eager fallback"
    assert kernel.fns, "the compiled kernel was never used"


def reference(hidden, weight, labels, scale=1.0, softcap=None):
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32)) * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, (labels != -100).sum()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("scale, softcap", [(1.0, None), (0.5, None), (1.0, 3.0)])
def test_matches_full_cross_entropy_in_value_and_gradients(chunk, scale, softcap):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 17, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 17), generator=g)
    labels[0, :5] = -100
    labels[2, -1] = -100
    loss, count = fused_linear_cross_entropy(
        hidden, weight, labels, chunk, logit_scale=scale, softcap=softcap
    )
    (loss * 0.37).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref, ref_count = reference(hidden, weight, labels, scale, softcap)
    (ref * 0.37).backward()
    assert count.item() == ref_count.item() == 45
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-6, atol=1e-8)


def test_no_grad_path_gives_the_same_loss():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 30, (40,), generator=g)
    with torch.no_grad():
        loss, count = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=9)
    ref, _ = reference(hidden, weight, labels)
    assert count.item() == 40 and loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_bf16_autocast_close_to_fp32():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(64, 32, generator=g, requires_grad=True)
    weight = (torch.randn(100, 32, generator=g) * 0.1).requires_grad_()
    labels = torch.randint(0, 100, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    loss.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    ref, _ = reference(hidden.detach(), weight.detach(), labels)
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)


def _run(kernel, hidden, weight, labels, chunk, autocast=False):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, count = fused_linear_cross_entropy(hidden, weight, labels, chunk, kernel=kernel)
    (loss * 0.37).backward()
    return loss.detach(), count, hidden.grad, weight.grad


@needs_cxx
@pytest.mark.filterwarnings("error:the compiled LM-head loss kernel:RuntimeWarning")
def test_compiled_kernel_matches_reference_with_ignored_tokens_and_a_short_last_chunk(compiled_kernel):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 17, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 17), generator=g)
    labels[0, :5] = -100
    labels[2, -1] = -100
    loss, count, gh, gw = _run("compiled", hidden, weight, labels, chunk=7)  # chunks of 7 rows, then 2
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref, ref_count = reference(h, w, labels)
    (ref * 0.37).backward()
    assert count.item() == ref_count.item() == 45
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(gh, h.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, w.grad, rtol=1e-9, atol=1e-12)


@needs_cxx
@pytest.mark.filterwarnings("error:the compiled LM-head loss kernel:RuntimeWarning")
def test_compiled_kernel_in_bf16_matches_the_eager_kernel(compiled_kernel):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(96, 32, generator=g)
    weight = torch.randn(1000, 32, generator=g) * 0.1
    labels = torch.randint(0, 1000, (96,), generator=g)
    labels[:10] = -100
    compiled = _run("compiled", hidden, weight, labels, chunk=32, autocast=True)
    eager = _run("eager", hidden, weight, labels, chunk=32, autocast=True)
    assert compiled[0].item() == pytest.approx(eager[0].item(), rel=1e-5)
    # both round the same fp32 softmax gradient to bf16 before the matmuls
    torch.testing.assert_close(compiled[2], eager[2], rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(compiled[3], eager[3], rtol=2e-2, atol=1e-4)
    assert compiled[3].dtype == torch.float32


def _inputs():
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(20, 8, generator=g), torch.randn(30, 8, generator=g)
    return hidden, weight, torch.randint(0, 30, (20,), generator=g)


def _compile_raising(err: Exception):
    def broken_compile(*args, **kwargs):
        raise err

    return broken_compile


def test_compiled_kernel_falls_back_to_eager_on_a_compile_error(monkeypatch):
    """What torch 2.13 raises without a working C++ compiler: InductorError (a BackendCompilerFailed)."""
    inner = InvalidCxxCompiler()
    err = BackendCompilerFailed(lambda *a: None, inner, None)
    monkeypatch.setattr(fused_loss, "_COMPILED", fused_loss._CompiledKernel())
    monkeypatch.setattr(torch, "compile", _compile_raising(err))
    hidden, weight, labels = _inputs()
    with pytest.warns(
        RuntimeWarning, match=r"BackendCompilerFailed: .*No working C\+\+ compiler.*eager kernel"
    ):
        loss, count, gh, gw = _run("compiled", hidden, weight, labels, chunk=8)
    eager = _run("eager", hidden, weight, labels, chunk=8)
    assert fused_loss._COMPILED.failed
    assert loss.item() == eager[0].item() and torch.equal(gh, eager[2]) and torch.equal(gw, eager[3])


@pytest.mark.parametrize(
    "err",
    [
        RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: not enough memory"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("a and b must have same reduction dim, but got [4, 3] X [4, 3]."),
        # out of memory while inductor compiles is not a reason to run eager for the rest of the process
        BackendCompilerFailed(lambda *a: None, torch.OutOfMemoryError("out of memory"), None),
    ],
    ids=["cpu-oom", "oom", "shape", "oom-while-compiling"],
)
def test_other_errors_propagate_and_keep_the_compiler_on(monkeypatch, err):
    monkeypatch.setattr(fused_loss, "_COMPILED", fused_loss._CompiledKernel())
    monkeypatch.setattr(torch, "compile", _compile_raising(err))
    hidden, weight, labels = _inputs()
    with pytest.raises(type(err)):
        _run("compiled", hidden, weight, labels, chunk=8)
    assert not fused_loss._COMPILED.failed


def test_an_error_inside_the_compiled_function_propagates(monkeypatch):
    """Raised by the compiled callable itself (as when the kernel runs out of memory), not by compiling."""

    def compiled_fn_that_fails(*args):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(fused_loss, "_COMPILED", fused_loss._CompiledKernel())
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled_fn_that_fails)
    hidden, weight, labels = _inputs()
    with pytest.raises(torch.OutOfMemoryError):
        _run("compiled", hidden, weight, labels, chunk=8)
    assert not fused_loss._COMPILED.failed


def test_auto_kernel_compiles_only_large_chunks():
    assert fused_loss.use_compiled_kernel("auto", 512, 129280)
    assert not fused_loss.use_compiled_kernel("auto", 128, 32000)
    assert fused_loss.use_compiled_kernel("compiled", 1, 10)
    assert not fused_loss.use_compiled_kernel("eager", 4096, 129280)
    with pytest.raises(ValueError, match="loss kernel must be one of"):
        fused_loss.use_compiled_kernel("fast", 1, 1)


def test_inductor_cache_is_kept_apart_per_cpu_limit(tmp_path):
    """Kernels compiled under ATEN_CPU_CAPABILITY=avx2 gave wrong losses when an unlimited process found them
    in torch's shared cache; each limit gets its own cache folder, and a folder the user chose is kept."""
    import os
    import subprocess
    import sys

    code = (
        "import os, torch\n"
        "from moe_recipes.models.fused_loss import isolate_inductor_cache\n"
        "isolate_inductor_cache()\n"
        "print(os.environ['TORCHINDUCTOR_CACHE_DIR'])\n"
    )
    drop = ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
    base = {k: v for k, v in os.environ.items() if k not in drop}

    def folder(**env: str) -> str:
        run = subprocess.run(
            [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout.strip()

    from concurrent.futures import ThreadPoolExecutor

    cases = [
        {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
        {"ATEN_CPU_CAPABILITY": "default"},
        {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path)},
    ]
    with ThreadPoolExecutor(len(cases)) as pool:  # three interpreters that only import: at once
        avx2, unlimited, chosen = pool.map(lambda env: folder(**env), cases)
    assert avx2.endswith("isa-AVX2-AVX2") and avx2 != unlimited
    assert chosen == str(tmp_path)
