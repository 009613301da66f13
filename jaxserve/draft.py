"""The draft-model proposer of speculative decoding: a second model with the target's tokenizer (smaller, or the
target's own weights quantized: a self-speculative pair) on its own runner, KV pages and compiled program.

After each target step, one draft round runs over every running sequence, in one compiled call:

    catch-up:  the tokens the draft has not seen (a prompt chunk the target just computed, or the accepted
               proposals and the target's new token), as one ragged step over the draft's pages
    k steps:   from each caught-up sequence's newest token, k greedy one-token steps (a loop inside the same
               program: k - 1 more forwards of S rows), writing the draft's KV as it goes

    target:  ... t  | verifies x_0 .. x_{k-1} as k + 1 rows of its next step
    draft:   ... t -> x_0 -> x_1 -> ... -> x_{k-1}      (KV written for t, x_0 .. x_{k-2})

The draft's proposals are greedy (its argmax), so the target verifies them as point masses
(jaxserve.rejection_sampler.verify_point_mass; LLMEngine._count_accepted): rejection sampling with q one-hot at
the draft's token, exact for greedy and sampled requests, and for one proposal per row the acceptance
p(argmax q) is the best a point mass can do. After verification the draft's KV is valid up to the proposals the
target accepted (never past x_{k-2}): the next round feeds from there, so a rejected proposal's KV is simply
overwritten. A sequence the draft cannot hold (its pages ran out) or that is not running loses its draft state
and has no proposals until the draft has caught up again.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.kv_cache.block_manager import BlockManager
from jaxserve.model_runner import ModelRunner, StepInputs
from jaxserve.request import Request
from jaxserve.scheduler import ScheduledRequest
from jaxserve.spec_decode import SpeculativeConfig
from models.cache import AttentionMetadata, KVCache
from models.llama import LlamaParams, compute_logits, forward, matmul_backend
from models.loader import LoadedModel


class DraftMismatchError(ValueError):
    """The draft model cannot propose for this target (vocabulary or tokenizer differ)."""


def check_draft(target: LoadedModel, draft: LoadedModel) -> None:
    """Refuse a draft whose token ids mean something else than the target's: vocabulary size, the tokenizer's
    whole vocabulary (token -> id, added tokens included), BOS and EOS ids."""
    name = f"speculative_config.model={draft.path!r}"
    if draft.config.vocab_size != target.config.vocab_size:
        raise DraftMismatchError(
            f"{name}: vocabulary of {draft.config.vocab_size} tokens, the target's has {target.config.vocab_size}"
        )
    t, d = target.tokenizer, draft.tokenizer
    if (t.bos_token_id, t.eos_token_ids) != (d.bos_token_id, d.eos_token_ids):
        raise DraftMismatchError(
            f"{name}: BOS/EOS ids {d.bos_token_id}/{list(d.eos_token_ids)} differ from the target's "
            f"{t.bos_token_id}/{list(t.eos_token_ids)}"
        )
    tv, dv = t.backend.get_vocab(with_added_tokens=True), d.backend.get_vocab(with_added_tokens=True)
    if tv != dv:
        diff = sorted(set(tv.items()) ^ set(dv.items()), key=lambda kv: kv[1])[:3]
        raise DraftMismatchError(f"{name}: its tokenizer differs from the target's (e.g. token -> id {diff})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftRows:
    propose: jax.Array  # bool[S]: slot s is caught up to its newest token and runs the k steps


def _draft_round(
    params: LlamaParams, cache: KVCache, inputs: StepInputs, rows: DraftRows, *, cfg, backend, mesh, num_steps
):
    """-> (i32[S, num_steps] greedy proposals per slot (rows of slots that do not propose are junk), cache)."""
    head = matmul_backend(backend, mesh)
    hidden, cache = forward(
        params, cfg, inputs.token_ids, inputs.positions, cache, inputs.meta, attention_backend=backend, mesh=mesh
    )
    # ModelRunner.pack lays one sampler row per sequence in slot order: row s reads slot s's last token.
    tok = jnp.argmax(compute_logits(params, hidden[inputs.sample_idx], backend=head), -1).astype(jnp.int32)
    meta, on = inputs.meta, rows.propose
    s = tok.shape[0]
    page_size = cache.k.shape[2]
    out = jnp.zeros((s, num_steps), jnp.int32).at[:, 0].set(tok)

    def one(j, carry):  # feed proposal j - 1 at position kv_len + j - 1, draw proposal j
        cache, tok, out = carry
        pos = meta.kv_lens + j - 1
        page = jnp.take_along_axis(meta.block_tables, (pos // page_size)[:, None], 1)[:, 0]
        # Slots that do not propose write nothing and attend to one token of their own first page (page 0, the
        # null page, for padding slots): finite junk in their own rows only.
        step_meta = AttentionMetadata(
            slot_mapping=jnp.where(on, page * page_size + pos % page_size, -1).astype(jnp.int32),
            query_start_loc=jnp.arange(s + 1, dtype=jnp.int32),
            kv_lens=jnp.where(on, pos + 1, 1).astype(jnp.int32),
            block_tables=meta.block_tables,
            num_seqs=jnp.array(s, jnp.int32),
        )
        h, cache = forward(
            params, cfg, tok, jnp.where(on, pos, 0), cache, step_meta, attention_backend=backend, mesh=mesh
        )
        tok = jnp.argmax(compute_logits(params, h, backend=head), -1).astype(jnp.int32)
        return cache, tok, out.at[:, j].set(tok)

    steps = jnp.where(jnp.any(on), num_steps, 1)  # a round of prompt chunks only runs no loop
    cache, _, out = jax.lax.fori_loop(1, steps, one, (cache, tok, out))
    return out, cache


class DraftRunner(ModelRunner):
    """A ModelRunner whose compiled program is the draft round (_draft_round) of num_steps proposals."""

    def __init__(self, *args, num_steps: int, **kwargs):
        self.num_steps = num_steps
        super().__init__(*args, **kwargs)

    def program(self):
        return functools.partial(_draft_round, num_steps=self.num_steps)

    def row_template(self, num_slots: int) -> DraftRows:
        return DraftRows(np.zeros(num_slots, bool))


class DraftProposer:
    """Proposals from a draft model (see the module docstring). One instance per target engine."""

    def __init__(self, spec: SpeculativeConfig, target: LoadedModel, engine_config, *, mesh=None, progress=False):
        from models.loader import load_model

        if engine_config.parallel.multihost:
            raise NotImplementedError("speculative_config.method='draft_model' over several processes: not built")
        quantization = spec.quantization if spec.quantization is not None else target.quantization
        self.model = load_model(spec.model, dtype=str(target.dtype), quantization=quantization)
        check_draft(target, self.model)
        self.k = spec.num_speculative_tokens
        sched = engine_config.scheduler
        self.max_model_len = sched.max_model_len
        # Room for the k - 1 proposals the round writes past a sequence's last token.
        draft_sched = dataclasses.replace(sched, max_model_len=sched.max_model_len + self.k)
        self.runner = DraftRunner(
            self.model.config,
            self.model.params,
            cache=engine_config.cache,
            scheduler=draft_sched,
            attention_backend=engine_config.attention_backend,
            buckets=engine_config.token_buckets,
            progress=progress,
            mesh=mesh,
            num_steps=self.k,
        )
        self.block_manager = BlockManager(
            self.runner.pool.num_pages,
            engine_config.cache.page_size,
            model_id=f"{self.model.path}#draft",
            enable_prefix_caching=False,
        )
        self.budget = sched.max_num_batched_tokens
        self.max_slots = sched.max_num_seqs
        # request id -> (tokens of the sequence the last round fed, the proposals whose KV it wrote)
        self._fed: dict[str, tuple[int, list[int]]] = {}
        self.num_rounds = 0

    def _valid(self, req: Request) -> int:
        """Tokens of req whose KV the draft holds: what the last round fed, and its proposals the sequence kept."""
        fed, written = self._fed.get(req.request_id, (0, []))
        tokens = req.all_token_ids
        valid = fed
        for x in written:
            if valid >= len(tokens) or tokens[valid] != x:
                break
            valid += 1
        return valid

    def _drop(self, request_id: str) -> None:
        if self._fed.pop(request_id, None) is not None:
            self.block_manager.free(request_id)

    def propose(self, running: Sequence[Request]) -> dict[str, list[int]]:
        """One draft round over the running sequences: each catches up (within the step's budget and rows) and
        each caught-up decode gets up to k proposals. Returns {request_id: proposals}."""
        live = {r.request_id for r in running}
        for rid in [rid for rid in self._fed if rid not in live]:
            self._drop(rid)
        items, tables, proposing = [], [], []
        budget = self.budget
        for req in running:
            if len(items) == self.max_slots or budget == 0:
                break
            decoding = req.num_computed_tokens == req.num_tokens - 1  # the target's next step samples
            goal = req.num_tokens if decoding else req.num_computed_tokens
            start = self._valid(req)
            n = min(goal - start, budget)
            if n <= 0:
                continue
            proposes = decoding and start + n == goal and req.num_tokens < self.max_model_len
            self._fed.setdefault(req.request_id, (0, []))  # tracked from here, so _drop frees its pages
            need = start + n + (self.k - 1 if proposes else 0)
            if self.block_manager.allocate_slots(req.request_id, need) is None:
                self._drop(req.request_id)  # the draft's pages ran out: this one waits for room
                continue
            items.append(ScheduledRequest(req, start, n))
            tables.append(self.block_manager.block_table(req.request_id))
            proposing.append(proposes)
            budget -= n
        if not items:
            return {}
        bucket, inputs, rows = self.runner.pack(items, tables)
        flags = np.zeros(self.runner.num_seqs_for(bucket), bool)
        for item_rows, proposes in zip(rows, proposing):
            flags[item_rows[0]] = proposes
        out = np.asarray(jax.device_get(self.runner.run_compiled(bucket, inputs, DraftRows(flags))))
        self.num_rounds += 1
        proposals = {}
        for item, item_rows, proposes in zip(items, rows, proposing):
            req = item.request
            drawn = out[item_rows[0]].tolist() if proposes else []
            self._fed[req.request_id] = (item.start + item.num_tokens, drawn[: self.k - 1])
            if proposes:
                proposals[req.request_id] = drawn[: self.max_model_len - req.num_tokens]
        return proposals
