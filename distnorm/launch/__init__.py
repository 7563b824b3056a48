"""Launching distnorm jobs: one package for every way a rank is started.

* :mod:`distnorm.launch.env` — a process's place in the job from its launcher's
  variables (torchrun's, or Slurm's through
  :class:`~distnorm.launch.env.SlurmEnvironment`), and
  :func:`~distnorm.launch.env.init_from_env`, the one function that starts
  ``torch.distributed`` under torchrun, in a Slurm task or in a plain process
  whose variables are set;
* :mod:`distnorm.launch.local` — ranks on this machine:
  :func:`~distnorm.launch.local.spawn` (a function on W gloo ranks, results by rank,
  every exit code checked) and :func:`~distnorm.launch.local.run_local` (a script as
  N processes, like ``torchrun --standalone``);
* :mod:`distnorm.launch.hostlist` — Slurm host lists and task counts, expanded;
* :mod:`distnorm.launch.submit` — submitting to Slurm with submitit
  (``pip install 'distnorm[slurm]'``);
* :mod:`distnorm.launch.cluster_bench` — the per-layer benchmark on N nodes;
* :mod:`distnorm.launch.slurm` — the ``distnorm slurm`` command, and the former
  home of the Slurm names (all re-exported there).

Nothing is imported here: ``python -m distnorm.launch.slurm`` runs the module as a
script, and the optional ``submitit`` dependency is only imported when a job is
submitted.
"""

__all__ = ["cluster_bench", "env", "hostlist", "local", "slurm",
           "submit"]
