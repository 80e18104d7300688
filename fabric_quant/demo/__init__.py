"""The offline models and data of the demo, the recipes and the tests: the MiniLM inside a PyPI package, sklearn's
digits and the CNN trained on them (``models.py``), Python's documentation topics as text and as a classification
task (``data.py``). Nothing here downloads."""
