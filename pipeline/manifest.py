"""manifest.json: the shard set's table of contents, written last, once every planned shard is complete.

Built only from OUT/.state/ (the plan and one record per shard, `pipeline.plan`), so a single job, a rerun and
`python -m pipeline.merge` after --part jobs all write the same file. Fields (docs/format.md, manifest.json):
format and code versions, the environment and config of the plan, the listing's notes, every shard with its
samples, bytes and sha256, the totals, and the skipped inputs (listing-time and per shard) sorted and counted by
reason.
"""
from __future__ import annotations

from pipeline.credentials import credentials_guard
from pipeline.plan import PLAN, code_version, complete, planned_names
from pipeline.schema import FORMAT_VERSION, MANIFEST
from pipeline.store import Store

__all__ = ["build_manifest", "write_manifest"]


def build_manifest(plan: dict, records: list[dict]) -> dict:
    """The manifest of a plan (as read from plan.json) and the records of all its shards, in index order."""
    skipped = sorted(plan["listing_skipped"] + [x for r in records for x in r["skipped"]],
                     key=lambda x: (x["input"], x["reason"]))
    by_reason: dict[str, int] = {}
    for x in skipped:
        by_reason[x["reason"]] = by_reason.get(x["reason"], 0) + 1
    return {
        "format_version": FORMAT_VERSION,
        "code_version": code_version(),
        "environment": plan["environment"],
        "config": plan["config"],
        "source_notes": plan["notes"],
        "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in records],
        "totals": {"shards": len(records), "samples": sum(r["samples"] for r in records),
                   "bytes": sum(r["bytes"] for r in records), "inputs": sum(r["inputs"] for r in records),
                   "skipped": len(skipped), "box_fallback": sum(r["box_fallback"] for r in records)},
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "skipped": skipped,
    }


def write_manifest(out: str) -> dict | None:
    """Combine the shard records in OUT/.state into OUT/manifest.json, if every planned shard is complete.
    Returns the manifest, or None (nothing written) while a shard is missing."""
    with credentials_guard(out):  # also what `python -m pipeline.merge` runs
        store = Store(out)
        if not store.exists(PLAN):
            raise SystemExit(f"error: {out} has no {PLAN}: not a shard set in progress (run pipeline.shard first)")
        plan = store.read_json(PLAN)
        records = []
        for name in planned_names(plan):
            record = complete(store, name)
            if record is None:
                return None
            records.append(record)
        manifest = build_manifest(plan, records)
        store.write_json(MANIFEST, manifest)
        return manifest
