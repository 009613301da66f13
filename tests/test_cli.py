"""`jaxserve generate` / `jaxserve chat` as a user runs them: the default model, streamed text, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.engine_runs import greedy

pytestmark = pytest.mark.real_model


def _run(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "jaxserve.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_generate_default_model_greedy(real_scorer):
    prompt = "The capital of France is"
    proc = _run("generate", prompt, "--max-tokens", "12", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    tok = real_scorer.tokenizer
    ids = tok.encode(prompt)
    want = tok.decode(list(greedy(real_scorer, ids, 12, ignore_eos=False).token_ids), skip_special_tokens=True)
    assert proc.stdout == want + "\n"
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in proc.stderr and "tokens/s" in proc.stderr


def test_chat_from_stdin_applies_template(real_scorer):
    proc = _run("chat", "--temperature", "0", "--max-tokens", "16", stdin="What is 2+2?")
    assert proc.returncode == 0, proc.stderr
    tok = real_scorer.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}]))
    want = tok.decode(list(greedy(real_scorer, ids, 16, ignore_eos=False).token_ids), skip_special_tokens=True)
    assert proc.stdout == want + "\n"


def test_sampling_with_seed_is_reproducible():
    args = (
        "generate",
        "Once upon a time",
        "--max-tokens",
        "10",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--top-k",
        "40",
        "--seed",
        "123",
        "--quiet",
    )
    a, b = _run(*args), _run(*args)
    assert a.returncode == 0 and b.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


@pytest.mark.parametrize(
    "args,message",
    [
        (("generate", "hi", "--model", "/nonexistent.gguf"), "no such file or directory"),
        (("generate", "word " * 300, "--max-model-len", "64"), "exceeds max_model_len=64"),
        (("generate", "hi", "--temperature", "-1"), "SamplingParams.temperature=-1.0"),
        (("generate", "hi", "--max-model-len", "100000"), "exceeds the model's context of 8192"),
    ],
    ids=["missing-model", "prompt-too-long", "bad-temperature", "context-too-big"],
)
def test_errors_are_clear(args, message):
    proc = _run(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("jaxserve: error:")
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
