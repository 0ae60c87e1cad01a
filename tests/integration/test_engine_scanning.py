"""Integration tests of the scan engine with real YARA: EICAR, archives, hashes, limits."""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import io
import lzma
import tarfile
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vsphere_av.config import EngineSettings, Settings
from vsphere_av.engine import Engine, FileOutcome, Session
from vsphere_av.store.audit import AuditOnUse

# Built from two halves so this test file is not itself the test file.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR" + b"-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
MiB = 1024 * 1024


def make_settings(state: Path, **engine: int) -> Settings:
    return Settings(state_dir=state, engine=dataclasses.replace(EngineSettings(), **engine))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine.open(make_settings(tmp_path / "state"), audit=AuditOnUse(tmp_path / "state"),
                      actor="tester")
    yield eng
    eng.close()


def zip_bytes(members: dict[str, bytes], **kw: object) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def scan(session: Session, data: bytes, path: str, chunk: int = 7) -> FileOutcome:
    return session.scan_stream((data[i:i + chunk] for i in range(0, len(data), chunk)),
                               path=path)


def threats(outcome: FileOutcome) -> set[tuple[str, str]]:
    return {(d.threat, d.member) for d in outcome.detections}


def test_new_installation_detects_eicar_out_of_the_box(engine: Engine) -> None:
    with engine.session() as s:
        out = scan(s, EICAR, "/tmp/eicar.com")
        assert out.status == "infected"
        assert out.sha256 == hashlib.sha256(EICAR).hexdigest()
        assert out.size == len(EICAR)
        assert {d.source for d in out.detections} == {"yara", "hash"}
        assert {d.threat for d in out.detections} == {"EICAR-Test-File"}
        assert all(d.member == "" for d in out.detections)
        clean = scan(s, b"hello world\n", "/tmp/hello.txt")
        assert clean.status == "clean"
        assert clean.detections == ()
    assert engine.store.infos()[0].source.startswith("built-in")


@pytest.mark.parametrize(("name", "data", "member"), [
    ("outer.zip", zip_bytes({"dir/inner.exe": EICAR}), "outer.zip!dir/inner.exe"),
    ("nested.zip", zip_bytes({"a/in.zip": zip_bytes({"x/e.com": EICAR})}),
     "nested.zip!a/in.zip!x/e.com"),
    ("b.tar.gz", tar_bytes({"d/e.com": EICAR}), "b.tar.gz!d/e.com"),
    ("b.tar.bz2", tar_bytes({"e.com": EICAR}, "w:bz2"), "b.tar.bz2!e.com"),
    ("b.tar.xz", tar_bytes({"e.com": EICAR}, "w:xz"), "b.tar.xz!e.com"),
    ("b.tar", tar_bytes({"e.com": EICAR}, "w"), "b.tar!e.com"),
    ("e.com.gz", gzip.compress(EICAR), "e.com.gz!e.com"),
    ("e.com.bz2", bz2.compress(EICAR), "e.com.bz2!e.com"),
    ("e.com.xz", lzma.compress(EICAR), "e.com.xz!e.com"),
    ("mixed.tgz", tar_bytes({"z.zip": zip_bytes({"deep/e.com": EICAR})}),
     "mixed.tgz!z.zip!deep/e.com"),
])
def test_eicar_inside_archives(engine: Engine, name: str, data: bytes, member: str) -> None:
    with engine.session() as s:
        out = scan(s, data, f"/data/{name}", chunk=100)
    assert out.status == "infected", out
    assert ("EICAR-Test-File", member) in threats(out)


def test_clean_archive_is_clean(engine: Engine) -> None:
    with engine.session() as s:
        out = scan(s, zip_bytes({"a.txt": b"a" * 1000, "b/c.txt": b"hello"}), "/x/ok.zip")
    assert out.status == "clean"


def test_too_large_is_skipped_and_the_stream_is_not_drained(tmp_path: Path) -> None:
    eng = Engine.open(make_settings(tmp_path / "s", max_file_size=1000, spool_threshold=100),
                      audit=AuditOnUse(tmp_path / "s"), actor="tester")
    pulled = []

    def chunks() -> Iterator[bytes]:
        for i in range(1000):
            pulled.append(i)
            yield b"x" * 100

    with eng.session() as s:
        out = s.scan_stream(chunks(), path="/big.bin")
        hinted = s.scan_stream(iter([b"x"]), path="/big2.bin", size_hint=5000)
    assert out.status == "skipped"
    assert out.reason == "larger than max file size"
    assert len(pulled) <= 11
    assert hinted.status == "skipped"
    assert hinted.reason == "larger than max file size"
    eng.close()


def test_large_stream_is_spooled_not_held_in_memory(tmp_path: Path) -> None:
    eng = Engine.open(make_settings(tmp_path / "s", spool_threshold=1 * MiB,
                                    max_file_size=64 * MiB),
                      audit=AuditOnUse(tmp_path / "s"), actor="tester")
    block = b"\x00" * (256 * 1024)
    tail = EICAR  # not at offset 0, so only the hash of the whole would identify it

    def chunks() -> Iterator[bytes]:
        for _ in range(80):   # 20 MiB
            yield block
        yield tail

    digest = hashlib.sha256()
    for c in chunks():
        digest.update(c)
    with eng.session() as s:
        tracemalloc.start()
        out = s.scan_stream(chunks(), path="/var/big.img")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert out.status == "clean"
    assert out.size == 80 * len(block) + len(tail)
    assert out.sha256 == digest.hexdigest()
    assert peak < 4 * MiB, peak
    eng.close()


def make_limited(state: Path, *, alert: bool, **engine: int) -> Engine:
    settings = make_settings(state, **engine)
    return Engine.open(dataclasses.replace(settings, engine=dataclasses.replace(
        settings.engine, alert_exceeds_max=alert)), audit=AuditOnUse(state), actor="tester")


def limited_outcome(out: FileOutcome, *, alert: bool, limit: str, reason: str) -> None:
    """An archive over a limit: a detection of its own (alert on) or skipped with the reason."""
    assert reason in out.reason
    if alert:
        assert out.status == "infected", out
        assert [d.threat for d in out.detections] == [f"Heuristics.Limits.Exceeded.{limit}"]
        assert out.detections[0].source == "limit"
    else:
        assert out.status == "skipped", out
        assert out.detections == ()


@pytest.mark.parametrize("alert", [True, False])
def test_archive_depth_limit(tmp_path: Path, alert: bool) -> None:
    eng = make_limited(tmp_path / "s", alert=alert, archive_max_depth=2)
    deep = zip_bytes({"l1.zip": zip_bytes({"l2.zip": zip_bytes({"e.com": EICAR})})})
    shallow = zip_bytes({"l1.zip": zip_bytes({"e.com": EICAR})})
    with eng.session() as s:
        out = scan(s, deep, "/d/deep.zip", chunk=4096)
        ok = scan(s, shallow, "/d/shallow.zip", chunk=4096)
    limited_outcome(out, alert=alert, limit="MaxDepth", reason="depth limit (2)")
    if alert:
        assert out.detections[0].member == "deep.zip!l1.zip!l2.zip"
    assert ok.status == "infected"
    assert [d.source for d in ok.detections] != ["limit"]
    eng.close()


def test_a_cached_limit_detection_does_not_outlive_turning_alerts_off(tmp_path: Path) -> None:
    state = tmp_path / "s"
    many = zip_bytes({f"f{i}.txt": b"x" for i in range(10)})
    alerting = make_limited(state, alert=True, archive_max_members=5)
    with alerting.session() as s:
        assert scan(s, many, "/d/many.zip", chunk=4096).status == "infected"
    alerting.close()
    quiet = make_limited(state, alert=False, archive_max_members=5)
    with quiet.session() as s:
        out = scan(s, many, "/d/many.zip", chunk=4096)
    assert (out.status, out.cached) == ("skipped", False)
    quiet.close()


@pytest.mark.parametrize("alert", [True, False])
def test_archive_member_count_limit(tmp_path: Path, alert: bool) -> None:
    eng = make_limited(tmp_path / "s", alert=alert, archive_max_members=5)
    many = zip_bytes({f"f{i}.txt": b"x" for i in range(10)} | {"z_last.com": EICAR})
    with eng.session() as s:
        out = scan(s, many, "/d/many.zip", chunk=4096)
    limited_outcome(out, alert=alert, limit="MaxMembers", reason="member limit (5)")
    eng.close()


@pytest.mark.parametrize("alert", [True, False])
def test_compression_ratio_limit_stops_a_zip_bomb(tmp_path: Path, alert: bool) -> None:
    eng = make_limited(tmp_path / "s", alert=alert, archive_max_ratio=50)
    bomb = zip_bytes({"zeros.bin": b"\x00" * (20 * MiB)})
    gz_bomb = gzip.compress(b"\x00" * (20 * MiB))
    with eng.session() as s:
        out = scan(s, bomb, "/d/bomb.zip", chunk=65536)
        gz = scan(s, gz_bomb, "/d/bomb.gz", chunk=65536)
    assert len(bomb) < 100_000
    limited_outcome(out, alert=alert, limit="MaxRatio", reason="compression ratio limit (50:1)")
    limited_outcome(gz, alert=alert, limit="MaxRatio", reason="compression ratio limit")
    eng.close()


@pytest.mark.parametrize("alert", [True, False])
def test_total_extracted_size_limit(tmp_path: Path, alert: bool) -> None:
    eng = make_limited(tmp_path / "s", alert=alert, archive_max_total_size=3 * MiB,
                       archive_max_ratio=10_000)
    data = tar_bytes({f"f{i}.bin": bytes(range(256)) * 4096 for i in range(5)})   # 5 x 1 MiB
    with eng.session() as s:
        out = scan(s, data, "/d/t.tar.gz", chunk=65536)
    limited_outcome(out, alert=alert, limit="MaxTotalSize", reason="total extracted size limit")
    eng.close()


@pytest.mark.parametrize("alert", [True, False])
def test_member_over_max_file_size(tmp_path: Path, alert: bool) -> None:
    eng = make_limited(tmp_path / "s", alert=alert, max_file_size=2 * MiB,
                       archive_max_ratio=10_000)
    data = zip_bytes({"big.bin": b"\x00" * (3 * MiB)})
    with eng.session() as s:
        out = scan(s, data, "/d/big.zip", chunk=65536)
    limited_outcome(out, alert=alert, limit="MaxFileSize", reason="larger than max file size")
    eng.close()


def test_encrypted_member_is_reported_skipped(engine: Engine) -> None:
    raw = bytearray(zip_bytes({"secret.doc": b"x" * 100}))
    # Set the "encrypted" flag bit in the local and central headers (what zip -e writes).
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        at = raw.find(sig)
        flag_at = at + (6 if sig == b"PK\x03\x04" else 8)
        raw[flag_at] |= 0x01
    with engine.session() as s:
        out = scan(s, bytes(raw), "/d/enc.zip", chunk=4096)
    assert out.status == "skipped"
    assert "encrypted archive member: enc.zip!secret.doc" in out.reason


def test_damaged_archive_is_scanned_as_bytes(engine: Engine) -> None:
    data = zip_bytes({"a.txt": b"x" * 5000})[:60] + b"garbage" * 10
    with engine.session() as s:
        out = scan(s, data, "/d/broken.zip", chunk=4096)
        bad_gz = scan(s, b"\x1f\x8b\x08\x00broken", "/d/broken.gz")
    assert out.status == "clean"
    assert bad_gz.status == "clean"


def test_scan_file_local(engine: Engine, tmp_path: Path) -> None:
    target = tmp_path / "eicar.txt"
    target.write_bytes(EICAR)
    with engine.session() as s:
        out = s.scan_file(target)
        missing = s.scan_file(tmp_path / "nope")
    assert out.status == "infected"
    assert out.path == str(target)
    assert missing.status == "error"
    assert "No such file" in missing.reason


def test_error_outcome_when_stream_fails(engine: Engine) -> None:
    def broken() -> Iterator[bytes]:
        yield b"abc"
        raise OSError(5, "Input/output error")

    with engine.session() as s:
        out = s.scan_stream(broken(), path="/guest/file")
    assert out.status == "error"
    assert "Input/output error" in out.reason


def test_any_producer_failure_becomes_an_error_outcome(engine: Engine) -> None:
    class DownloadBroke(Exception):
        pass

    def broken() -> Iterator[bytes]:
        yield b"abc"
        raise DownloadBroke("connection reset by guest")

    with engine.session() as s:
        out = s.scan_stream(broken(), path="/guest/file")
    assert out.status == "error"
    assert "connection reset by guest" in out.reason


def test_cached_archive_verdict_names_the_member_under_the_new_name(engine: Engine) -> None:
    data = zip_bytes({"dir/inner.com": EICAR})
    with engine.session() as s:
        first = scan(s, data, "/a/first.zip", chunk=4096)
        second = scan(s, data, "/b/second.zip", chunk=4096)
        looked_up = s.lookup(first.sha256, path="/c/third.zip")
    assert not first.cached
    assert second.cached
    assert {d.member for d in first.detections} == {"first.zip!dir/inner.com"}
    assert {d.member for d in second.detections} == {"second.zip!dir/inner.com"}
    assert looked_up is not None
    assert {d.member for d in looked_up.detections} == {"third.zip!dir/inner.com"}
