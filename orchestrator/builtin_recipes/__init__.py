"""Built-in recipes (YAML), one per model-card row plus the offline `tiny` demo."""
