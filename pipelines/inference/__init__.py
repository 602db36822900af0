"""The inference report of a run's exports: CPU speed in ONNX Runtime, safetensors and compressed
sparse sizes, and the CPU kernels that explain the numbers. Pure torch / numpy / onnxruntime: no Ray,
DeepSpeed or MLflow here (the report stage in `orchestrator/stages/` wires it in)."""
