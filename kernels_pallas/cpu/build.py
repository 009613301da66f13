"""Build jaxserve's C++ CPU kernels: `python -m kernels_pallas.cpu.build` (scripts/setup.sh runs it)."""

from __future__ import annotations

import sys

from kernels_pallas.cpu import CpuKernelsUnavailable, build, cpu_supports_kernels


def main() -> int:
    if not cpu_supports_kernels():
        print(
            "[jaxserve] this CPU lacks AVX2/FMA/F16C: the C++ kernels are not built; the jnp reference kernels "
            "run instead (attention_backend='reference')",
            file=sys.stderr,
        )
        return 0
    try:
        path = build(verbose="-v" in sys.argv)
    except CpuKernelsUnavailable as e:
        print(f"[jaxserve] {e}", file=sys.stderr)
        return 1
    print(f"[jaxserve] CPU kernels: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
