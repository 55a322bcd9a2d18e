"""The event monitor: Cloud Hypervisor's line format, the history, waiting. No KVM needed."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from vmmpy.errors import InvalidConfig
from vmmpy.event_output import parse_event_monitor
from vmmpy.events import EventMonitor


def read_lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_line_format_like_cloud_hypervisor(tmp_path):
    path = tmp_path / "events.json"
    with EventMonitor(path=str(path)) as mon:
        mon.emit("vmm", "starting")
        mon.emit("vm", "booted", {"id": "0"})
        assert mon.flush()
        lines = read_lines(path)
    assert [list(line) for line in lines] == [["timestamp", "source", "event", "properties"]] * 2
    first, second = lines
    assert (first["source"], first["event"], first["properties"]) == ("vmm", "starting", None)
    assert (second["source"], second["event"], second["properties"]) == ("vm", "booted", {"id": "0"})
    for line in lines:
        ts = line["timestamp"]
        assert set(ts) == {"secs", "nanos"}
        assert isinstance(ts["secs"], int) and isinstance(ts["nanos"], int)
        assert 0 <= ts["nanos"] < 1_000_000_000
    as_ns = [ln["timestamp"]["secs"] * 10**9 + ln["timestamp"]["nanos"] for ln in lines]
    assert as_ns == sorted(as_ns) and as_ns[0] < 5 * 10**9  # time since the monitor was made


def test_timestamps_count_from_the_given_start():
    # The vmmpy command creates its monitor after the VM booted: its events count from its start.
    mon = EventMonitor(started_ns=time.monotonic_ns() - 3_000_000_000)
    assert mon.emit("vmm", "starting")["timestamp"]["secs"] >= 3
    assert EventMonitor().emit("vmm", "starting")["timestamp"]["secs"] == 0


def test_path_is_truncated(tmp_path):
    path = tmp_path / "events.json"
    path.write_text("old junk\n")
    with EventMonitor(path=str(path)) as mon:
        mon.emit("vm", "booted")
    assert [e["event"] for e in read_lines(path)] == ["booted"]


def test_seq_history_and_filter():
    mon = EventMonitor()
    assert mon.seq == 0
    a = mon.emit("vm", "booting")
    b = mon.emit("vm", "booted")
    c = mon.emit("vm", "booted", {"n": 2})
    assert (a["seq"], b["seq"], c["seq"]) == (0, 1, 2)
    assert mon.seq == 3
    assert [e["seq"] for e in mon.events()] == [0, 1, 2]
    assert [e["seq"] for e in mon.events("vm.booted")] == [1, 2]
    assert mon.events("vmm.shutdown") == []
    # Copies: mutating what we got does not touch the history.
    mon.events()[0]["event"] = "changed"
    assert mon.events()[0]["event"] == "booting"


def test_history_is_bounded():
    mon = EventMonitor(history=5)
    for i in range(12):
        mon.emit("vm", "tick", {"i": i})
    assert [e["seq"] for e in mon.events()] == [7, 8, 9, 10, 11]
    assert mon.seq == 12


def test_default_history_bound_is_10000():
    mon = EventMonitor()
    for _ in range(10_050):
        mon.emit("vm", "tick")
    events = mon.events()
    assert len(events) == 10_000 and events[0]["seq"] == 50


def test_wait_for_event_already_emitted_and_after():
    mon = EventMonitor()
    mon.emit("vm", "paused")
    mark = mon.seq
    assert mon.wait_for_event("vm.paused", timeout=0)["seq"] == 0
    with pytest.raises(TimeoutError, match=r"vm\.paused"):
        mon.wait_for_event("vm.paused", timeout=0.05, after=mark)
    mon.emit("vm", "paused")
    assert mon.wait_for_event("vm.paused", timeout=1, after=mark)["seq"] == 1


def test_wait_for_event_from_another_thread():
    mon = EventMonitor()
    mark = mon.seq

    def later():
        time.sleep(0.1)
        mon.emit("vm", "resumed")
        mon.emit("vm", "shutdown", {"reason": "guest"})

    t = threading.Thread(target=later)
    t.start()
    started = time.monotonic()
    ev = mon.wait_for_event("vm.shutdown", timeout=5, after=mark)
    t.join()
    assert ev["properties"] == {"reason": "guest"} and ev["seq"] == 1
    assert time.monotonic() - started < 2


def test_wait_for_event_timeout_names_event():
    mon = EventMonitor()
    mon.emit("vm", "booted")
    started = time.monotonic()
    with pytest.raises(TimeoutError) as e:
        mon.wait_for_event("vm.shutdown", timeout=0.2)
    assert "vm.shutdown" in str(e.value)
    assert 0.15 <= time.monotonic() - started < 2


def test_wait_for_event_source_must_match():
    mon = EventMonitor()
    mon.emit("vmm", "shutdown")
    with pytest.raises(TimeoutError):
        mon.wait_for_event("vm.shutdown", timeout=0.05)
    assert mon.wait_for_event("vmm.shutdown", timeout=0)["source"] == "vmm"


def test_wait_for_event_predicate_may_emit():
    mon = EventMonitor()
    seen = []

    def predicate(ev):
        seen.append(ev["seq"])
        mon.emit("test", "predicate-ran")  # would deadlock if called under the lock
        return ev["properties"]["n"] == 3

    def producer():
        for n in range(5):
            mon.emit("vm", "tick", {"n": n})
            time.sleep(0.01)

    t = threading.Thread(target=producer)
    t.start()
    ev = mon.wait_for_event("vm.tick", timeout=5, predicate=predicate)
    t.join()
    assert ev["properties"] == {"n": 3}
    assert seen == sorted(seen)


def test_wait_for_event_bad_name():
    mon = EventMonitor()
    for bad in ("shutdown", ".shutdown", "vm."):
        with pytest.raises(ValueError):
            mon.wait_for_event(bad, timeout=0)


def test_concurrent_emitters_and_file_order(tmp_path):
    path = tmp_path / "events.json"
    mon = EventMonitor(path=str(path))
    per_thread = 300

    def work(k):
        for i in range(per_thread):
            mon.emit("t", f"e{k}", {"i": i})

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mon.close()
    lines = read_lines(path)
    assert len(lines) == 8 * per_thread == mon.seq
    # The file is in sequence order: it matches the history, event for event.
    history = mon.events()
    assert [(e["event"], e["properties"]) for e in lines] == [(e["event"], e["properties"]) for e in history]
    for k in range(8):  # each thread's events in its own order
        assert [e["properties"]["i"] for e in lines if e["event"] == f"e{k}"] == list(range(per_thread))


def test_fd_output_and_ownership():
    r, w = os.pipe()
    try:
        mon = EventMonitor(fd=w, owns_fd=False)
        mon.emit("vm", "booted")
        mon.close()
        os.fstat(w)  # still open: not ours to close
        line = os.read(r, 4096).decode()
        assert line.endswith("\n") and json.loads(line)["event"] == "booted"
    finally:
        os.close(w)
    mon = EventMonitor(fd=os.dup(r))
    fd = mon._fd
    mon.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # owned by default: closed
    os.close(r)


def test_fifo_path(tmp_path):
    fifo = str(tmp_path / "events.fifo")
    os.mkfifo(fifo)
    got: list[str] = []

    def reader():
        with open(fifo, encoding="utf-8") as f:
            got.extend(f.read().splitlines())

    t = threading.Thread(target=reader)
    t.start()
    mon = EventMonitor(path=fifo)  # blocks until the reader opened it
    mon.emit("vmm", "starting")
    mon.emit("vmm", "shutdown")
    mon.close()
    t.join(5)
    assert [json.loads(line)["event"] for line in got] == ["starting", "shutdown"]


def test_broken_output_keeps_history():
    r, w = os.pipe()
    mon = EventMonitor(fd=w)
    os.close(r)  # the reader went away: writes fail with EPIPE
    mon.emit("vm", "booted")
    mon.emit("vm", "shutdown")
    assert [e["event"] for e in mon.events()] == ["booted", "shutdown"]
    mon.close()


def test_close_is_idempotent_and_history_survives(tmp_path):
    path = tmp_path / "e.json"
    mon = EventMonitor(path=str(path))
    mon.emit("vm", "booted")
    mon.close()
    mon.close()
    mon.emit("vm", "shutdown")  # after close: history only
    assert [e["event"] for e in read_lines(path)] == ["booted"]
    assert mon.wait_for_event("vm.shutdown", timeout=0)["seq"] == 1


def test_bad_construction(tmp_path):
    with pytest.raises(InvalidConfig, match="not both"):
        EventMonitor(path=str(tmp_path / "x"), fd=1)
    missing = str(tmp_path / "no" / "such" / "dir" / "events.json")
    with pytest.raises(InvalidConfig) as e:
        EventMonitor(path=missing)
    assert missing in str(e.value)
    with pytest.raises(InvalidConfig, match="fd=987654"):
        EventMonitor(fd=987654)
    with pytest.raises(InvalidConfig, match="fd=-1"):
        EventMonitor(fd=-1)


def test_parse_event_monitor():
    assert parse_event_monitor("path=/tmp/ev.json") == {"path": "/tmp/ev.json"}
    assert parse_event_monitor("fd=3") == {"fd": 3}
    assert parse_event_monitor("/tmp/ev.json") == {"path": "/tmp/ev.json"}
    for bad, fragment in [
        ("fd=x", "fd='x'"),
        ("fd=", "fd=''"),
        ("path=", "'path='"),
        ("foo=bar", "'foo=bar'"),
        ("path=/a,fd=3", "'path=/a,fd=3'"),
        ("", "empty value"),
    ]:
        with pytest.raises(InvalidConfig) as e:
            parse_event_monitor(bad)
        assert fragment in str(e.value), (bad, str(e.value))


def test_a_reader_that_never_reads_does_not_block_the_emitter(tmp_path):
    """CH's event monitor shape: a stalled FIFO reader stalls only the monitor's writer thread;
    once its queue is full, lines are dropped and counted, and close() still ends in time."""
    fifo = str(tmp_path / "events.fifo")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read
    try:
        mon = EventMonitor(path=fifo, queue_limit=64)
        lines = 1000  # 4 KiB each: the queue alone (256 KiB) holds more than the pipe (64 KiB)
        done = threading.Event()
        pad = "x" * 4096
        threading.Thread(
            target=lambda: ([mon.emit("vm", "tick", {"i": i, "pad": pad}) for i in range(lines)], done.set()),
            daemon=True,
        ).start()
        assert done.wait(60), "emit blocked on a reader that does not read"
        assert mon.seq == lines  # the history has every event
        assert mon.dropped > 0
        assert not mon.flush(timeout=0.2)
        t0 = time.monotonic()
        mon.close(grace=0.5)
        assert time.monotonic() - t0 < 30
        assert mon._writer is None and mon._fd is None
    finally:
        os.close(reader)
