"""Downloads without the network: file:// URLs, a monkeypatched opener, archives made here."""
from __future__ import annotations

import io
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from pipeline.data import build_dataset
from pipeline.data import download as dl

XML = ("<annotation><size><width>10</width><height>8</height></size><object><name>dog</name>"
       "<difficult>0</difficult><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>9</xmax><ymax>8</ymax></bndbox>"
       "</object></annotation>")


def _tar(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            t.addfile(info)
    return path


def _offline(monkeypatch):
    def refuse(url, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_download_file_url_then_skip(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * (3 * dl.CHUNK + 5))
    dest = tmp_path / "dl" / "a.bin"
    assert dl.download_file(src.as_uri(), dest, progress=False) == dest
    assert dest.read_bytes() == src.read_bytes() and not dest.with_name("a.bin.part").exists()
    src.write_bytes(b"changed")
    dl.download_file(src.as_uri(), dest, progress=False)  # final file exists: not fetched again
    assert len(dest.read_bytes()) == 3 * dl.CHUNK + 5


def test_offline_message(tmp_path, monkeypatch):
    _offline(monkeypatch)
    dest = tmp_path / "VOCtrainval_06-Nov-2007.tar"
    with pytest.raises(dl.DownloadError) as e:
        dl.download_file("http://host.robots.ox.ac.uk/x.tar", dest, progress=False)
    assert str(e.value) == (f"could not reach http://host.robots.ox.ac.uk/x.tar: [Errno -3] Temporary failure in "
                            f"name resolution. Download it yourself and place it at {dest}, then rerun.")
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()


def test_connection_lost_midway_leaves_nothing(tmp_path, monkeypatch):
    class Dropping(io.BytesIO):
        headers = {"Content-Length": "100"}

        def read(self, n=-1):
            if self.tell() >= 10:
                raise ConnectionResetError("connection reset by peer")
            return super().read(10)

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Dropping(b"y" * 100))
    dest = tmp_path / "train2014.zip"
    with pytest.raises(dl.DownloadError, match=r"could not reach http://x/train2014\.zip: connection reset"):
        dl.download_file("http://x/train2014.zip", dest, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the final file nor a stale .part


def test_cli_offline_exits_nonzero(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    assert dl.main(["voc07", "--root", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "could not reach http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar" in err
    assert str(tmp_path / "downloads" / "VOCtrainval_06-Nov-2007.tar") in err and "then rerun" in err


def test_safe_extract_refuses_escapes(tmp_path):
    root = tmp_path / "root"
    ok = _tar(tmp_path / "ok.tar", {"VOCdevkit/a.txt": b"a", "./b/c.txt": b"c"})
    dl.safe_extract(ok, root)
    assert (root / "VOCdevkit/a.txt").read_bytes() == b"a" and (root / "b/c.txt").read_bytes() == b"c"
    for name, tar in [("dotdot", _tar(tmp_path / "e1.tar", {"../evil.txt": b"!"})),
                      ("abs", _tar(tmp_path / "e2.tar", {str(tmp_path / "evil2.txt"): b"!"})),
                      ("link", _tar(tmp_path / "e3.tar", {}, links={"l": "../../etc"}))]:
        with pytest.raises(dl.DownloadError, match="escapes"):
            dl.safe_extract(tar, root)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "evil2.txt").exists()
    assert not (root / "l").exists()
    z = tmp_path / "e.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("../zevil.txt", "!")
    with pytest.raises(dl.DownloadError, match="escapes"):
        dl.safe_extract(z, root)
    assert not (tmp_path / "zevil.txt").exists()
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all")
    with pytest.raises(dl.DownloadError, match=r"cannot unpack .*broken\.tar.*delete it"):
        dl.safe_extract(tmp_path / "broken.tar", root)


def test_download_dataset_end_to_end_and_idempotent(tmp_path, monkeypatch):
    srv = tmp_path / "server"
    srv.mkdir()
    base = "VOCdevkit/VOC2007/"
    _tar(srv / "trainval.tar", {base + "ImageSets/Main/trainval.txt": b"000007\n",
                                base + "Annotations/000007.xml": XML.encode()})
    with zipfile.ZipFile(srv / "ann.zip", "w") as z:
        z.writestr("annotations/readme.txt", "hi")
    (srv / "list.txt").write_text("train2014/COCO_train2014_000000000009.jpg\n")
    monkeypatch.setitem(dl.SOURCES, "voc07", [((srv / "trainval.tar").as_uri(), "VOCtrainval.tar", True),
                                              ((srv / "ann.zip").as_uri(), "ann.zip", True),
                                              ((srv / "list.txt").as_uri(), "coco20k_filenames.txt", False)])
    root = tmp_path / "data"
    dl.download_dataset("voc07", str(root), progress=False)
    ds = build_dataset("voc07", str(root))
    assert [r.image_id for r in ds.records] == ["000007"] and ds.records[0].boxes.tolist() == [[1, 2, 9, 8]]
    assert (root / "annotations/readme.txt").read_text() == "hi"
    assert (root / "coco20k_filenames.txt").read_text().startswith("train2014/")
    # second run: offline, nothing fetched or unpacked again, still succeeds
    _offline(monkeypatch)
    (root / "annotations/readme.txt").write_text("edited")
    dl.download_dataset("voc07", str(root), progress=False)
    assert (root / "annotations/readme.txt").read_text() == "edited"
    with pytest.raises(ValueError, match="unknown dataset 'voc99'"):
        dl.download_dataset("voc99", str(root))


def test_official_sources():
    urls = [u for entries in dl.SOURCES.values() for u, _, _ in entries]
    assert "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtest_06-Nov-2007.tar" in urls
    assert "http://images.cocodataset.org/annotations/annotations_trainval2014.zip" in urls
    assert dl.COCO20K_LIST in urls and dl.COCO20K_LIST.endswith("valeoai/LOST/master/datasets/coco_20k_filenames.txt")
