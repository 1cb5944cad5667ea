"""How torch's CPU threads behave when other processes share the cores: the thread policy every
entry point applies before torch is imported.

torch's CPU kernels (MKL and oneDNN inside them too) run on GNU OpenMP (libgomp, shipped in torch's
Linux wheel). After each parallel region libgomp's worker threads *spin* (busy-wait, 300,000
iterations by default) for the next region instead of sleeping. On an idle machine that saves a
wake-up per region; when another process wants the same cores, the spinning threads burn the time
slices the working thread is waiting for, and a region ends only when the scheduler happens to run
all of its threads. On the project's 2-core VM, a 64x256 @ 256x1024 matmul + backward loop (it/s,
median of 5 one-second runs; the machine was also running other users' work, load average 11-12,
see bench/RESULTS.md "Contention"):

=================================  ========  =============  ==============
torch threads, wait policy          alone    + 1 busy proc  + 2 busy procs
=================================  ========  =============  ==============
2, default (spin)                   25       9              2
2, ``OMP_WAIT_POLICY=PASSIVE``      222      194            291
2, ``GOMP_SPINCOUNT=10000``         53       24             32
1, default                          213      96             70
=================================  ========  =============  ==============

``OMP_WAIT_POLICY=PASSIVE`` makes idle OpenMP threads sleep at once (libgomp: spin count 0; LLVM
libomp, torch's OpenMP on macOS, treats it as a block time of 0; Intel's libiomp honours it too, so
KMP_BLOCKTIME is not needed). A short spin (``GOMP_SPINCOUNT``) keeps most of the collapse. The
policy keeps the number of compute threads, so float results are bit-identical (checked: the demo
model's logits and every gradient of a forward/backward hash the same with and without it; one
thread instead of two changes the bits, a reduction's split depends on the thread count). Nothing
is needed after torch's import: with the policy on, a py-spy profile of the GRPO step under a
competing process shows only the model's own work (forward, backward, generation, trl's log-prob
kernel); the inter-op pool's idle threads already sleep. ``python -m bench contention`` measures the
GRPO step and the harvest pass with and without the policy, alone and beside busy processes.

:func:`apply_thread_policy` sets the variables only where the user has not set them (an explicit
``OMP_WAIT_POLICY=ACTIVE`` wins), and ``LFP_THREAD_POLICY=off`` turns the whole policy off. It must
run before ``import torch``: libgomp reads its environment once, when torch's import loads it.
This module therefore imports nothing heavy.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

#: Set (unless already set) before torch is imported. Module-level so tests and benches can read it.
POLICY_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
#: ``LFP_THREAD_POLICY=off`` (or 0/false/no) disables :func:`apply_thread_policy`.
SWITCH = "LFP_THREAD_POLICY"


def policy_enabled(environ: MutableMapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(SWITCH, "on").strip().lower() not in ("off", "0", "false", "no")


def apply_thread_policy(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the thread/wait policy in ``environ`` (default ``os.environ``) before torch loads.

    Variables the user already set are left alone. Call it first thing in an entry point, before
    any import that may import torch (transformers, trl, sae_lens, lfp_core modules...).

    Returns:
        The variables this call set (empty when the policy is off or everything was already set).
        Where torch is already imported (in ``sys.modules``) the environment is still set, for child
        processes, and a warning says the current process keeps the policy it started with.
    """
    env = os.environ if environ is None else environ
    if not policy_enabled(env):
        return {}
    applied = {k: v for k, v in POLICY_ENV.items() if k not in env}
    env.update(applied)
    if applied and environ is None and "torch" in sys.modules:
        log.warning(
            "torch was imported before the thread policy was applied: this process keeps OpenMP's "
            "default (spinning) wait policy; %s applies only to its child processes",
            ", ".join(f"{k}={v}" for k, v in applied.items()),
        )
    return applied
