"""Forwarding the audit log to a SIEM: real syslog receivers on loopback (TCP, TLS, UDP).

The receivers are plain sockets in this process that record what arrives; the audit log is
a real one in a temporary state directory; the CLI runs as a subprocess.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from appliance_support import self_signed

from vsphere_av import config, errors
from vsphere_av.config import SiemSettings
from vsphere_av.store.audit import AuditLog
from vsphere_av.store.siem import Forwarder, frame, message, unframe


class Receiver:
    """A syslog receiver on 127.0.0.1: TCP (optionally TLS) or UDP; keeps the raw bytes."""

    def __init__(self, kind: str, directory: Path | None = None) -> None:
        self.kind = kind
        self.data = bytearray()
        self.datagrams: list[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if kind == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.tls: ssl.SSLContext | None = None
        if kind == "tls":
            assert directory is not None
            self.cert, key, _ = self_signed(directory)
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(self.cert, key)
        if kind != "udp":
            self.sock.listen()
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def target(self) -> str:
        return f"{self.kind}://127.0.0.1:{self.port}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.kind == "udp":
                    datagram = self.sock.recv(65536)
                    with self._lock:
                        self.datagrams.append(datagram)
                    continue
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            while chunk := conn.recv(65536):
                with self._lock:
                    self.data += chunk
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def messages(self) -> list[bytes]:
        """Octet-counted frames received so far (datagrams for UDP)."""
        with self._lock:
            if self.kind == "udp":
                return list(self.datagrams)
            data = bytes(self.data)
        out = unframe(data)
        rest = data[sum(len(str(len(m))) + 1 + len(m) for m in out):]
        assert re.fullmatch(rb"\d*|\d+ .*", rest, re.S), rest[:80]   # only a frame arriving
        return out

    def wait_for(self, count: int) -> list[bytes]:
        for _ in range(100):
            got = self.messages()
            if len(got) >= count:
                return got
            self._stop.wait(0.05)
        return self.messages()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    with AuditLog.open(state) as log:
        for i in range(5):
            log.append(actor="tester", action="detection" if i == 2 else "scan.start",
                       details={"vm": f"vm{i}", "threat": "EICAR-Test-File" if i == 2 else ""})
    return state


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for r in made:
        r.close()


def _parse(msg: bytes) -> dict:
    head = re.match(rb"<(\d+)>1 (\S+) (\S+) vsphere-av - (\S+) - (.*)$", msg, re.S)
    assert head, msg[:120]
    return {"pri": int(head.group(1)), "time": head.group(2).decode(),
            "host": head.group(3).decode(), "msgid": head.group(4).decode(),
            "body": head.group(5).decode()}


def test_tcp_forwarding_sends_each_entry_once_in_order_and_resumes(state, receivers):
    rx = Receiver("tcp")
    receivers.append(rx)
    fwd = Forwarder(settings=SiemSettings(target=rx.target), state_dir=state, hostname="ctl01")
    assert fwd.forward() == 6                        # the 5 entries and a checkpoint
    got = [_parse(m) for m in rx.wait_for(6)]
    assert [g["msgid"] for g in got] == (["scan.start"] * 2 + ["detection"] + ["scan.start"] * 2
                                         + ["audit.checkpoint"])
    assert all(g["host"] == "ctl01" for g in got)
    assert all(g["body"].startswith("CEF:0|vsphere-av|vsphere-av|") for g in got)
    seqs = [int(re.search(r"cs1=(\d+)", g["body"]).group(1)) for g in got]
    assert seqs == [1, 2, 3, 4, 5, 6]
    assert got[2]["pri"] == 13 * 8 + 2               # log audit, critical: a detection
    assert got[0]["pri"] == 13 * 8 + 6               # informational: a scan start
    assert fwd.cursor().seq == 6

    assert fwd.forward() == 0                        # nothing new: nothing sent
    with AuditLog.open(state) as log:
        log.append(actor="tester", action="quarantine.restore", details={"vm": "vm9"})
    fwd.close()
    again = Forwarder(settings=SiemSettings(target=rx.target), state_dir=state, hostname="x")
    assert again.forward() == 2                      # a new process resumes at the cursor
    again.close()
    assert len(rx.wait_for(8)) == 8
    assert [_parse(m)["msgid"] for m in rx.messages()[-2:]] == ["quarantine.restore",
                                                               "audit.checkpoint"]


def test_tls_is_verified_and_a_failure_keeps_the_cursor(state, receivers, tmp_path):
    rx = Receiver("tls", tmp_path)
    receivers.append(rx)
    untrusted = Forwarder(settings=SiemSettings(target=rx.target), state_dir=state)
    with pytest.raises(errors.TlsVerificationError, match="certificate did not verify"):
        untrusted.forward()                          # the system store does not know it
    assert untrusted.cursor().seq == 0
    trusted = Forwarder(settings=SiemSettings(target=rx.target, ca_file=str(rx.cert),
                                              format="jsonl", framing="newline"),
                        state_dir=state)
    assert trusted.forward() == 6
    trusted.close()
    for _ in range(100):
        if rx.data.count(b"\n") >= 6:
            break
        threading.Event().wait(0.05)
    lines = bytes(rx.data).splitlines()
    assert len(lines) == 6
    bodies = [json.loads(_parse(line)["body"]) for line in lines]
    assert [b["seq"] for b in bodies] == [1, 2, 3, 4, 5, 6]
    assert bodies[2]["details"]["threat"] == "EICAR-Test-File"
    assert bodies[5]["details"] == {"head_seq": 5, "head_hash": bodies[4]["hash"]}


def test_udp_and_a_receiver_that_is_down(state, receivers, tmp_path):
    rx = Receiver("udp")
    receivers.append(rx)
    fwd = Forwarder(settings=SiemSettings(target=rx.target), state_dir=state)
    assert fwd.forward() == 6
    assert len(rx.wait_for(6)) == 6
    fwd.close()

    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    other = tmp_path / "other"
    with AuditLog.open(other) as log:
        log.append(actor="tester", action="scan.start", details={"vm": "a"})
    down = Forwarder(settings=SiemSettings(target=f"tcp://127.0.0.1:{port}"), state_dir=other)
    with pytest.raises(errors.TransientError, match="refused"):
        down.forward()
    assert down.cursor().seq == 0                    # nothing lost: sent on the next round


def test_a_rewritten_log_stops_forwarding(state, receivers, tmp_path):
    rx = Receiver("tcp")
    receivers.append(rx)
    fwd = Forwarder(settings=SiemSettings(target=rx.target), state_dir=state)
    assert fwd.forward() == 6
    fwd.close()
    cursor = state / "siem-cursor.json"
    doc = json.loads(cursor.read_text())
    doc["hash"] = "0" * 64                           # as if entry 6 had been rewritten
    cursor.write_text(json.dumps(doc))
    with pytest.raises(errors.AuditIntegrityError, match="replaced or rewritten"):
        fwd.forward()


def test_a_checkpoint_whose_sending_failed_is_sent_without_another(state, receivers):
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    down = Forwarder(settings=SiemSettings(target=f"tcp://127.0.0.1:{port}"), state_dir=state)
    with pytest.raises(errors.TransientError):
        down.forward()
    with AuditLog.open(state) as log:
        assert [e.action for e in log.entries(after=5)] == ["audit.checkpoint"]
    rx = Receiver("tcp")
    receivers.append(rx)
    fwd = Forwarder(settings=SiemSettings(target=rx.target), state_dir=state)
    assert fwd.forward() == 6                        # the entries and that one checkpoint
    assert fwd.forward() == 0                        # checkpoints alone start no round
    fwd.close()
    with AuditLog.open(state) as log:
        assert log.head()[0] == 6
    assert [_parse(m)["msgid"] for m in rx.wait_for(6)][-1] == "audit.checkpoint"


def _cef(msg: bytes, key: str) -> str:
    found = re.search(rf"\b{key}=(\S+)", _parse(msg)["body"])
    assert found, msg[:200]
    return found.group(1)


def test_a_checkpoint_kept_at_the_siem_catches_a_cut_tail(state, receivers, tmp_path):
    rx = Receiver("tcp")
    receivers.append(rx)
    fwd = Forwarder(settings=SiemSettings(target=rx.target), state_dir=state)
    fwd.forward()
    with AuditLog.open(state) as log:
        log.append(actor="tester", action="detection", details={"vm": "vm7", "threat": "X"})
        log.append(actor="tester", action="quarantine.purge", details={"id": "ab12"})
    assert fwd.forward() == 3
    fwd.close()
    last = rx.wait_for(9)[-1]                        # what the SIEM keeps: the last checkpoint
    assert _parse(last)["msgid"] == "audit.checkpoint"
    kept = f"{_cef(last, 'cs1')}:{_cef(last, 'cs2')}"
    assert kept.startswith("9:")

    env = {**os.environ, "VSPHERE_AV_STATE_DIR": str(state)}
    env.pop("VSPHERE_AV_CONFIG", None)
    verify = [sys.executable, "-m", "vsphere_av", "audit", "verify"]
    ok = subprocess.run([*verify, "--head", kept], env=env, capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stderr

    # Someone holding the service account cuts the detection and what followed, and rewrites
    # both head records and the SIEM cursor to match: the box alone cannot tell.
    db = sqlite3.connect(state / "audit.sqlite")
    db.execute("DELETE FROM audit WHERE seq > 6")
    digest = db.execute("SELECT hash FROM audit WHERE seq = 6").fetchone()[0]
    db.execute("UPDATE audit_head SET seq = 6, hash = ?", (digest,))
    db.commit()
    db.close()
    (state / "audit.head").write_text(f"6 {digest}\n")
    (state / "siem-cursor.json").write_text(json.dumps({"seq": 6, "hash": digest}))
    alone = subprocess.run(verify, env=env, capture_output=True, text=True, timeout=60)
    assert alone.returncode == 0, alone.stderr
    cut = subprocess.run([*verify, "--head", kept], env=env, capture_output=True, text=True,
                         timeout=60)
    assert cut.returncode == 2
    assert cut.stderr.strip() == ("vsphere-av: error: audit log broken at entry 7: the kept "
                                  "head names entry 9, but the log ends at entry 6: entries "
                                  "were removed")


def test_framing_and_message_shapes(tmp_path):
    with AuditLog.open(tmp_path / "state") as log:
        entry = log.append(actor="a", action="scan.start", details={"vm": "v\nm"})
    msg = message(entry, fmt="cef", hostname="h")
    assert b"\n" not in msg
    assert frame(msg, framing="octet-counting") == str(len(msg)).encode() + b" " + msg
    assert frame(b"a\nb", framing="newline") == b"a b\n"
    both = frame(msg, framing="octet-counting") + frame(b"x y", framing="octet-counting")
    assert unframe(both + b"12 part") == [msg, b"x y"]     # a frame still arriving waits


@pytest.mark.parametrize(("toml", "error"), [
    ('[siem]\ntarget = "http://siem:514"\n', "must look like tls://HOST:PORT"),
    ('[siem]\ntarget = "tls://user:pw@siem:6514"\n', "must not carry a user or password"),
    ('[siem]\ntarget = "tls://siem:6514"\nformat = "leef"\n', "siem.format must be cef or jsonl"),
    ('[siem]\ntarget = "tcp://siem"\nframing = "rfc3164"\n', "siem.framing must be"),
    ('[siem]\ninterval = 0\n', "siem.interval must be more than 0"),
])
def test_bad_siem_settings_are_one_clear_error(tmp_path, toml, error):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(errors.ConfigError, match=error):
        config.load(config_file=path, env={"VSPHERE_AV_STATE_DIR": str(tmp_path / "s")})


def test_cli_forward(state, receivers, tmp_path):
    rx = Receiver("tcp")
    receivers.append(rx)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[siem]\ntarget = "{rx.target}"\n')
    env = {**os.environ, "VSPHERE_AV_STATE_DIR": str(state), "VSPHERE_AV_CONFIG": str(cfg)}
    cli = [sys.executable, "-m", "vsphere_av", "audit", "forward"]
    out = subprocess.run([*cli, "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"target": rx.target, "sent": 6, "last_seq": 6}
    assert len(rx.wait_for(6)) == 6
    cfg.write_text("")
    out = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == "vsphere-av: error: siem.target is not set: nothing to forward to"


def test_serve_forwards_as_it_runs_and_when_it_stops(vcsim_factory, receivers, tmp_path):
    from conftest import settings_for
    from controller_support import running_controller, wait_for

    sim = vcsim_factory(hosts=1, vms=1)
    rx = Receiver("tcp")
    receivers.append(rx)
    settings = settings_for(sim, tmp_path / "state",
                            toml=f'[siem]\ntarget = "{rx.target}"\ninterval = 0.2\n')
    with running_controller(settings):
        wait_for(lambda: any(_parse(m)["msgid"] == "controller.start" for m in rx.messages()),
                 timeout=20, what="controller.start at the SIEM")
    with AuditLog.open(settings.state_dir) as log:
        actions = [e.action for e in log.entries()]
    assert actions[-2:] == ["controller.stop", "audit.checkpoint"]
    # Rounds every 0.2 s: a checkpoint only ever follows something new, never a checkpoint.
    assert all(a != "audit.checkpoint" or b != "audit.checkpoint"
               for a, b in itertools.pairwise(actions))
    got = [_parse(m)["msgid"] for m in rx.wait_for(len(actions))]
    assert got == actions                            # every entry, each once, in order
