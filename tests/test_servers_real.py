"""Both servers on the real SmolLM2-135M: the official openai client (chat and completions, streamed and not)
and a gRPC stream give exactly the Python API's greedy text; metrics move; nothing compiles after warm-up."""

from __future__ import annotations

import grpc
import openai
import pytest

from jaxserve.async_engine import AsyncEngine
from jaxserve.engine import LLMEngine
from jaxserve.llm import LLM, engine_config
from jaxserve.sampling import SamplingParams
from jaxserve.servers import grpc_server, http_server
from jaxserve.servers.frontend import Frontend
from jaxserve.v1 import jaxserve_pb2 as pb
from jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
from tests.serving import LoopThread, pages_in_use

pytestmark = pytest.mark.real_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def served(real_model):
    engine = LLMEngine(
        real_model, engine_config(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64, token_buckets=(16, 64))
    )
    # The Python API's answers, before the async loop takes the engine over.
    llm = LLM.from_engine(engine)
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    reference = {
        "chat": llm.chat(QUESTION, greedy, use_tqdm=False)[0].outputs[0].text,
        "completion": llm.generate(PROMPT, greedy, use_tqdm=False)[0].outputs[0].text,
    }
    async_engine = AsyncEngine(engine)
    frontend = Frontend(async_engine, model_name="smollm2")
    loop = LoopThread()
    runner, http_port = loop.run(http_server.start(frontend))
    grpc_srv, grpc_port, _ = loop.run(grpc_server.build_server(frontend, "127.0.0.1", 0))
    yield engine, reference, http_port, grpc_port
    loop.run(grpc_srv.stop(None))
    loop.run(runner.cleanup())
    async_engine.shutdown()
    loop.close()


def test_openai_client_matches_python_api(served):
    engine, reference, port, _ = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=24)
    assert chat.choices[0].message.content == reference["chat"]
    assert "Paris" in reference["chat"]
    streamed = client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=24, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reference["chat"]
    comp = client.completions.create(model="smollm2", prompt=PROMPT, temperature=0, max_tokens=24)
    assert comp.choices[0].text == reference["completion"]
    assert engine.runner.compiles_since_warmup == 0
    assert pages_in_use(engine) == 0


def test_grpc_stream_matches_python_api(served):
    engine, reference, _, port = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.JaxServeStub(channel)
        request = pb.GenerateRequest(
            chat=pb.Chat(messages=[pb.ChatMessage(**m) for m in QUESTION]),
            sampling=pb.SamplingParams(temperature=0, max_tokens=24),
        )
        messages = list(stub.Generate(request, timeout=60))
    assert len(messages) > 1 and messages[-1].finished
    assert "".join(d.text for m in messages for d in m.outputs) == reference["chat"]
    assert messages[-1].usage.completion_tokens == sum(len(d.token_ids) for m in messages for d in m.outputs)
    assert engine.runner.compiles_since_warmup == 0
