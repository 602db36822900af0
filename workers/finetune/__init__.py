"""Downstream fine-tuning on Ray Train + DeepSpeed: task data preparation on the driver, one
pattern-locked (optionally distilled) training run per task, role and seed."""
