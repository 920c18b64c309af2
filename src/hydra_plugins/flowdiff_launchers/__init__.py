"""flowdiff's Hydra launchers (``conf/hydra/launcher``), in the ``hydra_plugins`` namespace Hydra searches."""

from __future__ import annotations

from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher


class DevicePerJobLauncher(JoblibLauncher):
    """Joblib's launcher whose jobs each claim one GPU of their own (:func:`flowdiff.runs.pinned_device`)."""

    device_per_job = True
