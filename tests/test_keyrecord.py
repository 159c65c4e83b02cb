"""data.record_keys: each rank's per-step sample keys, readable after a kill cut a line (trainer/train/keyrecord.py)."""
from __future__ import annotations

from trainer.train.config import ExperimentConfig
from trainer.train.keyrecord import KeyRecord, read_key_records
from trainer.train.rundir import RunDir


def batch(worker, epoch, *keys):
    return {"pos": (worker, 0, len(keys)), "epoch": epoch, "keys": list(keys)}


def test_key_record_survives_a_cut_line_and_keeps_every_repeat(tmp_path):
    path = RunDir(tmp_path).keys(1)
    rec = KeyRecord(path)
    rec.add(batch(0, 0, "a", "b"))
    rec.add(batch(1, 0, "c", "d"))
    rec.write(1)
    rec.add(batch(0, 0, "e", "f"))
    rec.write(2)
    rec.close()
    with open(path, "ab") as f:  # a kill in the middle of step 3's line
        f.write(b'{"step": 3, "batches": [{"wor')
    rec = KeyRecord(path)  # the resumed run trains step 2 again, then 3
    rec.add(batch(0, 0, "e", "f"))
    rec.write(2)
    rec.add(batch(1, 1, "g", "h"))
    rec.write(3)
    rec.close()
    got = read_key_records(path)
    assert sorted(got) == [1, 2, 3]
    assert got[1] == [[{"worker": 0, "epoch": 0, "keys": ["a", "b"]}, {"worker": 1, "epoch": 0, "keys": ["c", "d"]}]]
    assert len(got[2]) == 2 and got[2][0] == got[2][1]
    assert got[3] == [[{"worker": 1, "epoch": 1, "keys": ["g", "h"]}]]
    assert read_key_records(tmp_path / "none.jsonl") == {}


def test_record_keys_is_off_by_default_and_set_from_the_config():
    assert ExperimentConfig.from_dict({}).data.record_keys is False
    assert ExperimentConfig.from_dict({"data": {"record_keys": True}}).data.record_keys is True
