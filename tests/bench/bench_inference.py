"""Inference benchmark (`make bench-inference`): what 90% unstructured sparsity and int8 buy on this CPU
at the model-card shapes, through the report stage's own code (`pipelines.inference.measure`).

A script, not a test. It builds a dense BERT of the chosen shape (random weights: speed and size do
not depend on what the weights learned), a 90%-sparse copy pruned by the project's magnitude masks
(the default prunable layers, as the student stage prunes), and that copy's int8 export (the QAT
exporter's per-row symmetric int8 weights, `pipelines.finetune.qat.export_int8`), saves them as the
training stages save their exports, and runs `inference_report`: ONNX export, a check against
PyTorch, then each model timed in alternating rounds with the dense one. Prints the report's table
(the one `report/README.md` gets) and writes `<out>/inference.json`.

Shapes: `base` (BERT-Base, 110M: the bert-base-uncased-sparse-* recipes), `large` (BERT-Large,
335M), `distilbert` (6 layers of BERT-Base: the DistilBERT recipes' encoder shape, in BERT's classes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import BertConfig, BertForPreTraining  # noqa: E402

from orchestrator.stages.inference_section import render_inference  # noqa: E402
from pipelines.finetune.qat import export_int8  # noqa: E402
from pipelines.inference.config import InferenceConfig  # noqa: E402
from pipelines.inference.measure import ModelEntry, inference_report  # noqa: E402
from pipelines.sparsity import PruningConfig, prunable_weights  # noqa: E402
from tests.pipelines.inference_models import export, pruned  # noqa: E402

SHAPES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "distilbert": dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="base")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--min-seconds", type=float, default=4.0, help="timed per batch size and model")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench-inference"))
    args = ap.parse_args()

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="pofa-bench-inference-"))
    config = BertConfig(vocab_size=30522, max_position_embeddings=512, **SHAPES[args.shape])
    torch.manual_seed(0)
    dense = BertForPreTraining(config).eval()
    teacher = export(dense, str(work / "dense"))
    sparse = pruned(dense, args.sparsity)  # the same weights, the smallest 90% of each prunable layer zeroed
    student = export(sparse, str(work / "sparse"))
    int8 = export_int8(student, list(prunable_weights(sparse, PruningConfig())))  # the layers QAT quantizes
    print(f"bench-inference: {args.shape} ({sum(p.numel() for p in dense.parameters()) / 1e6:.0f}M parameters), "
          f"{int8['quantized_layers']} layers int8; built in {time.time() - started:.0f} s", flush=True)
    del dense, sparse

    cfg = InferenceConfig(batch_sizes=[int(b) for b in args.batch_sizes.split(",")], seq_len=args.seq_len,
                          min_seconds=args.min_seconds)
    entries = [ModelEntry("dense", teacher), ModelEntry(f"sparse-{round(100 * args.sparsity)}", student, "dense"),
               ModelEntry(f"sparse-{round(100 * args.sparsity)}/int8", student, "dense", int8=True)]
    report = inference_report(entries, cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"inference-{args.shape}.json").write_text(json.dumps(report, indent=2))
    load = os.getloadavg()
    print("\n".join(render_inference(report)))
    print(f"{args.shape}: {time.time() - started:.0f} s in all; torch threads {report['torch_threads']}; load average "
          f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} cores; {out / f'inference-{args.shape}.json'}")
    return 0 if all(r["error"] is None for r in report["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
