"""Experiments built from the project's own commands (shard, pretrain, finetune, evaluate): `experiments.transfer`."""
