"""jaxserve.executable_cache: a second engine over the same model and shapes loads every bucket's executable from
disk (no trace, no compile), answers exactly as the first, and anything that changes the program misses."""

from __future__ import annotations

import os

import jax
import pytest

from jaxserve import executable_cache
from jaxserve.sampling import SamplingParams
from tests.engine_runs import run_all
from tests.serving import tiny_engine, tiny_gguf

PROMPTS = [[5, 9, 11, 40], [7] * 13, list(range(3, 30))]


@pytest.fixture
def cache_dir(tmp_path):
    """A fresh persistent-cache directory for this test (the suite's own is restored after)."""
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    compilation_cache.reset_cache()  # (XLA's cache binds its directory on first use)
    yield tmp_path / "xla" / executable_cache.SUBDIR
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()


def _answers(engine):
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    done = run_all(engine, PROMPTS, sp)
    return [list(done[i].outputs[0].token_ids) for i in range(len(PROMPTS))]


def test_a_warm_engine_loads_every_bucket_from_disk_and_answers_alike(tmp_path, cache_dir, monkeypatch):
    path = tiny_gguf(tmp_path)
    first = tiny_engine(path)
    entries = sorted(os.listdir(cache_dir))
    assert len(entries) == len(first.runner.buckets) and all(e.endswith(".exe") for e in entries)
    want = _answers(first)

    def no_compile(self, *args, **kwargs):
        raise AssertionError("a step bucket was lowered and compiled: the executable cache missed")

    monkeypatch.setattr(jax.stages.Lowered, "compile", no_compile)
    second = tiny_engine(path)
    monkeypatch.undo()
    assert all(r.cache_hit for r in second.runner.report)
    assert sorted(os.listdir(cache_dir)) == entries
    assert _answers(second) == want


def test_a_change_to_the_program_misses_and_a_broken_entry_is_compiled_again(tmp_path, cache_dir, monkeypatch):
    path = tiny_gguf(tmp_path)
    first = tiny_engine(path)
    want = _answers(first)
    entries = sorted(os.listdir(cache_dir))
    # another build of the runtime's sources: other keys; the lowered program is the same, so XLA's persistent
    # cache answers, and that executable is not stored (XLA:CPU would write it without its machine code)
    monkeypatch.setattr(executable_cache, "source_digest", lambda: "another build")
    other = tiny_engine(path)
    assert sorted(os.listdir(cache_dir)) == entries and all(r.cache_hit for r in other.runner.report)
    assert _answers(other) == want
    monkeypatch.undo()
    for name in entries:  # truncated entries (a crash mid-write of an older version): each a miss, removed ...
        with open(cache_dir / name, "r+b") as f:
            f.truncate(100)
    for name in os.listdir(cache_dir.parent):  # ... and, with XLA's own cache emptied, compiled and stored again
        if os.path.isfile(cache_dir.parent / name):
            os.remove(cache_dir.parent / name)
    again = tiny_engine(path)
    assert not any(r.cache_hit for r in again.runner.report)
    assert _answers(again) == want
    assert sorted(os.listdir(cache_dir)) == entries and all(os.path.getsize(cache_dir / n) > 100 for n in entries)


def test_off_without_a_persistent_cache_or_when_asked(cache_dir, monkeypatch):
    assert executable_cache.directory() == str(cache_dir)
    monkeypatch.setenv("JAXSERVE_EXECUTABLE_CACHE", "0")
    assert executable_cache.directory() is None and executable_cache.entry_path({}, ()) is None
    monkeypatch.delenv("JAXSERVE_EXECUTABLE_CACHE")
    jax.config.update("jax_compilation_cache_dir", None)  # (the fixture puts the suite's back)
    assert executable_cache.directory() is None


def test_eviction_keeps_the_directory_under_its_bound(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.exe").write_bytes(b"x" * 1000)
        os.utime(tmp_path / f"{i}.exe", (1000 + i, 1000 + i))
    executable_cache.evict(str(tmp_path), max_bytes=2500)
    assert sorted(os.listdir(tmp_path)) == ["3.exe", "4.exe"]  # the two used last


_TWO_DEVICES = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
sys.path.insert(0, sys.argv[3])
from jaxserve.sampling import SamplingParams
from tests.engine_runs import run_all
from tests.serving import tiny_engine
from tests.test_executable_cache import PROMPTS
engine = tiny_engine(sys.argv[2])
done = run_all(engine, PROMPTS, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
hits = [r.cache_hit for r in engine.runner.report]
print("RESULT " + json.dumps({"answers": [list(done[i].outputs[0].token_ids) for i in range(len(PROMPTS))],
                              "hits": hits, "devices": len(jax.devices())}))
"""


def test_an_entry_loads_onto_one_device_of_a_process_with_several(tmp_path, cache_dir):
    # A one-device executable deserialized with no devices named is loaded onto every device of the backend,
    # and then wants an argument shard on each: a process with 2 CPU devices loads this process's entries.
    import json
    import subprocess
    import sys

    path = tiny_gguf(tmp_path)
    want = _answers(tiny_engine(path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [sys.executable, "-c", _TWO_DEVICES, str(cache_dir.parent), path, root]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=root)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT ") :])
    assert got["devices"] == 2 and all(got["hits"]) and got["answers"] == want
