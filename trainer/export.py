"""Export a training run's EMA weights as safetensors with a model card and a checksum, and publish them to a
bucket (or any fsspec URL) so that readers never trust a half-uploaded model:

    python -m trainer.export RUN_DIR --out exports/vggface2-S/model.safetensors [--dtype fp16|fp32] [--tag TAG] \
        [--publish s3://bucket/models/vggface2-S] [--force]

What it reads and writes, the published layout and the upload order (trainer/weights/publish.py's docstring)
follow in --help.
"""
from __future__ import annotations

import argparse

from pipeline.credentials import credentials_guard
from trainer.core.settings import EXPORT_DTYPES


def main(argv=None) -> None:
    from trainer.weights import publish as library

    details = library.__doc__.split("\n\n", 1)[1]  # the metadata, the published layout, the upload order
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=f"{__doc__}\n{details}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="training run dir, its checkpoints/ folder or a tag folder")
    p.add_argument("--out", required=True, help="weights file NAME.safetensors (README.md, NAME.safetensors.sha256 "
                                                "are written beside it)")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default="fp32", help="stored precision of the weights")
    p.add_argument("--tag", help="checkpoint tag (default: the latest)")
    p.add_argument("--publish", metavar="URL", help="upload to this folder or fsspec URL prefix (s3://bucket/NAME)")
    p.add_argument("--force", action="store_true", help="with --publish: upload even if URL holds the same content")
    args = p.parse_args(argv)

    log = lambda *a: print(*a, flush=True)  # noqa: E731
    library.export(args.ckpt_dir, args.out, args.dtype, args.tag, args.publish, log=log)
    if args.publish:
        with credentials_guard(args.publish):  # refused credentials: the bucket and what to set, no traceback
            library.publish(args.out, args.publish, args.force, log=log)


if __name__ == "__main__":
    main()
