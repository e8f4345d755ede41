"""Launchers: turn one experiment config (and its `get_sweep()`) into jobs.

- `launch.sweep`: sweep expansion, point names and workdirs, trainer command lines.
- `launch.local`: subprocesses on this machine, one per free GPU or N at a time on CPU.
- `launch.slurm`: sbatch scripts (job arrays for sweeps, multi-node via srun).
- `launch.tpu_vm`: `gcloud compute tpus tpu-vm` commands for TPU VMs and pod slices.
- `launch.report`: Markdown/CSV tables and PNG plots from the runs' results.json.

Each is run as a module, e.g. `python -m launch.local --config=configs/x.py --sweep
--workdir=runs`; see the README's "Launching" section.
"""
