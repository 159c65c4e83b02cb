"""DeepSpeed's universal-checkpoint converter with weights-only loading (trainer/train/safeload.py):

    python -m trainer.train.to_universal --input_folder CKPT/TAG --output_folder OUT [ds_to_universal's flags]

The same arguments and output as `python -m deepspeed.checkpoint.ds_to_universal`, which unpickles every file it
reads without restriction; `convert_to_universal` (trainer/train/checkpoints.py) runs this instead.
"""
from __future__ import annotations

import multiprocessing

from trainer.train.safeload import weights_only_loads


def main() -> None:
    from deepspeed.checkpoint import ds_to_universal

    # its extraction workers read checkpoint files too: forked, they inherit the guard (spawned ones would not)
    multiprocessing.set_start_method("fork", force=True)
    args = ds_to_universal.parse_arguments()
    with weights_only_loads():
        ds_to_universal.main(args)


if __name__ == "__main__":
    main()
