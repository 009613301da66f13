"""Ragged paged attention: time each backend on the same ragged batch, check it against the reference.

    . .venv/bin/activate && python scripts/bench_attention.py [--seqs 32] [--kv-len 1024] [--prefill 2]

On CPU: the jnp reference (compiled) next to the Pallas TPU and GPU kernels in interpret mode (interpret mode
emulates the kernel in Python-driven XLA: its time says nothing about hardware; it is shown so the ratio is
on record). On a GPU: the Pallas GPU kernel next to the reference, with the achieved HBM bandwidth
(K/V bytes the batch must read / kernel time) as a fraction of the device's peak. Batch: `--seqs` sequences at
`--kv-len` cached tokens, of which `--prefill` carry a `--chunk`-token prompt chunk and the rest decode one
token; SmolLM2 head shapes (9 query heads, 3 KV heads, head_dim 64) unless told otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels_pallas.ragged_paged_attention import ragged_paged_attention  # noqa: E402

PEAK_HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # SXM figures


def make_batch(args, rng):
    q_lens = [args.chunk] * args.prefill + [1] * (args.seqs - args.prefill)
    pages_per_seq = -(-args.kv_len // args.page_size)
    num_pages = args.seqs * pages_per_seq + 1
    dt = jnp.dtype(args.dtype)
    shape = (num_pages, args.page_size, args.kv_heads, args.head_dim)
    k_pages = jnp.asarray(rng.standard_normal(shape), dt)
    v_pages = jnp.asarray(rng.standard_normal(shape), dt)
    block_tables = (1 + rng.permutation(num_pages - 1)[: args.seqs * pages_per_seq]).reshape(args.seqs, -1)
    q = jnp.asarray(rng.standard_normal((sum(q_lens), args.q_heads, args.head_dim)), dt)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    kv_lens = np.full(args.seqs, args.kv_len, np.int32)
    batch = (
        q,
        k_pages,
        v_pages,
        jnp.asarray(kv_lens),
        jnp.asarray(block_tables, jnp.int32),
        jnp.asarray(qsl),
        jnp.array([args.seqs], jnp.int32),
    )
    kv_bytes = 2 * args.seqs * args.kv_len * args.kv_heads * args.head_dim * dt.itemsize
    return batch, kv_bytes


def time_backend(batch, backend, interpret, repeats):
    d = batch[0].shape[-1]
    fn = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=d**-0.5, backend=backend, interpret=interpret))
    out = jax.block_until_ready(fn(*batch))  # compile + first run
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*batch))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), np.asarray(out, np.float32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--prefill", type=int, default=1, help="sequences carrying a prompt chunk")
    p.add_argument("--chunk", type=int, default=32, help="tokens in each prompt chunk")
    p.add_argument("--kv-len", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--q-heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    platform = jax.default_backend()
    device = jax.devices()[0]
    batch, kv_bytes = make_batch(args, np.random.default_rng(0))
    print(
        f"device {device.device_kind} ({platform}); {args.seqs} seqs x {args.kv_len} cached tokens, "
        f"{args.prefill} with a {args.chunk}-token chunk; T={batch[0].shape[0]}; "
        f"K/V to read {kv_bytes / 2**20:.1f} MiB"
    )
    runs = [("reference", False)]
    if platform == "gpu":
        runs.append(("pallas_gpu", False))
    elif platform == "tpu":
        runs.append(("pallas_tpu", False))
    else:
        runs += [("pallas_gpu", True), ("pallas_tpu", True)]
    results = {}
    for backend, interpret in runs:
        label = backend + (" (interpret)" if interpret else "")
        try:
            results[label] = time_backend(batch, backend, interpret, 1 if interpret else args.repeats)
        except Exception as e:  # a backend that cannot run here is reported, not fatal
            print(f"{label:24s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    ref_t, ref_out = results["reference"]
    rows = int(batch[5][-1])
    peak = next((v for k, v in PEAK_HBM_BYTES_PER_S.items() if k in device.device_kind), None)
    print(f"{'backend':24s} {'ms':>10s} {'vs reference':>13s} {'max |diff|':>11s} {'GB/s':>8s} {'of peak':>8s}")
    for label, (t, out) in results.items():
        diff = float(np.max(np.abs(out[:rows] - ref_out[:rows])))
        gbs = kv_bytes / t / 1e9
        frac = f"{kv_bytes / t / peak:.1%}" if peak and not label.endswith("(interpret)") else "-"
        print(f"{label:24s} {t * 1e3:10.3f} {ref_t / t:12.2f}x {diff:11.2e} {gbs:8.1f} {frac:>8s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
