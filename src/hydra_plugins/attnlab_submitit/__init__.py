"""attnlab's Hydra launchers (``hydra/launcher=slurm``, ``hydra/launcher=submitit``).

Hydra instantiates launchers only from classes defined in the ``hydra_plugins`` namespace package;
the code lives in :mod:`attnlab.launchers`.
"""

from hydra_plugins.hydra_submitit_launcher import submitit_launcher as _upstream

from attnlab import launchers as _impl


class SlurmLauncher(_impl.FinishingLauncher, _upstream.SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher whose sweeps finish when SLURM cancels, kills or
    fails a job (see :mod:`attnlab.launchers`)."""


class LocalLauncher(_impl.FinishingLauncher, _upstream.LocalLauncher):
    """hydra-submitit-launcher's local launcher whose sweeps finish when a job is killed."""
