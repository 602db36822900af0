"""The compressed sparse encoding restores a real, magnitude-pruned BERT state dict bit for bit and
is smaller than its safetensors file."""
import os

import pytest
import torch
from safetensors.torch import load_file

from pipelines.inference.sparse_encoding import load_sparse, save_sparse
from tests.pipelines.inference_models import classifier, export, pretraining_model


def _assert_identical(restored: dict, state: dict) -> None:
    assert list(restored) == list(state)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype and restored[name].shape == tensor.shape, name
        assert torch.equal(restored[name], tensor), name
        # bit for bit, not merely equal in value (-0.0 == 0.0 in torch.equal)
        assert torch.equal(restored[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("build", [pretraining_model, classifier])
def test_pruned_bert_round_trips_exactly_and_is_smaller(tmp_path, build) -> None:
    folder = export(build(0, sparsity=0.9), str(tmp_path / "model"))
    state = load_file(os.path.join(folder, "model.safetensors"))
    encoder = [t for n, t in state.items() if ".encoder." in n and n.endswith("weight") and t.dim() == 2]
    assert encoder and all(abs(float((t == 0).float().mean()) - 0.9) < 0.01 for t in encoder)  # really pruned
    size = save_sparse(state, str(tmp_path / "model.pofasz"))
    _assert_identical(load_sparse(str(tmp_path / "model.pofasz")), state)
    dense_size = save_sparse(load_file(os.path.join(str(export(build(0), str(tmp_path / "dense"))), "model.safetensors")),
                             str(tmp_path / "dense.pofasz"))
    assert size < 0.8 * os.path.getsize(os.path.join(folder, "model.safetensors"))
    assert size < 0.8 * dense_size  # the savings come from the zeros, not from zlib alone


def test_every_dtype_negative_zero_and_nan_come_back(tmp_path) -> None:
    w = pretraining_model(1, sparsity=0.9).bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    w[0, :4] = torch.tensor([-0.0, float("nan"), float("-inf"), 1e-30])
    state = {"fp32": w, "bf16": w.to(torch.bfloat16), "fp16": w.to(torch.float16), "int8": (w * 100).to(torch.int8),
             "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 5), "mask": w != 0, "fp64": w.double()}
    save_sparse(state, str(tmp_path / "x.pofasz"))
    restored = load_sparse(str(tmp_path / "x.pofasz"))
    for name, t in state.items():
        assert restored[name].dtype == t.dtype and restored[name].shape == t.shape, name
        assert torch.equal(restored[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_a_damaged_file_is_refused(tmp_path) -> None:
    path = tmp_path / "x.pofasz"
    save_sparse({"w": torch.ones(3)}, str(path))
    data = path.read_bytes()
    path.write_bytes(b"NOTPOFA!" + data[8:])
    with pytest.raises(ValueError, match="bad magic"):
        load_sparse(str(path))
