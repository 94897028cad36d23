"""Tests for featinv/data/download.py against a real HTTP server on 127.0.0.1.

The server (http.server in a thread) serves tiny DIV2K-shaped zips built in
tmp_path.  It honours ``Range: bytes=<n>-`` and can be told to ignore Range or
to drop the connection after N body bytes, and it records every request.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import io
import re
import socket
import threading
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featinv.data.download import (
    COMPLETE_MARKER,
    ArchiveSpec,
    download,
    extract_once,
    fetch_div2k,
)
from featinv.errors import DataSourceError, DownloadError, ParamsError

TIMEOUT_S = 5  # every client request in these tests; the server is local
TRAIN_NUMBERS = (1, 2, 3)  # stand-ins for 0001–0800
VALID_NUMBERS = (801, 802)  # stand-ins for 0801–0900
COUNTS = {"train": len(TRAIN_NUMBERS), "valid": len(VALID_NUMBERS)}


# --------------------------------------------------------------------------- server


@dataclass
class Seen:
    path: str
    range: str | None
    status: int


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    ignore_range: bool = False
    drop_after: int | None = None  # applies to the next response only
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """GET with ``Range: bytes=<n>-`` support and fault switches (see ServerState)."""

    server: "_StateServer"

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        state = self.server.state
        range_header = self.headers.get("Range")
        with state.lock:
            body = state.files.get(self.path)
            drop_after, state.drop_after = state.drop_after, None
            ignore_range = state.ignore_range

        if body is None:
            self._record(range_header, 404)
            self.send_error(404)
            return

        start, status = 0, 200
        if range_header and not ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", range_header)
            assert match, f"client sent an unexpected Range {range_header!r}"
            start = int(match.group(1))
            if start >= len(body):
                self._record(range_header, 416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206

        payload = body[start:]
        self._record(range_header, status)
        self.send_response(status)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(payload)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if drop_after is not None and drop_after < len(payload):
            self.wfile.write(payload[:drop_after])
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # simulate a dropped link
            return
        self.wfile.write(payload)

    def _record(self, range_header: str | None, status: int) -> None:
        with self.server.state.lock:
            self.server.state.seen.append(Seen(self.path, range_header, status))

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


class _StateServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState


@dataclass
class LocalServer:
    state: ServerState
    url: str  # base URL, ends with "/"

    def url_for(self, name: str) -> str:
        return self.url + name


@pytest.fixture
def server():
    httpd = _StateServer(("127.0.0.1", 0), RangeHandler)
    httpd.state = ServerState()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield LocalServer(httpd.state, f"http://127.0.0.1:{httpd.server_address[1]}/")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=TIMEOUT_S)


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- fake DIV2K


def _png_bytes(rng: np.random.Generator, side: int = 16) -> bytes:
    pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _div2k_zip(path: Path, folder: str, numbers: tuple[int, ...], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{folder}/", b"")
        for number in numbers:
            zf.writestr(f"{folder}/{number:04d}.png", _png_bytes(rng))
    return path.read_bytes()


def _spec_for(name: str, data: bytes) -> ArchiveSpec:
    return ArchiveSpec(name, len(data), hashlib.sha256(data).hexdigest())


@dataclass
class FakeDiv2k:
    archives: dict[str, ArchiveSpec]
    data: dict[str, bytes]  # archive name -> bytes


@pytest.fixture
def fake(tmp_path: Path, server: LocalServer) -> FakeDiv2k:
    src = tmp_path / "src"
    src.mkdir()
    train = _div2k_zip(src / "DIV2K_train_HR.zip", "DIV2K_train_HR", TRAIN_NUMBERS, seed=0)
    valid = _div2k_zip(src / "DIV2K_valid_HR.zip", "DIV2K_valid_HR", VALID_NUMBERS, seed=1)
    server.state.files["/DIV2K_train_HR.zip"] = train
    server.state.files["/DIV2K_valid_HR.zip"] = valid
    return FakeDiv2k(
        archives={
            "train": _spec_for("DIV2K_train_HR.zip", train),
            "valid": _spec_for("DIV2K_valid_HR.zip", valid),
        },
        data={"DIV2K_train_HR.zip": train, "DIV2K_valid_HR.zip": valid},
    )


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# --------------------------------------------------------------------------- fetch_div2k


def test_fresh_fetch_downloads_verifies_and_extracts(tmp_path, server, fake, capsys):
    root = tmp_path / "root"
    calls: list[tuple[int, int | None]] = []

    train, valid = fetch_div2k(
        root,
        server.url,
        progress=lambda done, total: calls.append((done, total)),
        archives=fake.archives,
        expected_counts=COUNTS,
    )

    assert [p.name for p in train] == ["0001.png", "0002.png", "0003.png"]
    assert [p.name for p in valid] == ["0801.png", "0802.png"]
    assert all(p.parent.name == "DIV2K_train_HR" for p in train)
    for path in train + valid:
        with Image.open(path) as img:
            assert img.size == (16, 16)
    for name, data in fake.data.items():
        assert (root / name).read_bytes() == data
        assert (root / Path(name).stem / COMPLETE_MARKER).is_file()
    assert not list(root.glob("*.part"))
    assert [s.range for s in server.state.seen] == [None, None]
    assert calls and calls[-1] == (len(fake.data["DIV2K_valid_HR.zip"]),) * 2
    assert capsys.readouterr().out == ""  # the library logs, never prints


def test_second_fetch_makes_no_requests(tmp_path, server, fake):
    root = tmp_path / "root"
    first = fetch_div2k(root, server.url, archives=fake.archives, expected_counts=COUNTS)
    n_requests = len(server.state.seen)
    assert n_requests == 2

    second = fetch_div2k(root, server.url, archives=fake.archives, expected_counts=COUNTS)

    assert second == first
    assert len(server.state.seen) == n_requests


def test_wrong_image_count_raises_data_source_error(tmp_path, server, fake):
    with pytest.raises(DataSourceError, match=r"holds 3 PNG images.*has 800"):
        fetch_div2k(
            tmp_path / "root",
            server.url,
            archives=fake.archives,
            expected_counts={"train": 800},
        )


def test_unknown_split_override_is_rejected(tmp_path, server, fake):
    with pytest.raises(ParamsError, match="test"):
        fetch_div2k(tmp_path, server.url, archives={"test": fake.archives["train"]})
    assert server.state.seen == []


# --------------------------------------------------------------------------- download


def test_interrupted_download_resumes_with_range(tmp_path, server, fake):
    spec = fake.archives["train"]
    data = fake.data[spec.name]
    dest = tmp_path / "dl" / spec.name
    cut = len(data) // 3
    server.state.drop_after = cut

    with pytest.raises(DownloadError, match="resume") as info:
        download(server.url_for(spec.name), dest, spec, chunk_bytes=64, timeout=TIMEOUT_S)

    assert server.url_for(spec.name) in str(info.value)
    assert not dest.exists()
    assert _part(dest).read_bytes() == data[:cut]

    download(server.url_for(spec.name), dest, spec, chunk_bytes=64, timeout=TIMEOUT_S)

    assert dest.read_bytes() == data
    assert not _part(dest).exists()
    assert [(s.range, s.status) for s in server.state.seen] == [
        (None, 200),
        (f"bytes={cut}-", 206),
    ]


def test_server_ignoring_range_still_yields_correct_file(tmp_path, server, fake):
    spec = fake.archives["train"]
    data = fake.data[spec.name]
    dest = tmp_path / spec.name
    garbage = b"\xff" * (len(data) // 2)  # a .part that does not even match the file
    _part(dest).write_bytes(garbage)
    server.state.ignore_range = True

    download(server.url_for(spec.name), dest, spec, chunk_bytes=64, timeout=TIMEOUT_S)

    assert dest.read_bytes() == data
    assert not _part(dest).exists()
    assert [(s.range, s.status) for s in server.state.seen] == [(f"bytes={len(garbage)}-", 200)]


def test_complete_part_answered_416_is_verified_not_refetched(tmp_path, server, fake):
    spec = fake.archives["valid"]
    data = fake.data[spec.name]
    dest = tmp_path / spec.name
    _part(dest).write_bytes(data)

    download(server.url_for(spec.name), dest, spec, timeout=TIMEOUT_S)

    assert dest.read_bytes() == data
    assert [(s.range, s.status) for s in server.state.seen] == [(f"bytes={len(data)}-", 416)]


def test_overlong_part_with_unknown_size_restarts_from_zero(tmp_path, server, fake):
    spec = replace(fake.archives["valid"], size_bytes=None)
    data = fake.data[spec.name]
    dest = tmp_path / spec.name
    _part(dest).write_bytes(data + b"junk")

    download(server.url_for(spec.name), dest, spec, timeout=TIMEOUT_S)

    assert dest.read_bytes() == data
    assert [(s.range, s.status) for s in server.state.seen] == [
        (f"bytes={len(data) + 4}-", 416),
        (None, 200),
    ]


def test_wrong_checksum_raises_and_leaves_no_file(tmp_path, server, fake):
    good = fake.archives["train"]
    spec = replace(good, sha256="0" * 64)
    dest = tmp_path / spec.name
    url = server.url_for(spec.name)

    with pytest.raises(DownloadError) as info:
        download(url, dest, spec, timeout=TIMEOUT_S)

    message = str(info.value)
    assert url in message and "0" * 64 in message and good.sha256 in message
    assert not dest.exists()
    assert not _part(dest).exists()


def test_wrong_size_raises_and_leaves_no_file(tmp_path, server, fake):
    spec = replace(fake.archives["train"], size_bytes=fake.archives["train"].size_bytes + 1)
    dest = tmp_path / spec.name
    url = server.url_for(spec.name)

    with pytest.raises(DownloadError, match=rf"{re.escape(url)}.*{spec.size_bytes}"):
        download(url, dest, spec, timeout=TIMEOUT_S)

    assert not dest.exists()
    assert not _part(dest).exists()


def test_verified_existing_archive_needs_no_network(tmp_path, fake, closed_port):
    spec = fake.archives["train"]
    dest = tmp_path / spec.name
    dest.write_bytes(fake.data[spec.name])

    # Nothing listens on this port: any request would fail.
    url = f"http://127.0.0.1:{closed_port}/{spec.name}"
    assert download(url, dest, spec, timeout=TIMEOUT_S) == dest
    assert dest.read_bytes() == fake.data[spec.name]


def test_trust_on_first_use_records_and_enforces_sidecar(tmp_path, server, fake):
    spec = ArchiveSpec(fake.archives["train"].name, None, None)
    data = fake.data[spec.name]
    dest = tmp_path / spec.name
    sidecar = dest.with_name(dest.name + ".sha256")
    url = server.url_for(spec.name)

    download(url, dest, spec, timeout=TIMEOUT_S)
    assert sidecar.read_text().split()[0] == hashlib.sha256(data).hexdigest()

    # A corrupted archive on disk fails the recorded digest and is fetched again.
    dest.write_bytes(b"corrupt" + data[7:])
    download(url, dest, spec, timeout=TIMEOUT_S)
    assert dest.read_bytes() == data

    # The server now serves different bytes: the recorded digest rejects them.
    dest.unlink()
    server.state.files["/" + spec.name] = data[::-1]
    with pytest.raises(DownloadError, match="sha256 mismatch") as info:
        download(url, dest, spec, timeout=TIMEOUT_S)
    assert str(sidecar) in str(info.value)
    assert not dest.exists() and not _part(dest).exists()


def test_unreachable_url_raises_download_error_naming_url(tmp_path, closed_port):
    url = f"http://127.0.0.1:{closed_port}/DIV2K_train_HR.zip"
    dest = tmp_path / "DIV2K_train_HR.zip"

    with pytest.raises(DownloadError) as info:
        download(url, dest, ArchiveSpec(dest.name, None, None), timeout=TIMEOUT_S)

    message = str(info.value)
    assert url in message
    assert "re-run" in message.lower() and "by hand" in message
    assert "data.source: folder" in message
    assert not dest.exists()


def test_http_404_raises_download_error(tmp_path, server):
    url = server.url_for("missing.zip")
    with pytest.raises(DownloadError, match=rf"{re.escape(url)}.*404"):
        download(url, tmp_path / "missing.zip", ArchiveSpec("missing.zip", None, None))


# --------------------------------------------------------------------------- extract_once


@pytest.mark.parametrize(
    "evil_name",
    ["../evil.png", "DIV2K_train_HR/../../evil.png", "/tmp/featinv-evil.png", "C:/evil.png"],
)
def test_zip_slip_entry_is_rejected(tmp_path, evil_name):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("DIV2K_train_HR/0001.png", b"fine")
        zf.writestr(evil_name, b"evil")
    with zipfile.ZipFile(archive) as zf:
        assert evil_name in zf.namelist()  # zipfile kept the hostile name as written
    out_dir = tmp_path / "root" / "DIV2K_train_HR"

    with pytest.raises(DownloadError, match=re.escape(repr(evil_name))):
        extract_once(archive, out_dir)

    assert not out_dir.exists()
    assert not (tmp_path / "evil.png").exists()
    assert not Path("/tmp/featinv-evil.png").exists()


def test_extract_once_runs_once_and_refuses_unmarked_dir(tmp_path):
    archive = tmp_path / "DIV2K_valid_HR.zip"
    _div2k_zip(archive, "DIV2K_valid_HR", VALID_NUMBERS, seed=2)
    out_dir = tmp_path / "out"

    assert extract_once(archive, out_dir) == out_dir
    png = out_dir / "DIV2K_valid_HR" / "0801.png"
    assert png.is_file() and (out_dir / COMPLETE_MARKER).is_file()
    assert not list(tmp_path.glob(".out.tmp-*"))

    png.write_bytes(b"edited")  # a re-run with the marker must not touch anything
    extract_once(archive, out_dir)
    assert png.read_bytes() == b"edited"

    unmarked = tmp_path / "unmarked"
    unmarked.mkdir()
    with pytest.raises(DownloadError, match=COMPLETE_MARKER):
        extract_once(archive, unmarked)


# --------------------------------------------------------------------------- local disk faults


class _FillingFile:
    """A file object whose disk fills up after ``room`` bytes (ENOSPC, as a real write would raise)."""

    def __init__(self, fh, room: int) -> None:
        self._fh, self._room = fh, room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._fh.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()


def test_disk_full_while_downloading_is_a_download_error_and_resumes(tmp_path, server, fake, monkeypatch):
    spec = fake.archives["train"]
    dest = tmp_path / spec.name
    url = server.url_for(spec.name)
    monkeypatch.setattr("featinv.data.download.open", lambda path, mode: _FillingFile(open(path, mode), 256),
                        raising=False)

    with pytest.raises(DownloadError) as info:
        download(url, dest, spec, chunk_bytes=64, timeout=TIMEOUT_S)

    message = str(info.value)
    assert str(_part(dest)) in message and "ENOSPC" in message and "free space on" in message
    assert "256 bytes" in message and "resume" in message and "\n" not in message
    assert _part(dest).stat().st_size == 256 and not dest.exists()

    monkeypatch.undo()  # space freed: a re-run resumes where the disk filled up
    download(url, dest, spec, chunk_bytes=64, timeout=TIMEOUT_S)
    assert dest.read_bytes() == fake.data[spec.name]
    assert server.state.seen[-1].range == "bytes=256-"


def test_permission_denied_on_destination_is_a_download_error(tmp_path, server, fake, monkeypatch):
    spec = fake.archives["valid"]
    dest = tmp_path / spec.name

    def denied(path, mode):  # chmod cannot lock root out, so deny at the open
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("featinv.data.download.open", denied, raising=False)
    with pytest.raises(DownloadError, match=rf"{re.escape(str(_part(dest)))}: EACCES: .* writable"):
        download(server.url_for(spec.name), dest, spec, timeout=TIMEOUT_S)


def test_destination_under_a_file_is_a_download_error(tmp_path, server, fake):
    spec = fake.archives["valid"]
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(DownloadError, match="blocker"):
        download(server.url_for(spec.name), tmp_path / "blocker" / spec.name, spec, timeout=TIMEOUT_S)


def test_disk_full_while_extracting_is_a_download_error_and_leaves_no_folder(tmp_path, monkeypatch):
    archive = tmp_path / "DIV2K_valid_HR.zip"
    _div2k_zip(archive, "DIV2K_valid_HR", VALID_NUMBERS, seed=2)
    out_dir = tmp_path / "out"

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", full)
    with pytest.raises(DownloadError, match=r"out: ENOSPC: .*extracting .*free space on"):
        extract_once(archive, out_dir)
    assert not out_dir.exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert archive.exists()  # a full disk says nothing about the archive


# --------------------------------------------------------------------------- trust on first use, corrupt


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_corrupt_tofu_archive_is_deleted_with_its_digest_so_one_rerun_recovers(tmp_path, server, fake, damage):
    name = "DIV2K_train_HR.zip"
    good = fake.data[name]
    if damage == "truncated":
        bad = good[: len(good) // 2]  # no central directory: not a zip at all
    else:
        middle = len(good) // 2  # inside a stored PNG: the CRC check fails on extraction
        bad = good[:middle] + bytes([good[middle] ^ 0xFF]) + good[middle + 1 :]
    server.state.files["/" + name] = bad
    archives = {**fake.archives, "train": ArchiveSpec(name, None, None)}  # no published checksum
    root = tmp_path / "root"
    archive, sidecar = root / name, root / (name + ".sha256")

    with pytest.raises(DownloadError, match="sha256.*were deleted: re-run") as info:
        fetch_div2k(root, server.url, archives=archives, expected_counts=COUNTS)
    assert str(archive) in str(info.value) and str(sidecar) in str(info.value)
    assert not archive.exists() and not sidecar.exists()
    assert not (root / "DIV2K_train_HR").exists()

    server.state.files["/" + name] = good  # the server (or the network) is healthy again
    train, _valid = fetch_div2k(root, server.url, archives=archives, expected_counts=COUNTS)
    assert len(train) == len(TRAIN_NUMBERS)
    assert sidecar.read_text().split()[0] == hashlib.sha256(good).hexdigest()


def test_corrupt_archive_with_published_checksum_is_kept(tmp_path):
    archive = tmp_path / "DIV2K_valid_HR.zip"
    archive.write_bytes(b"PK\x03\x04 not really a zip")
    spec = ArchiveSpec(archive.name, None, "0" * 64)
    with pytest.raises(DownloadError, match="not a readable zip archive.*delete it and re-run"):
        extract_once(archive, tmp_path / "out", expected=spec)
    assert archive.exists()
