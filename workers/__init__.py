"""pofa workers layer."""
