"""Teacher and student training on Ray Train (TorchTrainer, V2) with a DeepSpeed engine per worker."""
