"""Single-stream generation: jaxserve (per --quantization mode) next to vLLM CPU, HF transformers and llama.cpp.

    .venv/bin/python scripts/bench_generate.py [--quantization none,int8,int4] [--engines jaxserve,vllm,hf,llamacpp]
        [--num-prompts 3] [--json out.json] [... any scripts/bench_throughput.py flag]

It is scripts/bench_throughput.py's workload S: --num-prompts (3) prompts of exactly 128 token ids, 128 greedy
output tokens each (EOS ignored), run one after another so no engine ever batches them; every engine in its own
process, with identical token ids. Columns: svc TTFT = prefill + first token of one 128-token prompt; dec tok/s =
1 / (median time per output token after the first); RSS = the worker's peak resident memory. Ratios are
jaxserve/peer (decode > 1x and TTFT < 1x: jaxserve is faster). llama.cpp runs with one thread per core.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_throughput  # noqa: E402

if __name__ == "__main__":
    if "-h" in sys.argv or "--help" in sys.argv:
        print(__doc__)
        sys.exit(0)
    args = [a for a in sys.argv[1:]]
    if "--workload" not in args:
        args = ["--workload", "S", *args]
    if "--quantization" not in args:
        args += ["--quantization", "none,int8,int4"]
    sys.argv = [sys.argv[0], *args]
    sys.exit(bench_throughput.main())
