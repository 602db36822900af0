"""Recipes: the typed schema, loading, overrides and the built-in recipes."""
