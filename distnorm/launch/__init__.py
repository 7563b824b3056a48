"""Launching distnorm jobs on clusters.

* :mod:`distnorm.launch.slurm` — submit a callable, a module or a script to Slurm
  through submitit (``pip install 'distnorm[slurm]'``), map ``SLURM_*`` to the
  variables of ``torch.distributed`` (:class:`~distnorm.launch.slurm.SlurmEnvironment`)
  and initialize the process group inside the job; the ``distnorm slurm`` command.

Nothing is imported here: ``python -m distnorm.launch.slurm`` runs the module as a
script, and the optional ``submitit`` dependency is only imported when a job is
submitted.
"""

__all__ = ["slurm"]
