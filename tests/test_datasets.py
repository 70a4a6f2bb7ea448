"""trainers/datasets.py against a real HTTP server on 127.0.0.1 that serves tiny archives built here."""

from __future__ import annotations

import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainers import datasets
from trainers.data import load_pairs


def png_bytes(rng, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # stored: member bytes appear verbatim
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def div2k_archives(rng) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(archive name -> bytes, HR member name -> PNG bytes) in DIV2K's official layout; 8x8 LR."""
    archives, hr_pngs = {}, {}
    for split, ids in (("train", ("0001", "0002")), ("valid", ("0801",))):
        hr = {f"DIV2K_{split}_HR/{i}.png": png_bytes(rng, 32) for i in ids}
        lr = {f"DIV2K_{split}_LR_bicubic/X4/{i}x4.png": png_bytes(rng, 8) for i in ids}
        archives[f"DIV2K_{split}_HR.zip"] = make_zip(hr)
        archives[f"DIV2K_{split}_LR_bicubic_X4.zip"] = make_zip(lr)
        hr_pngs.update(hr)
    return archives, hr_pngs


def flickr2k_archive(rng) -> bytes:
    members = {}
    for i in ("000001", "000002"):
        members[f"Flickr2K/Flickr2K_HR/{i}.png"] = png_bytes(rng, 32)
        members[f"Flickr2K/Flickr2K_LR_bicubic/X4/{i}x4.png"] = png_bytes(rng, 8)
        members[f"Flickr2K/Flickr2K_LR_bicubic/X2/{i}x2.png"] = png_bytes(rng, 16)  # not extracted
    return make_tar(members)


class RangeServer:
    """Serves ``files`` with Range support; ``drop_after[name] = K`` drops the next answer after K bytes."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []  # (name, Range header)
        self.drop_after: dict[str, int] = {}
        self.ignore_range = False
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name, rng = self.path.lstrip("/"), self.headers.get("Range")
                state.requests.append((name, rng))
                data = state.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not state.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                drop = state.drop_after.pop(name, None)
                self.wfile.write(data[start:] if drop is None else data[start : start + drop])
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def names(self) -> list[str]:
        return [name for name, _ in self.requests]


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(datasets, "RETRY_BACKOFF_S", 0.01)
    rng = np.random.default_rng(0)
    archives, hr_pngs = div2k_archives(rng)
    archives["Flickr2K.tar"] = flickr2k_archive(rng)
    srv = RangeServer(archives)
    srv.hr_pngs = hr_pngs
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def run_cli(server, root: Path, name: str = "div2k", *extra: str) -> int:
    return datasets.main(["fetch", name, "--root", str(root), "--base-url", server.url, *extra])


def test_fetch_div2k_loaders_read_it(server, tmp_path, capsys):
    root = tmp_path / "data"
    assert run_cli(server, root) == 0
    out = capsys.readouterr().out
    train, val = load_pairs(root / "DIV2K_train"), load_pairs(root / "DIV2K_valid")
    assert [p.name for p in train] == ["0001", "0002"] and [p.name for p in val] == ["0801"]
    assert train[0].hr.shape == (32, 32, 3) and train[0].lr.shape == (8, 8, 3)
    expected_hr = np.asarray(Image.open(io.BytesIO(server.hr_pngs["DIV2K_train_HR/0001.png"])))
    np.testing.assert_array_equal(train[0].hr, expected_hr)
    for name, data in server.files.items():
        if name.endswith(".zip"):
            assert (root / "downloads" / name).read_bytes() == data
    assert out.count("verified: size + CRC of every member; no pinned sha256") == 4
    assert f"--train-data {root / 'DIV2K_train'} --val-data {root / 'DIV2K_valid'}" in out
    assert f"train_data: [{root / 'DIV2K_train'}]" in out


def test_fetch_flickr2k_extracts_hr_and_x4_only(server, tmp_path, capsys):
    root = tmp_path / "data"
    assert run_cli(server, root, "flickr2k", "--delete-archives") == 0
    out = capsys.readouterr().out
    pairs = load_pairs(root / "Flickr2K")
    assert [p.name for p in pairs] == ["000001", "000002"] and pairs[1].lr.shape == (8, 8, 3)
    assert not (root / "Flickr2K" / "Flickr2K_LR_bicubic" / "X2").exists()
    assert not (root / "downloads" / "Flickr2K.tar").exists()
    assert "tar has no checksums" in out and f"--train-data {root / 'Flickr2K'}" in out
    assert "--val-data" not in out


def test_dropped_connection_resumes_with_range(server, tmp_path):
    name = "DIV2K_train_HR.zip"
    cut = len(server.files[name]) // 2
    server.drop_after[name] = cut
    datasets.fetch("div2k", tmp_path, server.url, progress=False)
    assert [r for n, r in server.requests if n == name] == [None, f"bytes={cut}-"]
    assert (tmp_path / "downloads" / name).read_bytes() == server.files[name]
    assert len(load_pairs(tmp_path / "DIV2K_train")) == 2


def test_server_ignoring_range_is_started_over(server, tmp_path):
    name = "DIV2K_valid_HR.zip"
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / f"{name}.part").write_bytes(b"\xff" * 100)  # not the file's first bytes
    server.ignore_range = True
    datasets.fetch("div2k", tmp_path, server.url, progress=False)
    assert (name, "bytes=100-") in server.requests
    assert (tmp_path / "downloads" / name).read_bytes() == server.files[name]


def test_416_for_a_whole_part_finishes_it(server, tmp_path):
    name = "DIV2K_valid_HR.zip"
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / f"{name}.part").write_bytes(server.files[name])
    datasets.fetch("div2k", tmp_path, server.url, progress=False)
    assert [r for n, r in server.requests if n == name] == [f"bytes={len(server.files[name])}-"]
    assert (tmp_path / "downloads" / name).read_bytes() == server.files[name]


def test_404_is_one_sentence_and_exit_1(server, tmp_path, capsys):
    del server.files["DIV2K_train_HR.zip"]
    assert run_cli(server, tmp_path) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert f"{server.url}DIV2K_train_HR.zip was not found (HTTP 404)" in err and "--base-url" in err
    left = [p.name for p in (tmp_path / "downloads").iterdir()] if (tmp_path / "downloads").exists() else []
    assert all(n.endswith(".part") for n in left)
    assert not (tmp_path / "DIV2K_train").exists()


def test_corrupt_member_fails_crc_and_is_deleted(server, tmp_path, capsys):
    name = "DIV2K_train_HR.zip"
    data = bytearray(server.files[name])
    at = bytes(data).find(server.hr_pngs["DIV2K_train_HR/0002.png"]) + 50
    data[at] ^= 0xFF
    server.files[name] = bytes(data)
    assert run_cli(server, tmp_path, "div2k", "--no-progress") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "CRC of member DIV2K_train_HR/0002.png" in err and "deleted" in err
    assert list((tmp_path / "downloads").iterdir()) == []
    assert not (tmp_path / "DIV2K_train").exists()


def test_second_fetch_is_a_no_op(server, tmp_path, capsys):
    assert run_cli(server, tmp_path, "df2k") == 0
    server.requests.clear()
    capsys.readouterr()
    assert run_cli(server, tmp_path, "df2k") == 0
    out = capsys.readouterr().out
    assert server.requests == [] and out.count("already in place") == 5
    train = f"--train-data {tmp_path / 'DIV2K_train'} {tmp_path / 'Flickr2K'}"
    assert f"{train} --val-data {tmp_path / 'DIV2K_valid'}" in out


def test_missing_marker_reextracts(server, tmp_path):
    datasets.fetch("div2k", tmp_path, server.url, progress=False)
    folder = tmp_path / "DIV2K_train" / "DIV2K_train_HR"
    (tmp_path / "DIV2K_train" / ".DIV2K_train_HR.zip.complete").unlink()  # as if extraction was cut short
    (folder / "0002.png").unlink()
    (folder / "stale.png").write_bytes(b"half")
    server.requests.clear()
    done = datasets.fetch("div2k", tmp_path, server.url, progress=False)
    assert server.requests == []  # the verified archive is reused
    assert [k for k, v in done.items() if v is not None] == ["DIV2K_train_HR.zip"]
    assert sorted(p.name for p in folder.iterdir()) == ["0001.png", "0002.png"]
    assert (tmp_path / "DIV2K_train" / ".DIV2K_train_HR.zip.complete").is_file()


def test_disk_full_is_one_sentence_with_the_size(server, tmp_path, capsys, monkeypatch):
    real = datasets.shutil.disk_usage
    monkeypatch.setattr(datasets.shutil, "disk_usage", lambda p: real(p)._replace(free=10))
    assert run_cli(server, tmp_path) == 1
    err = capsys.readouterr().err.strip()
    need = datasets._human(len(server.files["DIV2K_train_HR.zip"]))
    assert err.count("\n") == 0 and f"is full ({need} more were needed, 10 B free)" in err


def test_unknown_set_exits_2(tmp_path):
    with pytest.raises(SystemExit) as exc:
        datasets.main(["fetch", "imagenet", "--root", str(tmp_path)])
    assert exc.value.code == 2
