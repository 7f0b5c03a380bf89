import pytest
import torch
import torch.nn.functional as F

from moe_recipes.models.fused_loss import fused_linear_cross_entropy


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
