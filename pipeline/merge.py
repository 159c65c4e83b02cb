"""Write the combined manifest of a shard set made by several `--part I/P` jobs.

    python -m pipeline.merge OUT

Every part records each finished shard in OUT/.state/; this reads those records and writes OUT/manifest.json,
the same file a single job would have written. Exit status 1 (and nothing written) if a shard is still missing."""
from __future__ import annotations

import argparse
import sys

from pipeline.manifest import write_manifest
from pipeline.plan import PLAN, complete, planned_names
from pipeline.store import Store


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.merge", description=__doc__)
    p.add_argument("out", help="shard set: folder or fsspec URL")
    a = p.parse_args(argv)
    manifest = write_manifest(a.out)
    if manifest is None:
        store = Store(a.out)
        plan = store.read_json(PLAN)
        missing = [name for name in planned_names(plan) if complete(store, name) is None]
        print(f"error: {len(missing)} of {plan['shards']} shards are not complete yet (e.g. {missing[:3]}); "
              f"run the missing --part jobs again, then merge", file=sys.stderr)
        sys.exit(1)
    t = manifest["totals"]
    print(f"{a.out}/manifest.json: {t['shards']} shards, {t['samples']} samples, {t['skipped']} skipped")


if __name__ == "__main__":
    main()
