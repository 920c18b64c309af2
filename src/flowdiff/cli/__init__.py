"""Entry points behind ``train.py`` and ``sample.py``: building the pieces from a Hydra config."""
