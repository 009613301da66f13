"""Output processing: a step's new tokens per sequence -> RequestOutputs (vLLM v1's OutputProcessor).

The engine hands over, per sequence the step sampled for, the list of its new tokens (one today; several once
speculative decoding accepts a run) with the sampler-output row of each. Per token, in order: metrics, logprobs,
detokenization and the stop strings; a stop string inside a run ends the sequence at that token (the tokens after
it are dropped). Then the sequences of a request (n > 1) are gathered into one RequestOutput per request touched.
The scheduler owns token ids, EOS, max_tokens and pages; this module only tells it (finish_request) when a stop
string ended a sequence it still runs.

What an output carries is the request's `SamplingParams.output_kind`: under DELTA nothing is kept after it is
emitted (a step costs the same at token 10 and token 10,000, and so does the output it hands over); under
FINAL_ONLY the request is emitted once, when it finishes; CUMULATIVE copies everything so far every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from jaxserve.api.errors import internal_error
from jaxserve.detokenizer import TextStream
from jaxserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling import SamplerOutput, SamplingParams
from jaxserve.sampling_params import RequestOutputKind
from models.tokenizer import Tokenizer


@dataclasses.dataclass
class SequenceState:
    request: Request  # the scheduler's
    stream: TextStream
    completion: CompletionOutput  # its text, token_ids and logprobs: what the next output hands over
    pieces: list[str] = dataclasses.field(default_factory=list)  # text not yet joined into completion.text


@dataclasses.dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[SequenceState]
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.completion.finish_reason is not None for s in self.seqs)


@dataclasses.dataclass
class SequenceTokens:
    """One sequence's share of a step's result."""

    request_id: str  # the sequence's (scheduler) id
    token_ids: list[int]  # new tokens, in order
    rows: list[int]  # the sampler-output row of each new token (its logprobs)
    finished: bool  # the scheduler finished the sequence at its last new token (EOS, max_tokens, length)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, finish_request: Callable[[str, RequestStatus], None]):
        """finish_request(sequence id, status): ends a sequence in the scheduler (a stop string)."""
        self.tokenizer = tokenizer
        self._finish_request = finish_request
        self.requests: dict[str, RequestState] = {}
        self.seqs: dict[str, tuple[RequestState, SequenceState]] = {}
        self.num_generated_tokens = 0

    # ---- requests -------------------------------------------------------------------------------------------

    def new_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        metrics: RequestMetrics,
        requests: Sequence[Request],
    ) -> RequestState:
        """Track a request whose sequences (`requests`, the scheduler's) the caller queues."""
        state = RequestState(request_id, prompt, prompt_token_ids, params, metrics, [])
        for k, req in enumerate(requests):
            stream = TextStream(
                self.tokenizer,
                params.stop,
                skip_special_tokens=params.skip_special_tokens,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
            logprobs = [] if params.logprobs is not None else None
            completion = CompletionOutput(k, "", [], 0.0 if logprobs is not None else None, logprobs)
            state.seqs.append(SequenceState(req, stream, completion))
        for seq in state.seqs:
            self.seqs[seq.request.request_id] = (state, seq)
        self.requests[request_id] = state
        return state

    def has_sequence(self, sequence_id: str) -> bool:
        return sequence_id in self.seqs

    def metrics_of(self, sequence_id: str) -> RequestMetrics | None:
        """The metrics of the request a sequence belongs to (None once it is gone)."""
        entry = self.seqs.get(sequence_id)
        return None if entry is None else entry[0].metrics

    def abort(self, request_id: str, now: float) -> RequestOutput | None:
        """End a request now; its final output, or None when it is unknown or already finished."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        for seq in state.seqs:
            if seq.completion.finish_reason is None:
                self._finish_request(seq.request.request_id, RequestStatus.FINISHED_ABORTED)
                self._finish_seq(seq, "abort", "")
        return self._emit(state, now)

    # ---- a step's result ------------------------------------------------------------------------------------

    def process(self, new: Sequence[SequenceTokens], out: SamplerOutput, now: float) -> list[RequestOutput]:
        """One RequestOutput per request a sequence of `new` belongs to."""
        touched: dict[str, RequestState] = {}
        for item in new:
            state, seq = self.seqs[item.request_id]
            try:
                self._add_tokens(state, seq, item, out, now)
            except Exception as e:  # a bug in one request's output path ends that request, not the engine
                state.error = internal_error(e, f"the output of request {state.request_id}").message
                if seq.completion.finish_reason is None:
                    self._finish_request(seq.request.request_id, RequestStatus.FINISHED_ABORTED)
                    self._finish_seq(seq, "abort", "")
            touched[state.request_id] = state
        return [out for state in touched.values() if (out := self._emit(state, now)) is not None]

    def _add_tokens(
        self, state: RequestState, seq: SequenceState, item: SequenceTokens, out: SamplerOutput, now: float
    ) -> None:
        comp, req, metrics = seq.completion, seq.request, state.metrics
        finished = False
        for i, (token, row) in enumerate(zip(item.token_ids, item.rows, strict=True)):
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
            metrics.num_generated_tokens += 1
            self.num_generated_tokens += 1
            comp.token_ids.append(token)
            comp.delta_token_ids.append(token)
            if comp.logprobs is not None:
                self._add_logprobs(comp, token, out, row, state.params.logprobs)
            delta, stop = seq.stream.add(token)
            if delta:
                seq.pieces.append(delta)
            if stop is not None:  # ends the sequence here, whatever the run's later tokens were
                if not req.status.is_finished:  # the scheduler still runs it
                    self._finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
                req.stop_reason = stop
                req.status = RequestStatus.FINISHED_STOPPED
                finished = True
                break
            finished = item.finished and i == len(item.token_ids) - 1
        if finished:
            self._finish_seq(seq, req.status.finish_reason or "stop", seq.stream.finish())

    def _add_logprobs(self, comp: CompletionOutput, token: int, out: SamplerOutput, row: int, num_top: int) -> None:
        entry = {token: Logprob(float(out.logprobs[row]), int(out.ranks[row]), self._piece(token))}
        for rank, (tid, lp) in enumerate(zip(out.top_ids[row, :num_top], out.top_logprobs[row, :num_top])):
            entry.setdefault(int(tid), Logprob(float(lp), rank + 1, self._piece(int(tid))))
        comp.logprobs.append(entry)
        comp.cumulative_logprob += float(out.logprobs[row])

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _finish_seq(self, seq: SequenceState, reason: str, tail: str) -> None:
        if tail:
            seq.pieces.append(tail)
        comp = seq.completion
        comp.finish_reason = reason
        comp.stop_reason = seq.request.stop_reason

    def _emit(self, state: RequestState, now: float) -> RequestOutput | None:
        """The request's output now (None under FINAL_ONLY until it finishes)."""
        finished = state.finished
        kind = state.params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        outputs = [self._completion_output(seq, kind) for seq in state.seqs]
        if finished:
            state.metrics.finished_time = now
            del self.requests[state.request_id]
            for seq in state.seqs:
                self.seqs.pop(seq.request.request_id, None)
        cached = max(0, state.seqs[0].request.num_cached_tokens)
        return RequestOutput(
            state.request_id,
            state.prompt,
            state.prompt_token_ids,
            outputs,
            finished,
            dataclasses.replace(state.metrics),
            cached,
            state.error,
        )

    @staticmethod
    def _completion_output(seq: SequenceState, kind: RequestOutputKind) -> CompletionOutput:
        comp = seq.completion
        delta_text = "".join(seq.pieces)
        seq.pieces.clear()
        delta_ids = comp.delta_token_ids
        comp.delta_token_ids = []
        if kind is RequestOutputKind.DELTA:  # hand the new items over and keep nothing of them
            out = dataclasses.replace(comp, text=delta_text, token_ids=list(delta_ids), delta_text=delta_text)
            out.delta_token_ids = delta_ids
            comp.token_ids = []
            if comp.logprobs is not None:
                comp.logprobs = []
            return out
        comp.text += delta_text  # (FINAL_ONLY: once; CUMULATIVE: everything so far, each step)
        return dataclasses.replace(
            comp,
            token_ids=list(comp.token_ids),
            logprobs=None if comp.logprobs is None else list(comp.logprobs),
            delta_text=delta_text,
            delta_token_ids=delta_ids,
        )
