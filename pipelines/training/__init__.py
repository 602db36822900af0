"""Training hyperparameters and the learning-rate schedule (pure functions, no cluster code)."""
