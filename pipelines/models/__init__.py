"""Model recipes and builders: BERT-style pretraining models from a name, a path or a small config."""
