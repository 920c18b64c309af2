"""The entry points behind ``train.py`` and ``sample.py`` (the work they start lives in :mod:`flowdiff.runs` and
:mod:`flowdiff.evaluation`), and the Hydra callback that checks the run directory."""
