"""An exported Hugging Face folder as an ONNX graph for CPU inference, checked against PyTorch.

Pretraining exports (MLM + NSP heads) are measured as their encoder (`AutoModel`: what a downstream
task keeps; the vocabulary-sized MLM head is dropped at fine-tuning), fine-tuned exports as the task
model their config names. The graph has a dynamic batch and a fixed sequence length. Models of one
architecture share one graph: the first is exported with `torch.onnx.export` (the torch.export-based
exporter; it needs `onnx` and `onnxscript`), the others get their weights swapped into it by name,
and every graph is run once in ONNX Runtime against PyTorch before it is timed.
"""
from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from pipelines.models.heads import _forward_params

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_PRETRAINING = ("ForPreTraining", "ForMaskedLM")
_NOT_GRAPH = ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "id2label",
              "label2id", "problem_type")


class ConversionError(RuntimeError):
    """The model could not be turned into a graph the runtime runs, or the graph computes other values."""


class InferenceModel(nn.Module):
    """`model(**inputs)[0]` with positional inputs: the last hidden state of an encoder, or a task's logits."""

    def __init__(self, model: nn.Module, graph: str) -> None:
        super().__init__()
        self.model = model.eval()
        self.graph = graph  # what is measured: "encoder", or the task model's class name
        self.input_names = tuple(n for n in INPUTS if n in _forward_params(type(model)))
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.model(**{n: given[n] for n in self.input_names})[0]

    def own_name(self, key: str) -> Optional[str]:
        """An export's weight name as this model calls it: an encoder timed from a pretraining export drops
        the base model prefix (`bert.`), and has no heads (None)."""
        prefix = self.model.base_model_prefix + "."
        if self.graph != "encoder" or not key.startswith((prefix, "cls.")):
            return key
        return key[len(prefix):] if key.startswith(prefix) else None

    def example_inputs(self, batch: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        vocab = int(getattr(self.model.config, "vocab_size", 2) or 2)
        parts = {"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=gen),
                 "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
                 "token_type_ids": torch.zeros(batch, seq_len, dtype=torch.long)}
        return tuple(parts[n] for n in self.input_names)


def load_for_inference(folder: str, state: Optional[dict[str, torch.Tensor]] = None) -> InferenceModel:
    """The model of a Hugging Face folder, ready to export; `state` replaces its weights (an int8
    export's dequantized values)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    arch = (config.architectures or [""])[0]
    quiet = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # the dropped pretraining heads are expected, not news
    transformers.utils.logging.disable_progress_bar()
    try:
        if not arch or arch.endswith(_PRETRAINING):
            model, graph = transformers.AutoModel.from_pretrained(folder), "encoder"
        else:
            cls = getattr(transformers, arch, None)
            if cls is None:
                raise ConversionError(f"{folder}: unknown architecture {arch!r} in config.json")
            model, graph = cls.from_pretrained(folder), arch
    finally:
        transformers.logging.set_verbosity(quiet)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    timed = InferenceModel(model, graph)
    if state is not None:
        # a pretraining export's heads are not part of the timed encoder (own_name: None)
        own = {n: v for k, v in state.items() if (n := timed.own_name(k)) is not None}
        missing, unexpected = model.load_state_dict(own, strict=False)
        tied = {k for k in missing if k.endswith("decoder.weight") or k.endswith("decoder.bias")}
        if set(missing) - tied or unexpected:
            raise ConversionError(f"{folder}: the int8 weights do not fit the model (missing {sorted(missing)[:3]}, "
                                  f"unexpected {sorted(unexpected)[:3]})")
    return timed


@dataclass
class Graph:
    path: str  # the .onnx file (weights beside it in <path>.data)
    how: str  # "exported" or "weights swapped into the <name> graph"
    max_abs_diff: Optional[float]  # ONNX Runtime vs PyTorch on one random batch of 2


def _template_key(model: InferenceModel, seq_len: int) -> str:
    config = {k: v for k, v in model.model.config.to_dict().items() if k not in _NOT_GRAPH}
    shapes = [(n, list(t.shape), str(t.dtype)) for n, t in model.state_dict().items()]
    return json.dumps([type(model.model).__name__, model.input_names, seq_len, config, shapes], sort_keys=True,
                      default=str)


def _torch_export(model: InferenceModel, seq_len: int) -> Any:
    """The ONNX ModelProto of `model`, batch dimension dynamic."""
    for name in ("torch.onnx", "torch.export", "onnxscript"):  # a line per pass, for every model
        logging.getLogger(name).setLevel(logging.ERROR)
    inputs = model.example_inputs(2, seq_len)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with warnings.catch_warnings():  # the exporter's deprecation and naming notes are not the user's concern
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, inputs, None, input_names=list(model.input_names),
                                        output_names=["output"],
                                        dynamic_shapes={n: {0: batch} for n in model.input_names}, dynamo=True,
                                        verbose=False, optimize=False)  # keep weight names: graphs are shared
    except ImportError:  # onnx / onnxscript missing: the runtime check names it, not "cannot convert"
        raise
    except Exception as exc:  # torch.export and the ONNX translation raise many kinds
        raise ConversionError(f"torch.onnx.export failed: {summary(exc)}") from None
    if program is None:
        raise ConversionError("torch.onnx.export returned no program")
    return program.model_proto


def _swap_weights(template: Any, model: InferenceModel) -> Optional[Any]:
    """A copy of `template` holding `model`'s weights; None when a graph initializer has no tensor
    of the same name and shape in the model (the exporter folded or renamed it)."""
    import onnx
    from onnx import numpy_helper

    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    proto = onnx.ModelProto()
    proto.CopyFrom(template)
    for init in proto.graph.initializer:
        t = tensors.get(init.name)
        if t is None or list(t.shape) != list(init.dims):
            return None
        init.CopyFrom(numpy_helper.from_array(t.detach().cpu().numpy(), init.name))
    return proto


def _save(proto: Any, path: str) -> None:
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # saving with external data rewrites the proto it is given
    onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data", size_threshold=1024)


def session(path: str, threads: Optional[int] = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def max_abs_diff(path: str, model: InferenceModel, seq_len: int) -> float:
    inputs = model.example_inputs(2, seq_len, seed=1)
    with torch.no_grad():
        ref = model(*inputs).float().numpy()
    out = session(path).run(None, {n: t.numpy() for n, t in zip(model.input_names, inputs)})[0]
    if out.shape != ref.shape:
        raise ConversionError(f"the graph's output has shape {list(out.shape)}, PyTorch's {list(ref.shape)}")
    return float(np.abs(out.astype(np.float32) - ref).max())


def _tolerance(model: InferenceModel, seq_len: int) -> float:
    with torch.no_grad():
        ref = model(*model.example_inputs(2, seq_len, seed=1))
    return 1e-3 * max(1.0, float(ref.abs().max()))


def to_onnx(model: InferenceModel, seq_len: int, path: str, templates: dict[str, tuple[str, Any]],
            name: str = "") -> Graph:
    """`model` as `path`, verified against PyTorch; `templates` caches one graph per architecture
    across calls. ConversionError when it cannot be converted or computes other values."""
    key = _template_key(model, seq_len)
    tol = _tolerance(model, seq_len)
    if key in templates:
        owner, template = templates[key]
        proto = _swap_weights(template, model)
        if proto is not None:
            _save(proto, path)
            diff = max_abs_diff(path, model, seq_len)
            if diff <= tol:
                return Graph(path, f"weights swapped into the {owner} graph", diff)
    proto = _torch_export(model, seq_len)
    _save(proto, path)
    diff = max_abs_diff(path, model, seq_len)
    if not diff <= tol:  # also NaN
        raise ConversionError(f"ONNX Runtime's output differs from PyTorch's by {diff:.3g} (tolerance {tol:.3g})")
    templates.setdefault(key, (name or "first", proto))
    return Graph(path, "exported", diff)


def quantize_int8(fp32_path: str, out_path: str, weight_names: list[str]) -> str:
    """ONNX Runtime dynamic int8 quantization (weights per output channel, activations per tensor at
    run time: the QAT export's scheme) of the matrix products that read one of `weight_names`."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(fp32_path)
    graph = proto.graph
    wanted = {f"model.{n}" for n in weight_names}
    inits = {i.name: i for i in graph.initializer}
    # the exporter writes x @ W.T as MatMul(x, Transpose(W)); the quantizer wants the weight itself
    # as the MatMul's initializer, so fold those transposes into [in, out] initializers first
    renamed: dict[str, str] = {}
    for node in list(graph.node):
        if node.op_type == "Transpose" and node.input[0] in wanted and node.input[0] in inits:
            w = numpy_helper.to_array(inits[node.input[0]])
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), node.input[0] + ".T"))
            renamed[node.output[0]] = node.input[0] + ".T"
            graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    reads = wanted | set(renamed.values())
    nodes = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and reads & set(n.input)]
    if not nodes:
        raise ConversionError("no MatMul/Gemm node reads an int8 weight of the QAT export")
    folded = out_path + ".fp32.onnx"
    _save(proto, folded)
    quantize_dynamic(folded, out_path, weight_type=QuantType.QInt8, per_channel=True, nodes_to_quantize=nodes,
                     use_external_data_format=True)
    return out_path


def summary(exc: BaseException) -> str:
    """One line for a report row: the root cause the exporter's long message names, ANSI colours removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    found = re.search(r"<class '([^']+)'>: (.+)", text)
    if found:
        return f"{found.group(1).rsplit('.', 1)[-1]}: {found.group(2)}"[:400]
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:400]
