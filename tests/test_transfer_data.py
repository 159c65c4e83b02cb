"""experiments.transfer's data stage: the real-face tars are unpacked inside the destination only."""
from __future__ import annotations

import io
import tarfile

from experiments.transfer.study import _base_name, _below_top, _extract


def add(tar: tarfile.TarFile, name: str, data: bytes = b"jpeg", kind=tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_members_that_would_leave_the_destination_are_skipped_and_counted(tmp_path, capsys):
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    outside = tmp_path / "abs" / "planted.jpg"
    path = work / "faces.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "lfw/Aaron/Aaron_0001.jpg", b"good")
        add(tar, "lfw/../../../escaped.jpg")       # -> ../../../escaped.jpg
        add(tar, f"lfw/{outside}")                 # -> /ABS/planted.jpg (an absolute path)
        add(tar, "lfw/Bob//empty-part.jpg")
        add(tar, "lfw/./Carl/dot.jpg")
        add(tar, "no-folder.jpg")                  # nothing below the top folder
        add(tar, "lfw/Dan/link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")  # not a regular file
    dest = work / "lfw"
    _extract(path, dest, None, _below_top)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == ["Aaron/Aaron_0001.jpg"]
    assert (dest / "Aaron" / "Aaron_0001.jpg").read_bytes() == b"good"
    assert not outside.exists() and not list(tmp_path.rglob("escaped.jpg"))
    assert f"skipped 5 member(s) whose names would leave {dest}" in capsys.readouterr().out

    with tarfile.open(path, "w") as tar:  # CelebA keeps base names only: a traversal collapses to its last part
        add(tar, "celeba/img/000001.jpg", b"one")
        add(tar, "celeba/../../000002.jpg", b"two")
    _extract(path, work / "celeba", None, _base_name)
    assert sorted(p.name for p in (work / "celeba").iterdir()) == ["000001.jpg", "000002.jpg"]
