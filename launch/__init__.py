"""Launch: how a run reaches machines (deepspeed launcher, Slurm, Ray)."""
