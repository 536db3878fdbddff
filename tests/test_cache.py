import os
import signal
import subprocess
import sys
import textwrap

import pytest

from byom_lab import cache


def test_atomic_path_renames_on_success_and_cleans_on_error(tmp_path):
    final = tmp_path / "a.bin"
    with cache.atomic_path(final) as tmp:
        tmp.write_bytes(b"done")
        assert not final.exists()
    assert final.read_bytes() == b"done"
    with pytest.raises(RuntimeError):
        with cache.atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert final.read_bytes() == b"done"  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_cached_builds_once_then_loads(tmp_home):
    calls = []
    path = cache.entry("demo", {"x": 1}) / "v.txt"

    def build(tmp):
        calls.append(1)
        tmp.write_text("42")

    assert cache.cached(path, build, lambda p: p.read_text()) == "42"
    assert cache.cached(path, build, lambda p: p.read_text()) == "42"
    assert len(calls) == 1
    assert cache.entry("demo", {"x": 1}) != cache.entry("demo", {"x": 2})


def test_corrupted_file_is_rebuilt_with_a_warning(tmp_home):
    path = cache.entry("demo", "c") / "v.txt"
    path.write_text("garbage")

    def load(p):
        value = p.read_text()
        if value != "ok":
            raise ValueError("bad header")
        return value

    with pytest.warns(UserWarning, match="unreadable.*rebuilding"):
        assert cache.cached(path, lambda tmp: tmp.write_text("ok"), load) == "ok"


def test_crash_mid_write_leaves_nothing_a_later_run_reads(tmp_home):
    """A process killed while writing leaves no final file; the next run builds it."""
    path = cache.entry("demo", "crash") / "v.txt"
    script = textwrap.dedent(f"""
        import os, time
        from byom_lab import cache
        def build(tmp):
            tmp.write_text("half")
            print("writing", flush=True)
            time.sleep(60)
        cache.cached({str(path)!r}, build, lambda p: p.read_text())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=os.environ.copy())
    assert proc.stdout.readline().strip() == b"writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not path.exists()
    leftovers = list(path.parent.glob(".*.tmp"))
    assert len(leftovers) == 1 and f".{proc.pid}." in leftovers[0].name  # the dead writer's half file
    assert cache.cached(path, lambda tmp: tmp.write_text("full"), lambda p: p.read_text()) == "full"
    assert list(path.parent.glob(".*.tmp")) == []  # swept when the lock was taken


def test_sweep_keeps_live_writers_and_foreign_files(tmp_path):
    live = tmp_path / f".a.bin.{os.getpid()}.abcdefgh.tmp"
    dead = tmp_path / ".b.bin.999999999.abcdefgh.tmp"  # no such pid
    unnamed = tmp_path / ".c.bin.abcdefgh.tmp"  # an older writer's name, without a pid
    other = tmp_path / "notes.tmp"  # not a hidden temp of ours
    for f in (live, dead, unnamed, other):
        f.write_text("x")
    assert sorted(p.name for p in cache.sweep_stale(tmp_path)) == sorted([dead.name, unnamed.name])
    assert live.exists() and other.exists() and not dead.exists() and not unnamed.exists()


def test_concurrent_builders_build_once(tmp_home):
    path = cache.entry("demo", "lock") / "v.txt"
    marker = tmp_home / "builds.log"
    script = textwrap.dedent(f"""
        import time
        from byom_lab import cache
        def build(tmp):
            with open({str(marker)!r}, "a") as f:
                f.write("x")
            time.sleep(0.5)
            tmp.write_text("v")
        print(cache.cached({str(path)!r}, build, lambda p: p.read_text()))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=os.environ.copy()) for _ in range(2)]
    outs = [p.communicate()[0].strip() for p in procs]
    assert outs == [b"v", b"v"]
    assert marker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_home_is_a_clear_error(tmp_path, monkeypatch):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    monkeypatch.setenv("BYOM_LAB_HOME", str(locked / "cache"))
    with pytest.raises(cache.CacheError, match="cannot create cache directory"):
        cache.home()


def test_home_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("BYOM_LAB_HOME", str(blocker / "cache"))
    with pytest.raises(cache.CacheError, match="BYOM_LAB_HOME"):
        cache.home()
