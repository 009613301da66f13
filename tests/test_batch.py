"""Batch jobs over the fake engine (tests.fake_engine) and the tiny model: both line forms, the error file for mixed
good and bad lines, bounded lazy feeding, resume after a torn write and after SIGKILL at a random point (every id
exactly once, the same greedy outputs), and two jax.distributed processes whose merged shards equal a single-process
run."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxserve.batch import BatchJob, errors_path_for, merge, recover
from tests.serving import fake_engine, tiny_engine, tiny_engine_flags, tiny_gguf

ENGINE_FLAGS = [
    *tiny_engine_flags(),
    "--quiet",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(model_path):
    """The fake engine (no model compiled): the job's own logic."""
    return fake_engine(model_path)


@pytest.fixture(scope="module")
def tiny(model_path):
    """The tiny model's engine: the in-process reference for the `jaxserve batch` processes."""
    return tiny_engine(model_path)


def plain(i, **extra):
    return {
        "id": f"p{i}",
        "prompt": f"item {i} " * (1 + i % 5),
        "max_tokens": 6 + i % 7,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def by_id(path):
    """Records by id, less what depends on the run rather than the request (prefix-cache hits)."""
    records = {}
    for r in recover(path):
        r["usage"].pop("cached_tokens")
        records[r["id"]] = r
    return records


def run_job(engine, inp, out, **kw):
    kw = {"model_name": "tiny", "model_version": "1", **kw}  # (what `jaxserve batch --model PATH` writes)
    return BatchJob(engine, inp, out, progress=False, flush_interval=0.0, **kw).run()


MIXED = [
    plain(0, return_token_ids=True),
    "this is not json",
    plain(1),
    {"id": "p0", "prompt": "a duplicate id"},
    {"id": "t", "prompt": "x", "temperature": -1},
    {"id": "u", "prompt": "x", "colour": "blue"},
    {"prompt": "no id"},
    {"id": "both", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
    {"id": "long", "prompt": [5] * 200},
    {"id": "ctx", "prompt": "x", "max_tokens": 500},
    {
        "custom_id": "c1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0},
    },
    {"custom_id": "c2", "method": "POST", "url": "/v1/embeddings", "body": {}},
    {"custom_id": "c3", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi", "n": 0}},
    {
        "custom_id": "c4",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"prompt": "hi", "max_tokens": 3},
        "extra": 1,
    },
    {
        "custom_id": "c5",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"prompt": "hi", "max_tokens": 3, "temperature": 0, "return_token_ids": True},
    },
    {"custom_id": "c6", "method": "POST", "url": "/v1/completions", "body": {"prompt": ["a", "b"]}},
]
EXPECTED_ERRORS = {  # line -> (id, param, words)
    2: (None, "body", "malformed JSON"),
    4: ("p0", "id", "duplicate id 'p0' (first on line 1)"),
    5: ("t", "temperature", "[0, 100]"),
    6: ("u", "colour", "unknown field"),
    7: (None, "id", "non-empty string"),
    8: ("both", "prompt", "exactly one of prompt or messages"),
    9: ("long", "prompt", "exceeds the limit of 128"),
    10: ("ctx", "max_tokens", "context is 128 tokens"),
    12: ("c2", "url", "must be one of"),
    13: ("c3", "n", "[1, 64]"),
    14: ("c4", "extra", "unknown field"),
    16: ("c6", "prompt", "one prompt per batch line"),
}


def test_mixed_good_and_bad_lines(engine, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", MIXED)
    out = str(tmp_path / "out.jsonl")
    summary = run_job(engine, inp, out)
    assert summary.done == 4 and summary.errors == len(EXPECTED_ERRORS)
    errors = recover(errors_path_for(out), errors=True)
    assert errors_path_for(out) == str(tmp_path / "out.errors.jsonl")
    assert sorted(e["line"] for e in errors) == sorted(EXPECTED_ERRORS)
    for e in errors:
        key, param, words = EXPECTED_ERRORS[e["line"]]
        got_key = e.get("custom_id", e["id"]) if "custom_id" in e else e["id"]
        assert (got_key, e["error"]["param"]) == (key, param), e
        assert words in e["error"]["message"], e
        if "custom_id" in e:  # the OpenAI batch form of an error line
            assert e["response"]["status_code"] == 400 and e["response"]["body"]["error"] == e["error"]
    results = {r.get("custom_id", r.get("id")): r for r in recover(out)}
    assert sorted(results) == ["c1", "c5", "p0", "p1"]
    p0 = results["p0"]
    assert p0["finish_reason"] == "length" and len(p0["token_ids"]) == 6 == p0["usage"]["completion_tokens"]
    assert p0["text"] == engine.tokenizer.decode(p0["token_ids"], skip_special_tokens=True)
    assert "token_ids" not in results["p1"]
    c1 = results["c1"]["response"]
    assert c1["status_code"] == 200 and c1["body"]["object"] == "chat.completion"
    assert (c1["body"]["model"], c1["body"]["model_version"], p0["model_version"]) == ("tiny", "1", "1")
    assert c1["body"]["usage"]["completion_tokens"] == 5
    c5 = results["c5"]["response"]["body"]
    assert c5["object"] == "text_completion" and len(c5["choices"][0]["token_ids"]) == 3
    assert not engine.has_unfinished_requests()


def _in_flight(engine) -> int:
    stats = engine.stats()
    return stats.num_waiting + stats.num_running


def test_feeding_is_bounded_and_results_match_the_python_api(engine, tmp_path, monkeypatch):
    from jaxserve.llm import LLM
    from jaxserve.sampling import SamplingParams

    rows = [plain(i) for i in range(60)]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), str(tmp_path / "out.jsonl")
    job = BatchJob(engine, inp, out, progress=False, model_name="tiny")
    most = []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (most.append(_in_flight(engine)), step())[1])
    assert job.run().done == 60
    assert max(most) <= job.max_pending < 60  # the file is never read ahead beyond the bound
    monkeypatch.undo()
    results = by_id(out)
    llm = LLM.from_engine(engine)
    expected = llm.generate(
        [r["prompt"] for r in rows],
        [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True) for r in rows],
        use_tqdm=False,
    )
    assert [results[r["id"]]["text"] for r in rows] == [o.outputs[0].text for o in expected]


def test_resume_cuts_a_torn_line_and_skips_done_ids(engine, tmp_path):
    rows = [plain(i) for i in range(12)] + ["not json"]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    full = str(tmp_path / "full.jsonl")
    run_job(engine, inp, full)
    out = str(tmp_path / "out.jsonl")
    done = recover(full)[:5]
    with open(out, "w") as f:  # a run killed mid-write: five whole lines and half of a sixth
        f.writelines(json.dumps(r) + "\n" for r in done)
        f.write(json.dumps(recover(full)[5])[:17])
    write_jsonl(errors_path_for(out), [{"line": 13, "id": None, "error": {"message": "x", "param": "body"}}])
    summary = run_job(engine, inp, out)
    assert (summary.done, summary.skipped, summary.errors) == (7, 5, 0)  # the bad line is not reported twice
    assert by_id(out) == by_id(full)
    assert len(recover(out)) == 12 and len(recover(errors_path_for(out), errors=True)) == 1


def _batch_cmd(model_path, inp, out, *extra):
    return [
        sys.executable,
        "-m",
        "jaxserve.cli",
        "batch",
        "--input",
        inp,
        "--output",
        out,
        "--model",
        model_path,
        *ENGINE_FLAGS,
        *extra,
    ]


def _count_lines(path):
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def test_resume_over_a_corrupted_output_never_crashes(engine, tmp_path):
    """Issue 15 item 12: null lines, non-string ids, errors without a line and NUL bytes in the output files are
    reported as corrupted and skipped; no id is marked done by one; each id ends up with one good record."""
    rows = [plain(i) for i in range(8)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = str(tmp_path / "out.jsonl")
    run_job(engine, inp, out)
    good = recover(out)
    with open(out, "wb") as f:  # three good records survive; the rest is damage
        f.writelines(json.dumps(r).encode() + b"\n" for r in good[:3])
        f.write(b"null\n[1, 2]\n" + json.dumps({"id": 5, "text": "x"}).encode() + b"\n")
        f.write(b'{"id": "p4", "te\x00\x00xt": \x00}\n' + json.dumps({"text": "no id"}).encode() + b"\n")
    write_jsonl(errors_path_for(out), [{"id": "p9", "error": {}}, "null", {"line": "3"}])
    summary = run_job(engine, inp, out)
    assert summary.corrupted == 8 and summary.skipped == 3 and summary.done == 5, summary.describe()
    assert "8 corrupted" in summary.describe()
    records = recover(out)
    keys = [r["id"] for r in records]
    assert sorted(keys) == sorted(r["id"] for r in rows) and len(keys) == len(set(keys))  # each id once
    assert {r["id"]: r["text"] for r in records} == {r["id"]: r["text"] for r in good}


def test_an_output_named_like_an_errors_file_resumes(engine, tmp_path):
    """Which kind of file is read comes from the caller, not the file's name: an output called *.errors.jsonl
    is read as outputs (its ids are done), so a rerun skips them all."""
    inp = write_jsonl(tmp_path / "in.jsonl", [plain(i) for i in range(4)])
    out = str(tmp_path / "results.errors.jsonl")
    assert run_job(engine, inp, out).done == 4
    again = run_job(engine, inp, out)
    assert (again.done, again.skipped, again.corrupted) == (0, 4, 0), again.describe()


def test_a_second_job_on_the_same_output_is_refused(engine, tmp_path):
    from jaxserve.batch import OutputLockedError, _lock

    inp = write_jsonl(tmp_path / "in.jsonl", [plain(i) for i in range(3)])
    out = str(tmp_path / "out.jsonl")
    held = _lock(out)  # another job's lock on the output
    try:
        with pytest.raises(OutputLockedError, match="another batch job"):
            run_job(engine, inp, out)
    finally:
        held.close()
    assert run_job(engine, inp, out).done == 3  # free again


def test_sigkill_at_a_random_point_then_rerun(model_path, tiny, tmp_path):
    """Kill -9 once a random number of results are on disk, rerun: every id exactly once, identical outputs."""
    rows = [plain(i, max_tokens=24) for i in range(160)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    reference = str(tmp_path / "reference.jsonl")
    run_job(tiny, inp, reference)
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randrange(1, 150)
    out = str(tmp_path / "out.jsonl")
    # --max-num-seqs 2: few requests at a time, so results trickle out and the kill lands mid-run.
    cmd = _batch_cmd(model_path, inp, out, "--flush-interval", "0")
    cmd[cmd.index("--max-num-seqs") + 1] = "2"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while _count_lines(out) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = _count_lines(out)
    assert written < len(rows), f"the job finished before the kill (seed {seed}); nothing was tested"
    rerun = subprocess.run(_batch_cmd(model_path, inp, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    ids = [r["id"] for r in recover(out)]
    assert sorted(ids) == sorted(r["id"] for r in rows), f"seed {seed}"  # each exactly once
    assert by_id(out) == by_id(reference), f"seed {seed}"


def test_two_processes_with_jax_distributed_then_merge(model_path, tiny, tmp_path):
    rows = [plain(i) for i in range(40)] + [MIXED[1], MIXED[3], MIXED[4]]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    single = str(tmp_path / "single.jsonl")
    run_job(tiny, inp, single, model_version="7")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "out.jsonl")
    procs = [
        subprocess.Popen(
            _batch_cmd(
                f"tiny={model_path}@7",  # the results name this version
                inp,
                out,
                "--shard",
                "auto",
                "--coordinator-address",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--allow-errors",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    shard_counts = [len(recover(f"{out}.shard-{i}-of-2")) for i in range(2)]
    assert sum(shard_counts) == 40 and min(shard_counts) > 0, shard_counts  # both did work
    written, errors, missing = merge(inp, out)
    assert (written, errors, missing) == (40, 3, [])
    assert [r["id"] for r in recover(out)] == [r["id"] for r in rows[:40]]  # input order
    assert by_id(out) == by_id(single)
    assert {r["model_version"] for r in recover(out)} == {"7"}
    assert recover(errors_path_for(out), errors=True) == recover(errors_path_for(single), errors=True)


def test_cut_torn_tail(tmp_path):
    from jaxserve.batch import cut_torn_tail

    path = tmp_path / "x.jsonl"
    line = b'{"id": "a"}\n'
    for tail, kept in [(b"", line * 3), (b'{"id": "b", "te', line * 3), (b"\n", line * 3 + b"\n")]:
        path.write_bytes(line * 3 + tail)
        cut_torn_tail(str(path), block=5)  # blocks smaller than a line: the backwards scan crosses them
        assert path.read_bytes() == kept
    path.write_bytes(b'{"id": "only a torn line')
    cut_torn_tail(str(path), block=4)
    assert path.read_bytes() == b""
