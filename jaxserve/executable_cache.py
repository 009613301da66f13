"""Compiled step executables kept on disk, so a warm start neither compiles nor traces.

JAX's persistent compilation cache skips XLA's compile, but its key is the lowered program: every start still
traces the model and lowers it to StableHLO for each bucket first (~0.2 s a bucket for SmolLM2 here, most of a
warm start's compile time). This cache keys an executable on what the program is made of instead, and loads it
with the compiler's own serialization (jax.experimental.serialize_executable):

  * the runtime's sources (every .py/.cc/.h under jaxserve/, models/, kernels_pallas/): any code change misses;
  * jax and jaxlib versions, the platform, the devices' kinds and the host CPU's feature flags;
  * the runner's class and step function, the model config, the resolved attention backend;
  * every argument's tree structure, shapes, dtypes and shardings (weights, KV pages, step inputs);
  * the environment's XLA_*/JAX_*/JAXSERVE_* variables and the jax flags that change tracing.

It lives beside the persistent cache (under its directory, `jaxserve-executables/`), is used only when that cache
is on, for engines on one device (a multi-device executable loaded back ran with another device assignment than
its mesh's: tensor- and data-parallel engines take the persistent cache's path), and not under jax.distributed
(loaded onto the default device, another process's: see directory()). An entry is loaded onto the runner's own
device (deserialize_and_load with no devices named loads onto all of the backend's). Entries
are pickles of executables: the directory is trusted as JAX's own cache directory is (it holds code either way).
An entry that does not load (a truncated file, another build) is deleted and the step compiled again.
JAXSERVE_EXECUTABLE_CACHE=0 turns it off.

Only a real compile is stored: an executable XLA:CPU loaded from the persistent cache serializes without its
machine code (running the copy fails: "Function wrapped_iota not found"). So where the persistent cache already
holds a program (a cache dir filled by an earlier jaxserve whose lowered program is unchanged), starts take the
persistent cache's path (trace, lower, load) until a real compile of that program stores it here.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle

import jax

log = logging.getLogger("jaxserve.executables")
SUBDIR = "jaxserve-executables"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGES = ("jaxserve", "models", "kernels_pallas")


@functools.cache
def source_digest() -> str:
    h = hashlib.sha256()
    for pkg in _PACKAGES:
        for dirpath, dirnames, files in os.walk(os.path.join(_ROOT, pkg)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(("_", ".")))  # __pycache__, _build
            for name in sorted(files):
                if name.endswith((".py", ".cc", ".h")):
                    path = os.path.join(dirpath, name)
                    h.update(os.path.relpath(path, _ROOT).encode())
                    with open(path, "rb") as f:
                        h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def describe(fn) -> str:
    """A step function by name (a functools.partial with its bound arguments)."""
    if isinstance(fn, functools.partial):
        return f"partial({describe(fn.func)}, {fn.args!r}, {sorted(fn.keywords.items())!r})"
    return f"{fn.__module__}.{fn.__qualname__}"


def directory() -> str | None:
    """Where entries go, or None when the cache is off (no persistent cache, or JAXSERVE_EXECUTABLE_CACHE=0)."""
    base = jax.config.jax_compilation_cache_dir
    if not base or os.environ.get("JAXSERVE_EXECUTABLE_CACHE", "1") == "0":
        return None
    if jax.process_count() > 1:  # (loaded with the default device, a two-process batch job's process 1 ran on
        return None  # process 0's; with its own device named it should not, but that is untested: left to XLA's)
    return os.path.join(os.path.expanduser(base), SUBDIR)


def _host_features() -> str:
    """The CPU's feature flags (XLA:CPU compiles for the host it runs on; a cache dir shared between hosts of
    other CPUs must not hand one's machine code to the other)."""
    from kernels_pallas.cpu import cpu_flags

    return hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]


def _aval(a) -> tuple:
    return (tuple(a.shape), str(a.dtype), str(getattr(a, "sharding", None)))


def entry_path(parts: dict, args) -> str | None:
    """The file of the executable that `parts` (what the runner is) compiles over `args`, or None (cache off)."""
    base = directory()
    if base is None:
        return None
    import jaxlib

    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("XLA_", "JAX_", "JAXSERVE_"))}
    flags = {k: getattr(jax.config, k) for k in ("jax_enable_x64", "jax_default_matmul_precision")}
    key = repr(
        (
            source_digest(),
            jax.__version__,
            jaxlib.__version__,
            jax.default_backend(),
            sorted({d.device_kind for d in jax.devices()}),
            _host_features(),
            sorted(parts.items()),
            str(jax.tree.structure(args)),
            jax.tree.map(_aval, args),
            env,
            flags,
        )
    )
    return os.path.join(base, hashlib.sha256(key.encode()).hexdigest() + ".exe")


def load(path: str | None, device=None):
    """The executable stored at `path`, loaded onto `device` (None: the default one), or None (no entry, or one
    that does not load: removed)."""
    if path is None or not os.path.exists(path):
        return None
    from jax.experimental.serialize_executable import deserialize_and_load

    try:
        with open(path, "rb") as f:
            payload, in_tree, out_tree = pickle.load(f)
        # (execution_devices left out means every device of the backend: a one-device executable loaded so in a
        # process with several devices expects an argument shard on each)
        return deserialize_and_load(payload, in_tree, out_tree, execution_devices=[device or jax.devices()[0]])
    except Exception as e:  # noqa: BLE001 - any broken entry is a miss, compiled again
        log.warning("executable cache: %s does not load (%s: %s); compiling again", path, type(e).__name__, e)
        try:
            os.remove(path)
        except OSError:
            pass
        return None


def store(path: str | None, compiled) -> None:
    """Write `compiled` at `path` (atomically: a concurrent reader sees all of it or nothing); a failure only
    logs (the executable is in memory either way)."""
    if path is None:
        return
    from jax.experimental.serialize_executable import serialize

    try:
        blob = pickle.dumps(serialize(compiled))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
        evict(os.path.dirname(path))
    except Exception as e:  # noqa: BLE001 - a full disk or an executable that cannot serialize
        log.warning("executable cache: cannot store %s (%s: %s)", path, type(e).__name__, e)


def evict(base: str, max_bytes: int | None = None) -> None:
    """Keep the directory under max_bytes (JAXSERVE_EXECUTABLE_CACHE_MAX_BYTES, default 2 GiB): the entries
    used longest ago go first (every source change keys new ones; the old ones would pile up)."""
    if max_bytes is None:
        max_bytes = int(os.environ.get("JAXSERVE_EXECUTABLE_CACHE_MAX_BYTES", 2 << 30))
    entries = []
    for name in os.listdir(base):
        if name.endswith(".exe"):
            st = os.stat(os.path.join(base, name))
            entries.append((max(st.st_atime, st.st_mtime), st.st_size, name))
    total = sum(size for _, size, _ in entries)
    for _, size, name in sorted(entries):
        if total <= max_bytes:
            break
        try:
            os.remove(os.path.join(base, name))
            total -= size
        except OSError:
            pass
