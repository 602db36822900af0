"""8-bit QAT: fake-quantized Linear layers stay close to fp32, keep zeros, pass gradients; the int8
export round-trips within one quantization step and keeps the pruned pattern."""
import torch
from torch import nn

from pipelines.finetune.qat import QMAX, enable_qat, export_int8, load_int8, weight_scales


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(16, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # noqa: ANN001
        return self.head(torch.relu(self.enc(x)))


def _sparse_model() -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        mask = torch.rand_like(model.enc.weight) > 0.8  # ~80% zeros
        model.enc.weight.mul_(mask)
        model.enc.weight[3].zero_()  # an all-zero row must not divide by zero
    return model


def test_fake_quant_is_close_keeps_zeros_and_passes_gradients() -> None:
    model = _sparse_model()
    x = torch.randn(4, 16)
    reference = model(x).detach()
    assert enable_qat(model, ["enc.weight"]) == ["enc.weight"]
    out = model(x)
    assert not torch.equal(out, reference)  # quantization is really applied...
    assert torch.allclose(out, reference, atol=0.05)  # ...and int8 keeps it close
    out.sum().backward()
    grad = model.enc.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # straight-through: gradients reach the weights
    assert "forward" in vars(model.enc) and "forward" not in vars(model.head)  # the head stays fp32


def test_int8_export_round_trips_and_keeps_the_pattern(tmp_path) -> None:
    from safetensors.torch import save_file

    model = _sparse_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    report = export_int8(str(tmp_path), ["enc.weight"])
    w = model.enc.weight.detach()
    back = load_int8(str(tmp_path))
    step = weight_scales(w)
    assert torch.all((back["enc.weight"] - w).abs() <= step / 2 + 1e-7)  # within half a quantization step
    assert torch.equal(back["enc.weight"] == 0, w == 0)
    assert torch.equal(back["head.weight"], model.head.weight.detach())  # not quantized
    assert report["pattern_zeros"] == report["pattern_zeros_kept"] == int((w == 0).sum())
    assert report["int8_bytes"] < report["fp32_bytes"]
    assert report["quantized_weight_sparsity"] >= float((w == 0).float().mean())
    assert QMAX == 127
