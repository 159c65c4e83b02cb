"""Training runs: `config` (the experiment dataclasses; imports no torch), `loop` (the DeepSpeed loop), `ema`,
`checkpoints` (resume plans, completeness, universal conversion), `dryrun` (the plan printed by --dry-run),
`rundir` (where everything of a run lives), `cli` (the flags the training commands share), `launch` (starting a
training command under the DeepSpeed launcher) and `distributed` (process groups, DeepSpeed's CPU comm op)."""
