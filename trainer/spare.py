"""A warm spare: a trainer process started before its run is known, so that the run skips the interpreter's
start-up, `import torch` and the trainer's imports (~1.5 s on this 2-core CPU, bench/orchestrator.py), the
`torch._dynamo` import that torch.optim triggers on first use (~1 s), and on a GPU the CUDA context.

    python -m trainer.spare FD      # started by an orch worker (orchestrator/launchers/spare.py), not by hand

The worker starts one per slot, with the environment a cold launch on that slot would get (devices, thread
counts, compile caches: read when torch is imported, so they are set before), connected to it by a Unix
socket (SOCK_SEQPACKET) at descriptor FD. The spare imports, warms, says "ready" and waits. It holds no run
and no lock, reads no run directory, and dies with the worker: the kernel's parent-death signal
(runlock.die_with_parent) and, failing that, the socket's end-of-file.

A handoff is one message: the trainer's arguments, its environment, its working directory and the header
line of its log, with the open train.log attached (SCM_RIGHTS). The spare takes the run only if nothing it
read at import differs from what a cold launch would read now: the same environment but for the per-launch
keys, the same directory, the trainer's sources unchanged. It then writes the header, answers "ok", points
stdout and stderr at the log, and runs trainer/__main__.py as `python -m trainer ARGV` would (runpy): the
same code path, exit codes, result.json and lock handling. Otherwise it answers why not and exits, and the
worker launches the run cold.

`launch_began()` says when this launch began, for result.json's time to first step.
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import sys
import time
from pathlib import Path

from trainer import runlock

# What a launch may change in a spare's environment: nothing else of it is read after the imports.
PER_LAUNCH = ("ORCH_LAUNCH_ID", "ORCH_LAUNCHED_AT")
LAUNCHED_AT = "ORCH_LAUNCHED_AT"  # time.time() when the launcher started this launch (its Popen or handoff)
MAX_MESSAGE = 1 << 17  # a handoff's bytes: arguments and environment (a few kB; one datagram, under ~200 kB)
SOURCES = Path(__file__).parent

warm = False  # set in a spare once it has taken a run


def launch_began() -> tuple[float, bool]:
    """(when this launch began, whether a warm spare took it): ORCH_LAUNCHED_AT, which the worker sets at its
    Popen or handoff, else this process's start (a trainer started by hand)."""
    try:
        return float(os.environ[LAUNCHED_AT]), warm
    except (KeyError, ValueError):
        return process_start(), warm


def process_start() -> float:
    """This process's start on the wall clock, to ~10 ms (Linux /proc; elsewhere: now)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def sources_stamp() -> list[tuple[str, int, int]]:
    """The trainer's sources as (name, size, mtime): a spare whose code changed on disk must not train."""
    return sorted((p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in SOURCES.glob("*.py"))


def comparable(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in PER_LAUNCH}


def warm_up() -> None:
    """What every run would otherwise pay before its first step, done while no run waits."""
    import torch

    import trainer.train  # noqa: F401 - torch, numpy, the model, data, optimizer and sampling modules

    # Constructing an optimizer imports torch._dynamo (torch/_compile.py's disable wrapper): ~1 s idle, up
    # to 3.6 s on this loaded 2-core machine. One step and one backward warm the kernels' dispatch too. No
    # random numbers are drawn: a run seeds its generators itself, and a cold launch's match bit for bit.
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = torch.optim.AdamW([p])
    (p @ p).sum().backward()
    opt.step()
    if torch.cuda.is_available():  # the slot's devices only: CUDA_VISIBLE_DEVICES came with the environment
        torch.cuda.init()
        x = torch.ones(8, 8, device="cuda")
        (x @ x).sum().item()  # cuBLAS loaded
        import torch._inductor.compile_fx  # noqa: F401 - what the first torch.compile imports (seconds)

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def refusal(request: dict, env: dict[str, str], cwd: str, stamp: list) -> str | None:
    """Why this spare cannot be this run's cold launch, or None."""
    theirs = comparable(request["env"])
    changed = sorted(k for k in theirs.keys() | env.keys() if theirs.get(k) != env.get(k))
    if changed:
        return f"environment differs in {', '.join(changed)}"
    if request["cwd"] != cwd:
        return f"working directory {request['cwd']} is not the spare's {cwd}"
    if sources_stamp() != stamp:
        return f"the trainer's sources in {SOURCES} changed since the spare imported them"
    return None


def main(fd: int) -> None:
    runlock.die_with_parent()  # first: a spare must never outlive its worker
    sock = socket.socket(fileno=fd)
    given, cwd, stamp = dict(os.environ), os.getcwd(), sources_stamp()  # the stamp before the imports it vouches for
    try:
        warm_up()
    except Exception as exc:  # noqa: BLE001 - whatever broke, the worker launches cold and says why
        sock.send(f"broken: {type(exc).__name__}: {exc}".encode()[:4096])
        os._exit(1)
    # What the imports themselves put in the environment (inductor sets TORCHINDUCTOR_CACHE_DIR): a cold
    # launch's imports would add the same on top of its run's environment.
    added = {k: v for k, v in os.environ.items() if given.get(k) != v}
    env = comparable(given)
    sock.send(b"ready")
    try:
        message, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
    except OSError:
        os._exit(0)
    if not message:  # the worker closed its end: no run will come
        os._exit(0)
    request = json.loads(message)
    why = refusal(request, env, cwd, stamp) if len(fds) == 1 else "no log descriptor came with the run"
    if why:
        sock.send(f"no: {why}".encode())
        os._exit(0)
    [log] = fds
    os.write(log, request["header"].encode())  # before the trainer's first line, as a cold launch has it
    sock.send(b"ok")
    sock.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.clear()
    os.environ.update({**request["env"], **added})
    import trainer.spare  # this file runs as __main__: the flag launch_began() reads is the module's

    trainer.spare.warm = True
    # `python -m trainer ARGV`: trainer/__main__.py as __main__, whose own ending flushes and os._exit()s with
    # the trainer's code; an uncaught exception reaches the interpreter here, which reports it as it would.
    sys.argv = ["-m", *request["argv"]]
    runpy.run_module("trainer", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m trainer.spare FD (started by an orch worker with a socket at FD)")
    main(int(sys.argv[1]))
