"""Download and unpack the DIV2K high-resolution archives, resumably and verified.

DIV2K is the dataset of Agustsson & Timofte, "NTIRE 2017 Challenge on Single
Image Super-Resolution: Dataset and Study", CVPR Workshops 2017.  Its 800
training PNGs (``0001.png``–``0800.png``) and 100 validation PNGs
(``0801.png``–``0900.png``) ship as two zips under :data:`DIV2K_BASE_URL`.

What "careful" means here:

* **Resumable.**  Bytes go to ``<dest>.part``; a re-run continues it with an
  HTTP ``Range: bytes=<n>-`` request.  A server that ignores ``Range`` (answers
  200) makes us truncate and start from zero; a 416 means the ``.part`` is
  already whole (then it is verified) or bogus (then it is dropped).
* **Verified before it exists.**  The size (against the published size and the
  server's ``Content-Length``/``Content-Range``) and the SHA-256 are checked on
  the ``.part``; only then is it renamed onto ``dest`` with :func:`os.replace`,
  so a complete-looking archive is never unverified.  A file that fails is
  deleted and :class:`~featinv.errors.DownloadError` names the URL, the expected
  and the actual value.
* **Published checksums.**  The sizes and SHA-256 digests in
  :data:`DIV2K_ARCHIVES` are the ones TensorFlow Datasets publishes in
  ``tensorflow_datasets/url_checksums/div2k.txt`` (github.com/tensorflow/datasets).
  An :class:`ArchiveSpec` whose ``sha256`` is ``None`` (e.g. a mirror you add)
  is verified by *trust on first use*: the digest of the first complete
  download is recorded in a sidecar ``<archive>.sha256`` and later downloads,
  and the archive already on disk, must match it.
* **Disk faults are named.**  A full disk or a folder without write permission
  while downloading or extracting raises :class:`~featinv.errors.DownloadError`
  naming the path and the fix; a ``.part`` is kept so a re-run resumes.
* **Trust on first use recovers in one run.**  If an archive verified only by
  its recorded ``<archive>.sha256`` turns out corrupt when extracted, the
  recorded digest vouches for nothing: both files are deleted, so the next run
  downloads afresh instead of rejecting a good file against the bad digest.
* **Extracted once.**  :func:`extract_once` unpacks into a temporary sibling
  directory, writes a ``.complete`` marker last, then moves the directory into
  place with :func:`os.replace`: a folder without the marker was never ours.
* **Offline-friendly.**  An archive already in ``root`` (placed by hand, say)
  that verifies is used without any network access, and an extracted folder
  with its marker needs neither the network nor the zip.

Only the standard library is used (``urllib.request``).  Progress goes to the
``logging`` module and to an optional ``progress(done_bytes, total_bytes)``
callback; nothing is printed.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import MappingProxyType

from featinv.errors import DataSourceError, DownloadError, ParamsError

__all__ = [
    "DIV2K_BASE_URL",
    "DIV2K_ARCHIVES",
    "DIV2K_EXPECTED_COUNTS",
    "COMPLETE_MARKER",
    "ArchiveSpec",
    "ProgressFn",
    "download",
    "extract_once",
    "fetch_div2k",
]

log = logging.getLogger(__name__)

DIV2K_BASE_URL = "https://data.vision.ee.ethz.ch/cvl/DIV2K/"

COMPLETE_MARKER = ".complete"
PART_SUFFIX = ".part"
SHA256_SUFFIX = ".sha256"

# Attempts per download() call: the first, plus one fresh start when a resume
# turns out bogus (416 on a short .part, a 206 starting elsewhere).  A fresh
# start sends no Range, so it cannot ask for another; the bound is a backstop.
_MAX_ATTEMPTS = 2
_LOG_EVERY_S = 10.0
_HASH_CHUNK_BYTES = 1 << 20
_USER_AGENT = "featinv-download/1 (+python urllib)"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE_RE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
_CONTENT_RANGE_UNSATISFIED_RE = re.compile(r"^bytes\s+\*/(\d+)$")

ProgressFn = Callable[[int, int | None], None]
"""``progress(done_bytes, total_bytes)``; ``total_bytes`` is None when unknown."""


@dataclass(frozen=True)
class ArchiveSpec:
    """One downloadable archive and what it must look like.

    Attributes:
        name: bare file name, both under the base URL and in the download folder
            (``"DIV2K_train_HR.zip"``).
        size_bytes: exact size in bytes, or None when unknown (then only the
            server's declared length is checked).
        sha256: lowercase hex SHA-256, or None for trust on first use (the first
            complete download's digest is recorded in ``<archive>.sha256``).

    Raises:
        ParamsError: if ``name`` is not a bare file name, ``size_bytes`` is
            negative or ``sha256`` is not 64 hex digits.
    """

    name: str
    size_bytes: int | None
    sha256: str | None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "\\" in self.name or self.name in {".", ".."}:
            raise ParamsError(
                f"ArchiveSpec.name {self.name!r} is not a bare file name; "
                "give just the archive's name, e.g. 'DIV2K_train_HR.zip'"
            )
        if self.size_bytes is not None and (
            not isinstance(self.size_bytes, int) or self.size_bytes < 0
        ):
            raise ParamsError(
                f"ArchiveSpec.size_bytes for {self.name} is {self.size_bytes!r}; "
                "give the size in bytes as a non-negative int, or None if unknown"
            )
        if self.sha256 is not None:
            digest = self.sha256.strip().lower()
            if not _SHA256_RE.match(digest):
                raise ParamsError(
                    f"ArchiveSpec.sha256 for {self.name} is {self.sha256!r}, not 64 hex digits; "
                    "give the SHA-256 in hex, or None to trust the first download"
                )
            object.__setattr__(self, "sha256", digest)


# Sizes and SHA-256 digests as published by TensorFlow Datasets in
# tensorflow_datasets/url_checksums/div2k.txt (github.com/tensorflow/datasets,
# lines for .../cvl/DIV2K/DIV2K_train_HR.zip and .../DIV2K_valid_HR.zip).
DIV2K_ARCHIVES: Mapping[str, ArchiveSpec] = MappingProxyType(
    {
        "train": ArchiveSpec(
            "DIV2K_train_HR.zip",
            3_530_603_713,
            "9d0b9c463f6e35b6c62cc6a930ee2224f670b34c1df841a57670f9acf0f6c335",
        ),
        "valid": ArchiveSpec(
            "DIV2K_valid_HR.zip",
            448_993_893,
            "20dd31fd84d777bc1cf5d6b7654a3f569c0aec74458ae094122ad1d0489900fc",
        ),
    }
)
"""Split → archive: ``train`` holds 0001–0800.png, ``valid`` 0801–0900.png."""

DIV2K_EXPECTED_COUNTS: Mapping[str, int] = MappingProxyType({"train": 800, "valid": 100})
"""Split → number of PNGs its archive must yield."""

_SPLITS = ("train", "valid")


def download(
    url: str,
    dest: Path,
    expected: ArchiveSpec,
    *,
    chunk_bytes: int = 1 << 20,
    timeout: float = 60,
    progress: ProgressFn | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resuming a previous ``.part`` and verifying the result.

    If ``dest`` already exists and verifies, nothing touches the network.  If it
    exists but does not verify, a warning is logged, it is deleted and
    downloaded again.

    Args:
        url: where to fetch the file.
        dest: final path; bytes collect in ``<dest>.part`` until verified.
        expected: the size and SHA-256 the file must have (either may be None;
            a None ``sha256`` means trust on first use via ``<dest>.sha256``).
        chunk_bytes: read size per network read.
        timeout: seconds for connecting and for each read.
        progress: called as ``progress(done_bytes, total_bytes)`` after each chunk.

    Returns:
        ``dest``, which now holds a verified file.

    Raises:
        DownloadError: on a network failure (the ``.part`` is kept, a re-run
            resumes), an HTTP error, a size/checksum mismatch (the bad file is
            deleted), or a local disk fault (disk full, permission denied; the
            message names the path).  The message names the URL and the fix.
    """
    dest = Path(dest)
    part = _sibling(dest, PART_SUFFIX)
    try:
        return _download(url, dest, part, expected, chunk_bytes, timeout, progress)
    except OSError as exc:  # network faults are DownloadErrors by now: this is the local disk
        kept = _size_or_zero(part)
        resume = f"; the {kept} bytes in {part} are kept for the re-run to resume" if kept else ""
        raise DownloadError(_disk_message(exc, part, f"downloading {url}") + resume) from exc


def _download(
    url: str,
    dest: Path,
    part: Path,
    expected: ArchiveSpec,
    chunk_bytes: int,
    timeout: float,
    progress: ProgressFn | None,
) -> Path:
    """:func:`download`'s work; local OSErrors escape to be named there."""
    if dest.exists():
        if _existing_verifies(dest, expected):
            if part.exists():
                log.info("removing stale %s: %s is already complete", part, dest)
                part.unlink()
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)

    for _attempt in range(_MAX_ATTEMPTS):
        declared_total = _fetch_into_part(url, dest, part, expected, chunk_bytes, timeout, progress)
        if declared_total is not _RESTART:
            break
        part.unlink(missing_ok=True)
    else:
        raise DownloadError(
            f"{url}: the server answered every resume attempt inconsistently; "
            f"delete {part} if it still exists and re-run, or place {dest.name} in "
            f"{dest.parent} by hand"
        )

    _verify_part(url, dest, part, expected, declared_total)
    os.replace(part, dest)
    log.info("downloaded and verified %s", dest)
    return dest


def extract_once(archive: Path, out_dir: Path, *, expected: ArchiveSpec | None = None) -> Path:
    """Extract the zip ``archive`` into ``out_dir`` unless that was already done.

    The archive is unpacked into a temporary directory beside ``out_dir``; a
    ``.complete`` marker (JSON naming the archive) is written into it last, and
    the directory is then moved onto ``out_dir`` with :func:`os.replace`.  So
    ``out_dir`` either does not exist or is complete, and a re-run with the
    marker present does nothing.  Entries keep their paths inside the zip (the
    DIV2K zips hold one top-level folder, e.g. ``DIV2K_train_HR/0001.png``).

    An archive that turns out corrupt and was verified only by trust on first
    use (``expected.sha256`` is None, or ``expected`` is not given, and a
    ``<archive>.sha256`` sidecar exists) is deleted together with the sidecar,
    so a single re-run downloads it afresh.

    Args:
        archive: the zip file.
        out_dir: directory to create; must not exist unless it has the marker.
        expected: the archive's spec, if known (to tell a published checksum
            from one recorded on first use).

    Returns:
        ``out_dir``.

    Raises:
        DownloadError: if the archive is not a readable zip, an entry is an
            absolute path or contains ``..`` (zip-slip), ``out_dir`` exists
            without the marker, or writing fails (disk full, permission denied).
    """
    archive, out_dir = Path(archive), Path(out_dir)
    try:
        return _extract_once(archive, out_dir, expected)
    except OSError as exc:  # reading the zip and writing the folder: the local disk
        raise DownloadError(_disk_message(exc, out_dir, f"extracting {archive}")) from exc


def _extract_once(archive: Path, out_dir: Path, expected: ArchiveSpec | None) -> Path:
    """:func:`extract_once`'s work; local OSErrors escape to be named there."""
    if (out_dir / COMPLETE_MARKER).is_file():
        log.debug("%s already extracted (marker present); nothing to do", out_dir)
        return out_dir
    if out_dir.exists():
        raise DownloadError(
            f"{out_dir} exists but has no {COMPLETE_MARKER} marker, so featinv did not "
            f"extract it (or an extraction outside featinv was interrupted); move or "
            f"delete it and re-run, or set `data.source: folder` to use images you "
            f"already have"
        )

    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise _corrupt_archive(archive, expected, f"is not a readable zip archive ({exc})") from exc

    with zf:
        members = zf.infolist()
        # Check every name before writing anything: a rejected archive leaves no trace.
        for info in members:
            _reject_unsafe_member(archive, info.filename)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp_dirs(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out_dir), dir=out_dir.parent))
        try:
            log.info("extracting %s (%d entries) into %s", archive, len(members), out_dir)
            try:
                zf.extractall(tmp)
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise _corrupt_archive(archive, expected, f"is corrupt ({exc})") from exc
            marker = {"archive": archive.name, "size_bytes": archive.stat().st_size}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")  # written last
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def fetch_div2k(
    root: Path,
    base_url: str = DIV2K_BASE_URL,
    progress: ProgressFn | None = None,
    *,
    archives: Mapping[str, ArchiveSpec] | None = None,
    expected_counts: Mapping[str, int] | None = None,
) -> tuple[list[Path], list[Path]]:
    """Download (if needed) and extract DIV2K's HR archives into ``root``.

    Layout: ``root/DIV2K_train_HR.zip`` is extracted into ``root/DIV2K_train_HR/``
    (which, as the zip has a top-level folder, holds
    ``DIV2K_train_HR/0001.png`` …); likewise for ``valid``.  A split whose
    folder already carries the ``.complete`` marker needs neither the network
    nor its zip, so the zips may be deleted after a successful run.

    Args:
        root: folder for the archives and the extracted images.
        base_url: where the archives live; each is fetched from ``base_url + name``.
        progress: per-chunk callback ``progress(done_bytes, total_bytes)``,
            called for each archive in turn.
        archives: split (``"train"``/``"valid"``) → :class:`ArchiveSpec`,
            overriding :data:`DIV2K_ARCHIVES` (tests serve tiny archives).
        expected_counts: split → number of PNGs, overriding
            :data:`DIV2K_EXPECTED_COUNTS`.

    Returns:
        ``(train_pngs, valid_pngs)``, each sorted.

    Raises:
        DownloadError: from :func:`download` or :func:`extract_once`.
        DataSourceError: if a split does not yield the expected number of PNGs.
        ParamsError: if ``archives`` or ``expected_counts`` name an unknown split.
    """
    root = Path(root)
    specs = _override("archives", DIV2K_ARCHIVES, archives)
    counts = _override("expected_counts", DIV2K_EXPECTED_COUNTS, expected_counts)
    base = base_url if base_url.endswith("/") else base_url + "/"

    found: dict[str, list[Path]] = {}
    for split in _SPLITS:
        spec = specs[split]
        out_dir = root / Path(spec.name).stem
        if (out_dir / COMPLETE_MARKER).is_file():
            log.info("%s is already extracted; not downloading %s", out_dir, spec.name)
        else:
            url = urllib.parse.urljoin(base, urllib.parse.quote(spec.name))
            archive = download(url, root / spec.name, spec, progress=progress)
            extract_once(archive, out_dir, expected=spec)
        pngs = sorted(out_dir.rglob("*.png"))
        if len(pngs) != counts[split]:
            sidecar = _sibling(root / spec.name, SHA256_SUFFIX)
            also = f" (and {sidecar}, the digest recorded from it)" if sidecar.is_file() else ""
            raise DataSourceError(
                f"{out_dir} holds {len(pngs)} PNG images, but DIV2K's {split} split "
                f"({spec.name}) has {counts[split]}; delete {out_dir} and "
                f"{root / spec.name}{also} and re-run to download and extract it again"
            )
        log.info("DIV2K %s: %d images in %s", split, len(pngs), out_dir)
        found[split] = pngs
    return found["train"], found["valid"]


# --------------------------------------------------------------------------- helpers


class _Restart:
    """Sentinel: the resume went wrong; drop the .part and start from zero."""


_RESTART = _Restart()


def _fetch_into_part(
    url: str,
    dest: Path,
    part: Path,
    expected: ArchiveSpec,
    chunk_bytes: int,
    timeout: float,
    progress: ProgressFn | None,
) -> int | None | _Restart:
    """One HTTP request writing into ``part``; returns the server's declared total size."""
    offset = part.stat().st_size if part.exists() else 0
    if offset and expected.size_bytes is not None and offset > expected.size_bytes:
        log.warning(
            "%s has %d bytes, more than the %d expected; starting over",
            part, offset, expected.size_bytes,
        )
        part.unlink()
        offset = 0

    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        log.info("resuming %s at byte %d", url, offset)
    else:
        log.info("downloading %s to %s", url, dest)
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.fp is not None:
            exc.close()  # the error body is not needed
        if exc.code == 416 and offset:
            return _after_416(url, part, offset, expected, exc.headers.get("Content-Range"))
        raise DownloadError(
            f"could not download {url}: HTTP {exc.code} {exc.reason}. Check the URL "
            f"(base_url) is right; without access to it, place {dest.name} in "
            f"{dest.parent} by hand, or set `data.source: folder` to use images you "
            f"already have"
        ) from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise DownloadError(_network_message(url, dest, part, exc)) from exc

    with response:
        status = response.status
        if status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                log.warning(
                    "%s answered a resume at byte %d with Content-Range %r; starting over",
                    url, offset, response.headers.get("Content-Range"),
                )
                return _RESTART
            if total is None:
                length = _int_or_none(response.headers.get("Content-Length"))
                total = None if length is None else offset + length
            mode = "ab"
        elif status == 200:
            if offset:
                log.warning(
                    "%s ignored the Range request (HTTP 200); discarding %d bytes of %s "
                    "and downloading from the start", url, offset, part,
                )
            offset = 0
            total = _int_or_none(response.headers.get("Content-Length"))
            mode = "wb"  # truncates whatever the .part held
        else:
            raise DownloadError(
                f"could not download {url}: unexpected HTTP status {status}; check the "
                f"URL, or place {dest.name} in {dest.parent} by hand"
            )

        if total is not None and expected.size_bytes is not None and total != expected.size_bytes:
            # Refuse before streaming gigabytes of the wrong file.
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{url}: the server says the file is {total} bytes, expected "
                f"{expected.size_bytes}; the file on the server has changed or the URL "
                f"is wrong. Check base_url, or update the ArchiveSpec for {expected.name}"
            )
        _stream(response, url, dest, part, mode, offset, total, expected, chunk_bytes, progress)
    return total


def _stream(
    response: http.client.HTTPResponse,
    url: str,
    dest: Path,
    part: Path,
    mode: str,
    offset: int,
    total: int | None,
    expected: ArchiveSpec,
    chunk_bytes: int,
    progress: ProgressFn | None,
) -> None:
    """Copy the response body into ``part``; a short body raises, keeping the .part."""
    limit = expected.size_bytes if expected.size_bytes is not None else total
    done = offset
    last_log = time.monotonic()
    with open(part, mode) as fh:
        while True:  # ends at EOF; bounded by ``limit`` below when a size is known
            try:
                chunk = response.read(chunk_bytes)
            except (http.client.HTTPException, OSError) as exc:
                raise DownloadError(_network_message(url, dest, part, exc, done)) from exc
            if not chunk:
                break
            fh.write(chunk)
            done += len(chunk)
            if limit is not None and done > limit:
                fh.close()
                part.unlink(missing_ok=True)
                raise DownloadError(
                    f"{url}: received more than the {limit} bytes expected; the partial "
                    f"file was deleted. Check base_url, or update the ArchiveSpec for "
                    f"{expected.name}"
                )
            if progress is not None:
                progress(done, total)
            now = time.monotonic()
            if now - last_log >= _LOG_EVERY_S:
                last_log = now
                log.info("%s: %s", dest.name, _progress_text(done, total))
    if total is not None and done < total:
        raise DownloadError(
            f"could not download {url}: the connection closed after {done} of {total} "
            f"bytes. The partial download is kept in {part}; re-run to resume it. "
            + _offline_hint(dest)
        )


def _after_416(
    url: str, part: Path, offset: int, expected: ArchiveSpec, content_range: str | None
) -> int | _Restart:
    """HTTP 416 on a resume: the .part is either already whole or bogus."""
    whole = _parse_unsatisfied_range(content_range)
    if whole is None:
        whole = expected.size_bytes
    if whole is not None and offset == whole:
        log.info("%s already holds all %d bytes of %s; verifying it", part, whole, url)
        return whole
    log.warning(
        "%s refused to resume at byte %d (HTTP 416, Content-Range %r); starting over",
        url, offset, content_range,
    )
    return _RESTART


def _verify_part(
    url: str, dest: Path, part: Path, expected: ArchiveSpec, declared_total: int | None
) -> None:
    """Check size and SHA-256 of the finished ``part``; delete it and raise on mismatch."""
    size = part.stat().st_size
    for what, want in (("published size", expected.size_bytes), ("server's length", declared_total)):
        if want is not None and size != want:
            part.unlink()
            raise DownloadError(
                f"{url}: downloaded {size} bytes, but the {what} is {want}; the bad "
                f"file was deleted. Re-run to download it again; if this repeats, the "
                f"file on the server has changed: update the ArchiveSpec for {expected.name}"
            )

    sidecar = _sibling(dest, SHA256_SUFFIX)
    digest = _sha256_file(part)
    want_digest = expected.sha256 or _read_sidecar(sidecar)
    if want_digest is None:
        _write_sidecar(sidecar, digest, dest.name)
        log.warning(
            "no published checksum for %s: trusting this first download and recording "
            "its sha256 %s in %s", dest.name, digest, sidecar,
        )
        return
    if digest != want_digest:
        part.unlink()
        source = "published" if expected.sha256 else f"recorded in {sidecar}"
        fix = (
            "update the ArchiveSpec for " + expected.name
            if expected.sha256
            else f"delete {sidecar} if you trust the new file"
        )
        raise DownloadError(
            f"{url}: sha256 mismatch: expected {want_digest} ({source}), got {digest}; "
            f"the bad file was deleted. Re-run to download it again; if this repeats, "
            f"the file on the server has changed: {fix}"
        )


def _existing_verifies(dest: Path, expected: ArchiveSpec) -> bool:
    """True if ``dest`` is good; otherwise warn, delete it and return False."""
    size = dest.stat().st_size
    sidecar = _sibling(dest, SHA256_SUFFIX)
    problem: str
    if expected.size_bytes is not None and size != expected.size_bytes:
        problem = f"is {size} bytes, expected {expected.size_bytes}"
    else:
        digest = _sha256_file(dest)
        want = expected.sha256 or _read_sidecar(sidecar)
        if want is None:
            _write_sidecar(sidecar, digest, dest.name)
            log.warning(
                "no published checksum for %s: trusting the file already there and "
                "recording its sha256 %s in %s", dest, digest, sidecar,
            )
            return True
        if digest == want:
            log.info("%s is already present and verified; not downloading", dest)
            return True
        problem = f"has sha256 {digest}, expected {want}"
    log.warning("%s %s; deleting it and downloading it again", dest, problem)
    dest.unlink()
    return False


def _corrupt_archive(archive: Path, expected: ArchiveSpec | None, problem: str) -> DownloadError:
    """The error for an archive that will not extract; a trust-on-first-use one is deleted first.

    Its recorded digest was taken from this very file, so it vouches for nothing;
    kept, it would reject the next (good) download and recovery would take two runs.
    """
    sidecar = _sibling(archive, SHA256_SUFFIX)
    published = expected is not None and expected.sha256 is not None
    if published or not sidecar.is_file():
        return DownloadError(f"{archive} {problem}; delete it and re-run to download it again")
    archive.unlink(missing_ok=True)
    sidecar.unlink(missing_ok=True)
    return DownloadError(
        f"{archive} {problem}; it had no published checksum, so it and the digest recorded "
        f"from it ({sidecar}) were deleted: re-run to download it again"
    )


def _disk_message(exc: OSError, path: Path, doing: str) -> str:
    """One line for a local filesystem fault: the path, the errno, and the fix."""
    where = exc.filename if exc.filename is not None else path
    folder = path.parent
    code = errno.errorcode.get(exc.errno or 0, "")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free space on {folder} (or point data.root elsewhere), then re-run"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {folder} writable (or point data.root elsewhere), then re-run"
    else:
        fix = f"check {folder}, then re-run"
    return f"{where}: {code + ': ' if code else ''}{exc.strerror or exc} while {doing}; {fix}"


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _reject_unsafe_member(archive: Path, name: str) -> None:
    """Zip-slip guard: entries must be relative and must not climb with ``..``."""
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(name).drive or ".." in posix.parts:
        raise DownloadError(
            f"{archive}: refusing to extract entry {name!r}, which points outside the "
            f"extraction folder (absolute path or '..'); the archive is corrupt or "
            f"malicious: delete it and download it again from a trusted source"
        )


def _remove_stale_tmp_dirs(out_dir: Path) -> None:
    """Remove temp dirs left by an extraction that was killed midway."""
    for stale in out_dir.parent.glob(glob.escape(_tmp_prefix(out_dir)) + "*"):
        if stale.is_dir():
            log.warning("removing %s left by an interrupted extraction", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _override(what: str, defaults: Mapping[str, object], given: Mapping | None) -> dict:
    if given is None:
        return dict(defaults)
    unknown = sorted(set(given) - set(_SPLITS))
    if unknown:
        raise ParamsError(
            f"{what} has unknown split(s) {unknown}; valid splits are {list(_SPLITS)}"
        )
    return {**defaults, **given}


def _tmp_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.tmp-"


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_suffix(path.suffix + suffix)


def _sha256_file(path: Path) -> str:
    log.info("computing sha256 of %s", path)
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_HASH_CHUNK_BYTES), b""):
            sha.update(block)
    return sha.hexdigest()


def _read_sidecar(sidecar: Path) -> str | None:
    if not sidecar.is_file():
        return None
    text = sidecar.read_text().split()
    digest = text[0].lower() if text else ""
    if not _SHA256_RE.match(digest):
        raise DownloadError(
            f"{sidecar} does not start with a sha256 hex digest; delete it and re-run "
            f"(the next complete download will be trusted and recorded)"
        )
    return digest


def _write_sidecar(sidecar: Path, digest: str, name: str) -> None:
    tmp = _sibling(sidecar, ".tmp")
    tmp.write_text(f"{digest}  {name}\n")  # sha256sum's format
    os.replace(tmp, sidecar)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``"bytes 300-999/1000"`` → ``(300, 1000)``; unknown total → None."""
    match = _CONTENT_RANGE_RE.match((value or "").strip())
    if not match:
        return None, None
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


def _parse_unsatisfied_range(value: str | None) -> int | None:
    """``"bytes */1000"`` (sent with a 416) → 1000."""
    match = _CONTENT_RANGE_UNSATISFIED_RE.match((value or "").strip())
    return int(match.group(1)) if match else None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _progress_text(done: int, total: int | None) -> str:
    mib = 1 << 20
    if total:
        return f"{done / mib:.1f} of {total / mib:.1f} MiB ({100 * done / total:.0f}%)"
    return f"{done / mib:.1f} MiB"


def _offline_hint(dest: Path) -> str:
    return (
        f"Without internet access, download {dest.name} elsewhere and place it in "
        f"{dest.parent} by hand, or set `data.source: folder` to use images you "
        f"already have."
    )


def _network_message(
    url: str, dest: Path, part: Path, exc: BaseException, done: int | None = None
) -> str:
    reason = getattr(exc, "reason", None) or exc
    kept = f" {done} bytes are kept in {part}." if done else ""
    return (
        f"could not download {url}: {type(exc).__name__}: {reason}.{kept} Re-run the "
        f"same command to resume. " + _offline_hint(dest)
    )
