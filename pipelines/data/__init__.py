"""Pretraining data: sources, cleaning, sentence pairs, masking, splits."""
