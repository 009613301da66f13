"""The output processor on its own (no model, no jax step): runs of several new tokens per sequence, a stop
string inside a run, logprobs by row, n > 1 gathering, and abort."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.output_processor import OutputProcessor, SequenceTokens
from jaxserve.outputs import RequestMetrics
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling import SamplerOutput, SamplingParams
from jaxserve.sampling_params import RequestOutputKind
from models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(gguf_path) -> Tokenizer:
    from models.gguf_loader import GGUFFile

    return Tokenizer.from_gguf_metadata(GGUFFile(gguf_path).tokenizer_metadata())


class Scheduler:
    """Stands in for the scheduler: records what the processor ends."""

    def __init__(self):
        self.finished: list[tuple[str, RequestStatus]] = []

    def finish(self, request_id: str, status: RequestStatus) -> None:
        self.finished.append((request_id, status))


def _setup(tok, params: SamplingParams, rid: str = "r"):
    sched = Scheduler()
    proc = OutputProcessor(tok, sched.finish)
    prompt = tok.encode("Hello")
    ids = [rid] if params.n == 1 else [f"{k}_{rid}" for k in range(params.n)]
    reqs = [Request(i, prompt, params, 64, status=RequestStatus.RUNNING) for i in ids]
    proc.new_request(rid, "Hello", prompt, params, RequestMetrics(arrival_time=0.0), reqs)
    return proc, sched, reqs


def _out(rows: int, logprobs=None) -> SamplerOutput:
    lp = np.zeros(rows, np.float32) if logprobs is None else np.asarray(logprobs, np.float32)
    return SamplerOutput(
        np.zeros(rows, np.int32),
        lp,
        np.ones(rows, np.int32),
        np.full((rows, 20), -1, np.int32),
        np.zeros((rows, 20), np.float32),
    )


def test_a_run_of_tokens_and_a_stop_string_inside_it(tok):
    proc, sched, (req,) = _setup(tok, SamplingParams(stop=["world"], max_tokens=64))
    run = tok.encode(" big world and more")
    (out,) = proc.process([SequenceTokens("r", run, [0] * len(run), finished=False)], _out(1), now=1.0)
    assert out.finished and out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == "world"
    assert out.outputs[0].text == " big "  # the stop string and every token after it are dropped
    assert len(out.outputs[0].token_ids) < len(run)  # the run ended at the stop, not at its last token
    assert sched.finished == [("r", RequestStatus.FINISHED_STOPPED)]  # the scheduler is told once
    assert not proc.requests and out.metrics.num_generated_tokens == len(out.outputs[0].token_ids)


def test_runs_stream_deltas_and_the_scheduler_finishes_at_the_last_token(tok):
    proc, sched, (req,) = _setup(tok, SamplingParams(max_tokens=64))
    first, second = tok.encode(" one two"), tok.encode(" three")
    (a,) = proc.process([SequenceTokens("r", first, [0] * len(first), finished=False)], _out(1), now=1.0)
    assert not a.finished and a.outputs[0].text == " one two" and a.outputs[0].token_ids == first
    req.status = RequestStatus.FINISHED_LENGTH  # the scheduler ended it (max_tokens) at this step's last token
    (b,) = proc.process([SequenceTokens("r", second, [0] * len(second), finished=True)], _out(1), now=2.0)
    assert b.finished and b.outputs[0].finish_reason == "length" and b.outputs[0].text == " one two three"
    assert sched.finished == []  # nothing for the processor to end


def test_each_token_takes_the_logprobs_of_its_own_row(tok):
    proc, _, _ = _setup(tok, SamplingParams(logprobs=0, max_tokens=64))
    run = tok.encode(" a b c")
    (out,) = proc.process([SequenceTokens("r", run, [2, 0, 1], finished=False)], _out(3, [-0.5, -1.5, -2.5]), 1.0)
    got = [entry[t].logprob for entry, t in zip(out.outputs[0].logprobs, run)]
    assert got == [-2.5, -0.5, -1.5] and out.outputs[0].cumulative_logprob == pytest.approx(-4.5)


def test_n_sequences_gather_into_one_output_and_abort_ends_the_rest(tok):
    proc, sched, reqs = _setup(tok, SamplingParams(n=2, stop=["!"], max_tokens=64))
    one, two = tok.encode(" hi!"), tok.encode(" yo")
    outs = proc.process(
        [SequenceTokens("0_r", one, [0] * len(one), False), SequenceTokens("1_r", two, [1] * len(two), False)],
        _out(2),
        now=1.0,
    )
    (out,) = outs  # one RequestOutput for the request, both sequences in it
    assert [o.text for o in out.outputs] == [" hi", " yo"] and not out.finished
    assert out.outputs[0].finish_reason == "stop" and out.outputs[1].finish_reason is None
    final = proc.abort("r", now=2.0)
    assert final.finished and final.outputs[1].finish_reason == "abort"
    assert sched.finished == [("0_r", RequestStatus.FINISHED_STOPPED), ("1_r", RequestStatus.FINISHED_ABORTED)]
    assert proc.abort("r", now=3.0) is None and not proc.seqs


# ---- output kinds (what a step hands over) ----------------------------------------------------------------------


def _top(token: int) -> SamplerOutput:
    """One row whose top alternatives are real token ids (token, token + 1, ...)."""
    out = _out(1, [-1.0])
    out.top_ids[0] = np.arange(token, token + 20) % 1000
    out.top_logprobs[0] = -np.arange(1, 21, dtype=np.float32)
    return out


def _run_tokens(tok, kind: RequestOutputKind, steps: int, logprobs=5):
    """`steps` single-token steps of one sequence; the outputs and the processor's sequence state."""
    params = SamplingParams(max_tokens=steps, logprobs=logprobs, stop=["zzzz"], output_kind=kind)
    proc, _, (req,) = _setup(tok, params)
    ids = tok.encode(" the quick brown fox jumps over the lazy dog" * (steps // 9 + 1))[:steps]
    outs = []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        if last:
            req.status = RequestStatus.FINISHED_LENGTH
        outs += proc.process([SequenceTokens("r", [t], [0], finished=last)], _top(t), now=float(i))
    return outs, ids, proc


def test_delta_outputs_carry_only_new_tokens_and_the_processor_keeps_none(tok):
    """Under DELTA a step hands over its own token, logprobs and text, whatever came before (the work and the
    output of step 300 are those of step 3), and nothing handed over is kept; the deltas join to the whole."""
    outs, ids, proc = _run_tokens(tok, RequestOutputKind.DELTA, 300)
    whole, _, _ = _run_tokens(tok, RequestOutputKind.FINAL_ONLY, 300)
    assert len(outs) == 300 and outs[-1].finished
    for out in outs:
        (c,) = out.outputs
        assert len(c.token_ids) == len(c.delta_token_ids) == 1 and len(c.logprobs) == 1 and c.text == c.delta_text
    (final,) = whole  # FINAL_ONLY: one output, at the end, with everything
    assert final.finished and final.outputs[0].token_ids == ids
    assert "".join(o.outputs[0].text for o in outs) == final.outputs[0].text == tok.decode(ids)
    assert [lp for o in outs for lp in o.outputs[0].logprobs] == final.outputs[0].logprobs
    assert outs[-1].metrics.num_generated_tokens == 300
    assert not proc.requests  # finished: nothing left


def test_delta_state_stays_empty_while_running(tok):
    params = SamplingParams(max_tokens=1000, logprobs=3, output_kind=RequestOutputKind.DELTA)
    proc, _, _ = _setup(tok, params)
    for i in range(200):
        proc.process([SequenceTokens("r", [tok.encode(" a")[0]], [0], finished=False)], _top(i), now=float(i))
    seq = proc.requests["r"].seqs[0]
    assert seq.completion.token_ids == [] and seq.completion.logprobs == [] and seq.completion.text == ""
    assert seq.pieces == [] and len(seq.stream.detok.token_ids) <= 2  # the detokenizer keeps only its window


def test_cumulative_outputs_carry_everything_so_far(tok):
    outs, ids, _ = _run_tokens(tok, RequestOutputKind.CUMULATIVE, 40)
    assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, 41))
    assert outs[-1].outputs[0].text == tok.decode(ids) == "".join(o.outputs[0].delta_text for o in outs)


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE])
def test_outputs_folded_into_one_equal_the_steps_they_cover(tok, kind):
    """RequestOutput.add (what a stream does for a reader that fell behind): the outputs of steps 2..k folded
    into step 1's are what a reader of every step would have put together."""
    outs, ids, _ = _run_tokens(tok, kind, 30)
    folded = outs[0]
    for later in outs[1:]:
        folded.add(later, aggregate=kind is RequestOutputKind.DELTA)
    (c,) = folded.outputs
    assert folded.finished and c.finish_reason == "length"
    assert c.token_ids == c.delta_token_ids == ids and c.text == c.delta_text == tok.decode(ids)
    assert len(c.logprobs) == 30
