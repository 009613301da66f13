"""Our CPU matmul kernels next to XLA's own dots, on SmolLM2-135M's projection shapes: GOPS per kernel and M.

    .venv/bin/python scripts/bench_kernels.py [--m 1,8,64,256] [--reps 20]

Rows per (M, K, N):
  xla f32 slice+dot   XLA's f32 dot of one layer sliced out of a stacked [4, K, N] weight (what the layer scan did)
  xla f32 dot         XLA's f32 dot of an unstacked weight (no slice)
  ours f32            kernels_pallas.dense_matmul (reads the layer of the stack in place)
  xla int8 dot        XLA's int8 x int8 -> int32 dot, one scale per tensor (no block scales): the library path
                      XLA:CPU has for integer dots, as the comparison point for a library kernel
  ours int8 / int4    kernels_pallas.quantized_matmul with blocks of 32 (Q8_0 / Q4_1 layouts), activations
                      quantized per block on the fly (with VNNI: a row-dot GEMV for few rows, a GEMM for more)
GOPS = 2 M K N / time (best of 3 runs of --reps calls). Weights stay hot in cache here (the model's step reads
them from memory), so these are compute figures; scripts/profile_step.py gives the in-step ones.

    .venv/bin/python scripts/bench_kernels.py --stream [--m 1,2,4,8]

instead runs a decode step's quantized projections as the model does: a scan over 30 layers of stacked
SmolLM2-135M weights (q, k, v and gate, up in one call each, o, down), so every weight comes from memory, with
the CPU's widest kernels ("auto") and with the AVX2 baseline pinned ("avx2"), interleaved; GB/s = weight bytes
read / time (min and median of 30).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SHAPES = ((576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152))  # qkv, o, gate+up, down, LM head


def best_time(fn, *args, reps: int) -> float:
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def stream(ms: list[int]) -> int:
    """A decode step's quantized projections over 30 stacked layers (weights from memory), per M and bit width."""
    import functools

    from kernels_pallas.quantized_matmul import quantized_matmul, quantized_matmul_many

    layers, hidden, inter = 30, 576, 1536
    rng = np.random.default_rng(0)

    def weight(n, k, bits):
        scales = jnp.asarray(rng.random((layers, n, k // 32)) * 0.01 + 1e-3, jnp.float16)
        if bits == 4:
            values = jnp.asarray(rng.integers(0, 256, (layers, n, k // 2)), jnp.uint8)
            return values, scales, jnp.asarray(-rng.random((layers, n, k // 32)) * 0.01, jnp.float16)
        return jnp.asarray(rng.integers(-127, 128, (layers, n, k)), jnp.int8), scales, None

    def step(x, w, *, isa):
        def body(h, i):
            q, k, v = quantized_matmul_many(h, [w["q"], w["k"], w["v"]], i, isa=isa)
            o = quantized_matmul(q, *w["o"], layer=i, isa=isa)
            g, u = quantized_matmul_many(o, [w["gate"], w["up"]], i, isa=isa)
            d = quantized_matmul(jax.nn.silu(g) * u, *w["down"], layer=i, isa=isa)
            return h + 1e-3 * d + 0 * (k.sum() + v.sum()), None

        return jax.lax.scan(body, x, jnp.arange(layers))[0]

    print(f"{'bits':>4} {'M':>3}  {'isa':>5} {'min ms':>7} {'med ms':>7} {'GB/s':>6}   (weights from memory)")
    for bits in (4, 8):
        shapes = {
            "q": (hidden, hidden),
            "k": (192, hidden),
            "v": (192, hidden),
            "o": (hidden, hidden),
            "gate": (inter, hidden),
            "up": (inter, hidden),
            "down": (hidden, inter),
        }
        w = {name: weight(n, k, bits) for name, (n, k) in shapes.items()}
        nbytes = sum(a.nbytes for t in w.values() for a in t if a is not None)
        for m in ms:
            x = jnp.asarray(rng.standard_normal((m, hidden)), jnp.float32)
            fns = {isa: jax.jit(functools.partial(step, isa=isa)) for isa in ("auto", "avx2")}
            for fn in fns.values():
                fn(x, w).block_until_ready()
            times = {isa: [] for isa in fns}
            for _ in range(30):
                for isa, fn in fns.items():
                    t = time.perf_counter()
                    fn(x, w).block_until_ready()
                    times[isa].append(time.perf_counter() - t)
            for isa, ts in times.items():
                print(
                    f"{bits:>4} {m:>3}  {isa:>5} {min(ts) * 1e3:>7.2f} {np.median(ts) * 1e3:>7.2f} "
                    f"{nbytes / min(ts) / 1e9:>6.1f}"
                )
            sys.stdout.flush()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,8,64,256", help="rows of x, comma-separated")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--stream", action="store_true", help="30 layers of weights from memory (see above)")
    args = ap.parse_args()
    if args.stream:
        return stream([int(v) for v in args.m.split(",")])
    from kernels_pallas.cpu import cpu_flags
    from kernels_pallas.dense_matmul import dense_matmul
    from kernels_pallas.quantized_matmul import quantized_matmul

    flags = cpu_flags()
    print(f"CPU: {os.cpu_count()} cores; avx512f {'avx512f' in flags}, avx512_vnni {'avx512_vnni' in flags}")
    rng = np.random.default_rng(0)
    kernels = {
        "xla f32 slice+dot": jax.jit(lambda x, w, i: x @ w[i]),
        "xla f32 dot": jax.jit(lambda x, w: x @ w),
        "ours f32": jax.jit(lambda x, w, i: dense_matmul(x, w, i)),
        "xla int8 dot": jax.jit(lambda x, w: jax.lax.dot(x, w, preferred_element_type=jnp.int32)),
        "ours int8": jax.jit(lambda x, v, s: quantized_matmul(x, v, s)),
        "ours int4": jax.jit(lambda x, v, s, m: quantized_matmul(x, v, s, m)),
    }
    print(f"{'M':>4} {'K':>5} {'N':>6}  " + "  ".join(f"{name:>17}" for name in kernels) + "   (GOPS)")
    for m in (int(v) for v in args.m.split(",")):
        for k, n in SHAPES:
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
            stack = jnp.asarray(rng.standard_normal((4, k, n)), jnp.float32)
            xi = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
            wi = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
            v8 = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
            v4 = jnp.asarray(rng.integers(0, 256, (n, k // 2)), jnp.uint8)
            scales = jnp.asarray(rng.random((n, k // 32)) * 0.01 + 1e-3, jnp.float16)
            mins = jnp.asarray(-rng.random((n, k // 32)) * 0.01, jnp.float16)
            inputs = {
                "xla f32 slice+dot": (x, stack, jnp.int32(2)),
                "xla f32 dot": (x, stack[2]),
                "ours f32": (x, stack, jnp.int32(2)),
                "xla int8 dot": (xi, wi),
                "ours int8": (x, v8, scales),
                "ours int4": (x, v4, scales, mins),
            }
            ops = 2 * m * k * n
            row = [ops / best_time(fn, *inputs[name], reps=args.reps) / 1e9 for name, fn in kernels.items()]
            print(f"{m:>4} {k:>5} {n:>6}  " + "  ".join(f"{g:>17.0f}" for g in row))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
