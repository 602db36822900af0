"""Model cards for a run's exports: a Hugging Face `README.md` (YAML metadata with `model-index`
results, then the card's text) written from the run's typed records, never from scraped text.

`records` reads what a run holds, `exports` names its exported models, `metadata` and `body` build
the two halves of a card, `write` puts cards into export folders, `mlflow_license` tells MLflow the
card's license. The report stage and `pofa export` are the callers."""
