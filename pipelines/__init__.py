"""pofa pipelines layer."""
