"""The preprocess stage as a Ray Data job."""
