"""The requests of the 2-process check (shared by tests/multihost_check.py and the test that compares)."""

PROMPTS = [[5, 17, 33, 90], [200, 3, 3, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61], [250] * 40]
PARAMS = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}
