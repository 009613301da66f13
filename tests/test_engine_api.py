"""The one engine interface (jaxserve.engine_api.Engine): every engine implements it, and the HTTP and gRPC
servers, the batch job and the metrics run over the fake engine (tests/fake_engine.py), whose outputs are
computed here by hand, without a model or a compile."""

from __future__ import annotations

import json
import urllib.request

import grpc
import openai
import pytest

from jaxserve.async_engine import AsyncEngine
from jaxserve.batch import BatchJob
from jaxserve.engine import LLMEngine
from jaxserve.engine_api import Engine, EngineStats
from jaxserve.parallel import DataParallelEngine
from jaxserve.servers import grpc_server, http_server
from jaxserve.servers.frontend import Frontend
from jaxserve.v1 import jaxserve_pb2 as pb
from jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
from models.tokenizer import Tokenizer
from tests.fake_engine import FakeEngine, echo_token
from tests.serving import LoopThread, metric_value

MEMBERS = (
    "tokenize",
    "check_prompt",
    "add_request",
    "abort_request",
    "step",
    "has_unfinished_requests",
    "waiting_room",
    "stats",
    "model_card",
    "step_channel",
    "tokenizer",
    "max_model_len",
)


@pytest.fixture(scope="module")
def tok(gguf_path) -> Tokenizer:
    from models.gguf_loader import GGUFFile

    return Tokenizer.from_gguf_metadata(GGUFFile(gguf_path).tokenizer_metadata())


def echo_text(tok, prompt: str, n_tokens: int, k: int = 0) -> str:
    ids = tok.encode(prompt)
    return tok.decode([echo_token(ids, k, i) for i in range(n_tokens)])


def test_every_engine_implements_the_interface(tok):
    assert isinstance(FakeEngine(tok), Engine)
    for cls in (LLMEngine, DataParallelEngine):  # (instances need a model: the class must define every member)
        missing = [m for m in MEMBERS if m not in ("tokenizer", "max_model_len") and not hasattr(cls, m)]
        assert not missing, (cls.__name__, missing)
    a = EngineStats(*range(13))
    total = EngineStats.total([a, a])
    assert total.num_waiting == 0 and total.num_running == 2 and total.steps == 18  # replicas add up
    assert total.compilations == a.compilations  # process-wide counters do not


@pytest.fixture(scope="module")
def served(tok):
    engine = FakeEngine(tok)
    async_engine = AsyncEngine(engine)
    frontend = Frontend(async_engine, model_name="fake")
    loop = LoopThread()
    runner, port = loop.run(http_server.start(frontend))
    server, gport, _ = loop.run(grpc_server.build_server(frontend))
    yield engine, port, gport
    loop.run(runner.cleanup())
    loop.run(server.stop(0))
    async_engine.shutdown()
    loop.close()


def test_http_over_the_fake_engine(tok, served):
    engine, port, _ = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="fake", prompt="The sky is blue", max_tokens=6, n=2)
    assert [c.text for c in r.choices] == [echo_text(tok, "The sky is blue", 6, k) for k in (0, 1)]
    assert all(c.finish_reason == "length" for c in r.choices) and r.usage.completion_tokens == 12
    stream = client.completions.create(model="fake", prompt="Hello world", max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in stream) == echo_text(tok, "Hello world", 5)
    # a stop string inside the echo: the text ends before it
    r = client.completions.create(model="fake", prompt="one two three", max_tokens=20, stop=["three"])
    assert r.choices[0].text == echo_text(tok, "one two three", 20).split("three")[0]
    assert r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="fake", prompt="x", max_tokens=10_000)
    assert "max_tokens" in str(e.value)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert (
        metric_value(metrics, 'jaxserve_generation_tokens_total{model="fake"}') == engine.outputs.num_generated_tokens
    )
    assert engine.outputs.num_generated_tokens > 0


def test_grpc_over_the_fake_engine(tok, served):
    _, _, gport = served
    with grpc.insecure_channel(f"127.0.0.1:{gport}") as channel:
        stub = pb_grpc.JaxServeStub(channel)
        out = stub.Complete(pb.GenerateRequest(text="Hello world", sampling=pb.SamplingParams(max_tokens=4)))
        assert out.outputs[0].text == echo_text(tok, "Hello world", 4)
        info = stub.ModelInfo(pb.ModelInfoRequest())
        assert info.model.id == "fake" and info.max_num_seqs == 8 and info.num_kv_pages == 8


def test_batch_job_over_the_fake_engine(tok, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts = {"a": "first prompt", "b": "the second one"}
    src.write_text("".join(json.dumps({"id": k, "prompt": p, "max_tokens": 3}) + "\n" for k, p in prompts.items()))
    summary = BatchJob(FakeEngine(tok), str(src), str(dst), model_name="fake", progress=False).run()
    got = {r["id"]: r for r in map(json.loads, dst.read_text().splitlines())}
    assert set(got) == set(prompts), summary.describe()
    for k, p in prompts.items():
        assert json.dumps(got[k]).count(json.dumps(echo_text(tok, p, 3))[1:-1]) == 1, got[k]


def test_a_refused_duplicate_id_never_aborts_the_running_request(tok):
    """AsyncEngine (the Python API): callers that reuse a running request's id are refused, and one cancelled
    while its refused add is still in flight aborts nothing (it used to post an abort of that id)."""
    import asyncio
    import time

    from jaxserve.sampling import SamplingParams

    engine = FakeEngine(tok, max_model_len=256)
    step = engine.step
    engine.step = lambda: (time.sleep(0.005), step())[1]
    aeng = AsyncEngine(engine)

    async def main():
        victim = aeng.generate([5, 6, 7], SamplingParams(max_tokens=100, temperature=0), request_id="v")
        outs = [await victim.__anext__()]
        refused = cancelled = 0
        for _ in range(20):
            intruder = aeng.generate([5], SamplingParams(max_tokens=5), request_id="v")
            try:
                await asyncio.wait_for(intruder.__anext__(), 0.0005)
            except asyncio.TimeoutError:
                cancelled += 1
            except ValueError as e:
                assert "already in use" in str(e)
                refused += 1
            await intruder.aclose()
        outs += [o async for o in victim]
        return outs, refused, cancelled

    try:
        outs, refused, cancelled = asyncio.run(main())
    finally:
        aeng.shutdown()
    assert cancelled > 0, (refused, cancelled)  # the case that used to abort the victim happened
    last = outs[-1].outputs[0]
    assert outs[-1].finished and last.finish_reason == "length" and len(last.token_ids) == 100


def test_a_consumer_whose_event_loop_closed_ends_alone(tok):
    """A Python-API caller's event loop closes while its add waits behind a step: the engine loop aborts that
    request and goes on (it used to die on the closed loop's RuntimeError)."""
    import asyncio
    import threading
    import time

    from jaxserve.sampling import SamplingParams

    engine = FakeEngine(tok, max_model_len=256)
    step = engine.step
    engine.step = lambda: (time.sleep(0.02), step())[1]
    aeng = AsyncEngine(engine)
    long_params = SamplingParams(max_tokens=60, temperature=0)
    result = {}

    def victim():  # keeps the loop stepping (slowly) while the orphan's add waits
        async def main():
            return [o async for o in aeng.generate([5, 6, 7], long_params, request_id="v")]

        result["v"] = asyncio.run(main())

    t = threading.Thread(target=victim)
    t.start()
    try:
        time.sleep(0.1)
        loop = asyncio.new_event_loop()
        orphan = aeng.generate([8, 9], SamplingParams(max_tokens=50), request_id="orphan")
        task = loop.create_task(orphan.__anext__())  # noqa: F841  (kept referenced until the loop closes)
        loop.run_until_complete(asyncio.sleep(0.001))  # the add is posted; the loop thread is mid-step
        loop.close()  # (the task is left pending: its loop closes under it)
        t.join(30)
        assert aeng.is_running, aeng.error
        last = result["v"][-1].outputs[0]
        assert last.finish_reason == "length" and len(last.token_ids) == 60
        end = time.monotonic() + 5
        while engine.has_unfinished_requests() and time.monotonic() < end:
            time.sleep(0.01)
        assert not engine.has_unfinished_requests()  # the orphan was aborted, not left running

        async def again():
            return [o async for o in aeng.generate([1, 2], SamplingParams(max_tokens=3))]

        assert asyncio.run(again())[-1].finished
    finally:
        aeng.shutdown()


def test_a_reader_that_falls_behind_gets_the_missed_steps_folded_into_one(tok):
    """AsyncEngine: outputs a DELTA reader has not taken are folded into one (it never makes the loop wait, and
    holds one pending output, not one per step); what it reads joins to the whole answer."""
    import asyncio

    from jaxserve.sampling_params import RequestOutputKind, SamplingParams

    engine = FakeEngine(tok, max_model_len=512, step_seconds=0.001)
    aeng = AsyncEngine(engine)
    params = SamplingParams(max_tokens=200, temperature=0, logprobs=2, output_kind=RequestOutputKind.DELTA)

    prompt = tok.encode(" the quick brown fox")

    async def main():
        stream = aeng.generate(prompt, params)
        outs = [await stream.__anext__()]
        while engine.stats().generation_tokens < 150:  # the engine runs on meanwhile
            await asyncio.sleep(0.005)
        outs += [o async for o in stream]
        return outs

    try:
        outs = asyncio.run(main())
    finally:
        aeng.shutdown()
    ids = [t for o in outs for t in o.outputs[0].token_ids]
    assert len(outs[1].outputs[0].token_ids) >= 149 and len(ids) == 200  # 149+ steps in one output; every token
    assert ids == [echo_token(prompt, 0, i) for i in range(200)]
    assert "".join(o.outputs[0].text for o in outs) == tok.decode(ids)
    assert sum(len(o.outputs[0].logprobs) for o in outs) == 200 and outs[-1].finished


def test_a_stream_nobody_reads_is_ended_at_its_bound_and_the_others_go_on(tok):
    """Item 2 (the Python API): a caller that stops reading holds at most max_buffered_tokens; past it its
    stream ends with SlowConsumerError and its request is aborted (pages back), while another stream on the same
    engine is served to its end."""
    import asyncio

    from jaxserve.errors import SlowConsumerError
    from jaxserve.sampling_params import RequestOutputKind, SamplingParams

    engine = FakeEngine(tok, max_model_len=4096, step_seconds=0.001)
    aeng = AsyncEngine(engine, max_buffered_tokens=300)
    greedy = SamplingParams(max_tokens=4000, temperature=0, logprobs=5, n=4, output_kind=RequestOutputKind.DELTA)

    async def main():
        stuck = aeng.generate([5, 6, 7], greedy)
        await stuck.__anext__()  # then never again, until the end
        reader = [o async for o in aeng.generate([8, 9], SamplingParams(max_tokens=150, temperature=0))]
        while engine.has_unfinished_requests():
            await asyncio.sleep(0.01)
        try:
            await stuck.__anext__()
        except SlowConsumerError as e:
            return reader, e

    try:
        reader, err = asyncio.run(main())
    finally:
        aeng.shutdown()
    assert err is not None and "fell" in str(err)
    assert reader[-1].finished and len(reader[-1].outputs[0].token_ids) == 150
    assert engine.stats().generation_tokens < 4 * 4000  # the stuck one was aborted long before its end


def test_an_ended_request_ends_even_when_its_cancel_was_swallowed(tok):
    """Frontend.end (the drain timeout, a stalled client) cancels the request's task; where that cancel is
    swallowed (Python 3.11's wait_for returns the inner result when it completes as the cancel lands: a gRPC
    write), the stream still ends with the error at its next step, and the engine request is aborted."""
    import asyncio
    import time

    from jaxserve.api.errors import UNAVAILABLE, APIError
    from jaxserve.api.validation import GenerateRequest
    from jaxserve.sampling import SamplingParams

    engine = FakeEngine(tok, max_model_len=256)
    step = engine.step
    engine.step = lambda: (time.sleep(0.005), step())[1]
    aeng = AsyncEngine(engine)
    frontend = Frontend(aeng, model_name="fake")
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def main():
        outs, swallowed = [], 0
        task = asyncio.current_task()
        with pytest.raises(APIError) as err:
            async for out in frontend.generate(GenerateRequest(params=params, prompt_token_ids=(5, 6, 7))):
                outs.append(out)
                if len(outs) == 3:  # (from outside any task, as the drain's end is to this one)
                    asyncio.get_running_loop().call_soon(frontend.end, [task], APIError(UNAVAILABLE, "drained"))
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:  # what wait_for does when the write finished as the cancel came
                    swallowed += 1
        return outs, swallowed, err.value

    try:
        outs, swallowed, err = asyncio.run(main())
        assert swallowed == 1 and err.kind == UNAVAILABLE and err.message == "drained", (swallowed, err)
        assert not outs[-1].finished and len(outs) < 10
        deadline = time.monotonic() + 5
        while engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.has_unfinished_requests()  # aborted, not left to run its 200 tokens
    finally:
        aeng.shutdown()
