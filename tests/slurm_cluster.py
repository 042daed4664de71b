"""A real Slurm cluster on this host for the tests: munged, slurmctld and one or more slurmd, CPU only.

`SlurmCluster().start()` writes a private slurm.conf into a fresh directory under /tmp and starts the daemons
from Debian's `slurm-wlm` (22.05 on bookworm) as children of the test process; `stop()` cancels the jobs, ends
the daemons and every process a job left behind, and deletes the directory. Nothing outside that directory is
written: no /etc/slurm, no /etc/munge, no system service. Clients see the cluster through `cluster.env`
(SLURM_CONF pointing at the private file), so a system Slurm, if any, is never touched.

Choices, and why:

- Private munge. munged runs with its own key, socket, pid, log and seed files in the private directory, and
  Slurm is pointed at that socket with `AuthInfo=socket=...` (used by both auth/munge and cred/munge). No
  system munged is needed (containers rarely run one) and a system one, if running, is left alone. munged
  insists that every directory above its socket is executable by all, hence the 0755 private directory; the
  key stays 0600.
- `ProctrackType=proctrack/linuxproc`: tracks a job's processes by walking the parent/child tree in /proc.
  proctrack/cgroup needs a writable cgroup hierarchy, which containers (and gVisor) usually do not give.
  The cost: a process whose parent dies is reparented to init and escapes the job, so it can outlive the job
  (a `sleep &` left by a script that exits). `stop()` therefore also kills any process whose environment
  carries this cluster's unique SLURM_CLUSTER_NAME (every job process inherits it) or the daemons' marker.
- `TaskPlugin=task/none`: no affinity/cgroup confinement, for the same reason.
- `SelectType=select/cons_tres` with `CR_Core`: cores are the consumable, so several 1-CPU jobs share the
  node (select/linear would hand each job a whole node). Memory is not consumable, so jobs need no --mem.
- `SlurmdParameters=config_overrides`: slurmd trusts slurm.conf instead of draining the node when the
  configured CPUs/sockets/memory differ from the hardware; it lets two emulated nodes share one host.
- `JobRequeue=1`, `PreemptType=preempt/partition_prio`, `PreemptMode=REQUEUE`: `scontrol requeue JOBID` works
  on any batch job, and a job in the high-tier partition `urgent` preempts (requeues) jobs in `debug`.
- `AuthInfo=...,cred_expire=N`: Slurm holds a requeued job until the job credential lifetime has passed
  (BeginTime = now + cred_expire, default 120 s); N (default 10 s) keeps requeue tests short.
- `SchedulerParameters=bf_interval=1,sched_interval=2` and `MinJobAge=30`: pending jobs (e.g. requeued ones
  whose BeginTime passed) are looked at every second or two; finished jobs stay visible to squeue/scontrol
  for 30 s (long enough for a poller to see the final state, short enough that the queue stays small).
- `KillWait` (default 5 s): the gap between SIGTERM and SIGKILL on scancel, requeue, preemption and time out.
- `CommunicationParameters=NoCtldInAddrAny,NoInAddrAny`: slurmctld and slurmd bind 127.0.0.1, not 0.0.0.0.
- Ports: SlurmctldPort and each node's slurmd Port are free high ports picked at start.
- `gpus=N`: N fake GPUs per node (`Gres=gpu:N`, gres.conf `File=` symlinks to /dev/null: slurmd wants a
  character device, any will do). Slurm allocates them and sets CUDA_VISIBLE_DEVICES / SLURM_JOB_GPUS, so
  `--gpus-per-node` and the GPUs a job is given can be tested on a CPU-only machine (CUDA still sees none).
- `nodes=2`: several slurmd on one host, each `-N nodeN` with its own Port and spool directory (`%n`). Needs
  a Slurm configured with --enable-multiple-slurmd (else the slurmds reject the credentials they share via
  the one munged as replayed); Debian's is (auth_munge.so carries the MULTIPLE_SLURMD-only "replayed cred,
  but this is expected in multiple slurmd mode" message). All nodes are the same machine: `hostname` prints
  the host's name on every node; `$SLURMD_NODENAME` tells them apart.

Everything runs as the invoking user; as root (CI, these containers) SlurmUser/SlurmdUser are root and jobs
run as root. Gotchas worth knowing when writing tests against it:

- sbatch's default output file is `slurm-%j.out` in the submitter's working directory (the repository, from
  pytest): pass `-o` (or `--chdir`).
- `scancel --signal=SIG JOB` signals the job's steps only, never the batch script; `--batch` signals the
  script (bash runs a trap once its foreground command returns) and `--full` the script and its children.
- `scontrol requeue`, preemption, scancel and a time out all send SIGCONT + SIGTERM to every process of the
  job, then SIGKILL after KillWait. A requeued job is PENDING (Reason=BeginTime) for ~requeue_delay seconds,
  then runs again with SLURM_RESTART_COUNT=1; a job submitted with --no-requeue refuses `scontrol requeue`
  ("Requested operation is presently disabled") and ends PREEMPTED when preempted.
- `sbatch --signal=B:USR1@N` is driven by slurmctld's periodic time-limit check (about every 30 s): the
  signal can come tens of seconds early, and the time limit itself is enforced a few seconds late.
- slurmd logs "can not load PMIx library" errors at start (it loads every MPI plugin); harmless.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
PACKAGES = ("slurm-wlm", "munge")
# Job states after which a job never runs again (a requeued job goes back to PENDING instead).
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    }
)
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_MARKER = "ORCH_TEST_SLURM_CLUSTER"  # set in the daemons' environment (slurmstepd inherits it) for stop()


def which(name: str) -> str | None:
    """A Slurm/munge program; the daemons live in /usr/sbin, which a non-root PATH may lack."""
    return shutil.which(name, path=_SBIN_PATH)


def missing() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS, "munge") if which(name) is None]


def install(timeout: float = 600) -> tuple[bool, str]:
    """Make sure the Slurm and munge programs exist: apt-get install Debian's slurm-wlm and munge if needed.

    Returns (ok, reason). Installs only as root on a system with apt-get, within `timeout` seconds in all.
    Daemons the packages would start are not used (on a systemd host, the package's own munge service may
    start; it does not interfere with the private munged).
    """
    if not missing():
        return True, "already installed"
    if os.geteuid() != 0:
        return False, f"{', '.join(missing())} missing and not root: apt-get install {' '.join(PACKAGES)}"
    if shutil.which("apt-get") is None:
        return False, f"{', '.join(missing())} missing and no apt-get to install {' '.join(PACKAGES)}"
    deadline = time.monotonic() + timeout
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        try:
            out = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic())
            )
        except subprocess.TimeoutExpired:
            return False, f"{' '.join(cmd)} did not finish within {timeout:.0f}s"
        if out.returncode:
            return False, f"{' '.join(cmd)} failed ({out.returncode}): {(out.stderr or out.stdout)[-2000:]}"
    if missing():
        return False, f"still missing after apt-get install: {', '.join(missing())}"
    return True, f"installed {' '.join(PACKAGES)}"


def slurm_version() -> str | None:
    """E.g. "slurm-wlm 22.05.8" (bookworm), from `slurmd -V`: the clients' --version wants a slurm.conf."""
    exe = which("slurmd")
    if exe is None:
        return None
    out = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_total_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


class SlurmCluster:
    """munged + slurmctld + `nodes` slurmd on 127.0.0.1, configured in a private directory.

    Partitions: `debug` (default, all nodes, no time limit) and `urgent` (same nodes, higher PriorityTier:
    its jobs preempt, i.e. requeue, jobs in debug). Use `env` for every client command (`sbatch`, `srun`...).
    """

    def __init__(
        self,
        nodes: int = 1,
        cpus: int | None = None,
        gpus: int = 0,
        kill_wait: int = 5,
        requeue_delay: int = 10,
        start_timeout: float = 60,
    ):
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        if requeue_delay < 5:  # Slurm ignores cred_expire < 5 and falls back to 120 s
            raise ValueError("requeue_delay (AuthInfo cred_expire) must be >= 5")
        self.nodes = nodes
        self.cpus = cpus or os.cpu_count() or 1  # per node
        self.gpus = gpus  # fake, per node
        self.kill_wait = kill_wait
        self.requeue_delay = requeue_delay
        self.start_timeout = start_timeout
        # Unique per instance: every job process carries it as SLURM_CLUSTER_NAME, which is how stop() finds
        # processes a job left behind. Lower case, letters/digits only, short (Slurm limits cluster names).
        self.name = "orch" + uuid.uuid4().hex[:8]
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.root: Path | None = None
        self.conf: Path | None = None
        self.env: dict[str, str] = {}
        self.startup_s: float | None = None
        self._procs: dict[str, subprocess.Popen] = {}

    # ----------------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> SlurmCluster:
        if missing():
            raise RuntimeError(f"Slurm/munge programs missing: {', '.join(missing())} (see install())")
        t0 = time.monotonic()
        for attempt in range(3):
            self.root = Path(tempfile.mkdtemp(prefix="orch-slurm-"))
            try:
                self._start()
                break
            except BaseException as e:
                # A free port taken by someone else between free_port() and the daemon's bind: try new ports.
                retry = attempt < 2 and isinstance(e, RuntimeError) and "Address already in use" in str(e)
                self.stop()
                if not retry:
                    raise
        self.startup_s = time.monotonic() - t0
        return self

    def _start(self) -> None:
        root = self.root
        os.chmod(root, 0o755)  # munged: every directory above its socket must be executable by all
        for sub in ("state", "log", *(f"spool/{n}" for n in self.node_names)):
            (root / sub).mkdir(parents=True)
        self.munge_socket = root / "munge.sock"
        self.conf = root / "slurm.conf"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not a surrounding job's
        self.env = {**clean, "SLURM_CONF": str(self.conf)}
        self._daemon_env = {**self.env, _MARKER: str(root)}

        key = root / "munge.key"
        key.touch(mode=0o600)
        key.write_bytes(os.urandom(1024))
        self._spawn(
            "munged",
            [
                which("munged"),
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={root / 'munged.pid'}",
                f"--log-file={root / 'log' / 'munged.log'}",
                f"--seed-file={root / 'munged.seed'}",
            ],
        )
        self._wait_for(lambda: self.munge_socket.exists(), "munged socket", 15)

        self.ctld_port = free_port()
        self.node_ports = {n: free_port() for n in self.node_names}
        if self.gpus:
            self._fake_gpus()
        self.conf.write_text(self._slurm_conf())
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-f", str(self.conf)])
        for node in self.node_names:
            self._spawn(f"slurmd-{node}", [which("slurmd"), "-D", "-f", str(self.conf), "-N", node])
        self._wait_for(self._all_idle, f"{self.nodes} node(s) idle in sinfo", self.start_timeout)

    def _fake_gpus(self) -> None:
        """gres.conf (read from slurm.conf's folder) with `gpus` devices per node, symlinks to /dev/null."""
        lines = ["AutoDetect=off"]
        for node in self.node_names:
            dev = self.root / "dev" / node
            dev.mkdir(parents=True)
            for i in range(self.gpus):
                (dev / f"nvidia{i}").symlink_to("/dev/null")
            files = f"{dev}/nvidia[0-{self.gpus - 1}]" if self.gpus > 1 else f"{dev}/nvidia0"
            lines.append(f"NodeName={node} Name=gpu File={files}")
        (self.root / "gres.conf").write_text("\n".join(lines) + "\n")

    def _slurm_conf(self) -> str:
        root = self.root
        real_memory = max(256, int(_mem_total_mb() * 0.9))
        lines = [
            f"ClusterName={self.name}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.node_ports[self.node_names[0]]}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.requeue_delay}",
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            f"SlurmUser={_user()}",
            f"SlurmdUser={_user()}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool' / '%n'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2",
            "JobRequeue=1",
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            f"KillWait={self.kill_wait}",
            "MinJobAge=30",
            "SchedulerParameters=bf_interval=1,sched_interval=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
        ]
        gres = ""
        if self.gpus:
            lines.append("GresTypes=gpu")
            gres = f"Gres=gpu:{self.gpus} "
        for node in self.node_names:
            lines.append(
                f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} Port={self.node_ports[node]} "
                f"CPUs={self.cpus} RealMemory={real_memory} {gres}State=UNKNOWN"
            )
        nodes = ",".join(self.node_names)
        lines.append(f"PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP PriorityTier=1")
        lines.append(f"PartitionName=urgent Nodes={nodes} MaxTime=INFINITE State=UP PriorityTier=10")
        return "\n".join(lines) + "\n"

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.root / "log" / f"{name}.out", "wb") as out:
            self._procs[name] = subprocess.Popen(
                cmd,
                env=self._daemon_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.root,
            )

    def _wait_for(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def _all_idle(self) -> bool:
        states = self.node_states()
        return len(states) == self.nodes and all(s == "idle" for s in states.values())

    def stop(self) -> None:
        """Cancel every job, end the daemons and what the jobs left behind, delete the private directory."""
        if self.root is None:
            return
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                jobs = self._active_jobs()
                if jobs:
                    self.run("scancel", "--signal=KILL", "--full", *jobs, timeout=10, check=False)
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline and self._active_jobs():
                        time.sleep(0.2)
            except (OSError, subprocess.SubprocessError):
                pass
        # slurmd first (its job steps, slurmstepd, live on without it), then the controller, then munged.
        for name in sorted(self._procs, key=lambda n: (not n.startswith("slurmd"), n == "munged")):
            _terminate(self._procs[name])
        for pid in self._procs_of_jobs() + self._marked_procs():
            _kill(pid)
        self._procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def _active_jobs(self) -> list[str]:
        """Jobs not yet over (squeue's default: pending, running, completing...)."""
        return self.run("squeue", "-h", "-o", "%A", timeout=10, check=False).stdout.split()

    def _procs_of_jobs(self) -> list[int]:
        return _pids_with_env(f"SLURM_CLUSTER_NAME={self.name}")

    def _marked_procs(self) -> list[int]:
        return _pids_with_env(f"{_MARKER}={self.root}")

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon log, for error messages."""
        if self.root is None:
            return ""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------------------------------------- clients

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster; raises with its output when check and it fails."""
        out = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
        return out

    def sbatch(self, args: list[str] | tuple[str, ...], timeout: float = 60) -> str:
        """Submit (`sbatch --parsable *args`) and return the job id."""
        out = self.run("sbatch", "--parsable", *args, timeout=timeout)
        return out.stdout.strip().split(";")[0]

    def squeue_state(self, job: str) -> str | None:
        """The job's state (PENDING, RUNNING, COMPLETED...), or None once the controller forgot it (MinJobAge)."""
        out = self.run("squeue", "-h", "-t", "all", "-j", str(job), "-o", "%T", timeout=30, check=False)
        state = out.stdout.strip()
        return state or None

    def job_info(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Reason, Restarts, ExitCode, NodeList...); {} once forgotten."""
        out = self.run("scontrol", "-o", "show", "job", str(job), timeout=30, check=False)
        if out.returncode:
            return {}
        return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)

    def wait_job(self, job: str, timeout: float = 60, poll: float = 0.2) -> str | None:
        """Wait until the job reaches a final state (FINAL_STATES) and return it; None if it was forgotten."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.squeue_state(job)
            if state is None or state in FINAL_STATES:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} still {state} after {timeout}s")
            time.sleep(poll)

    def node_states(self) -> dict[str, str]:
        """Node name -> sinfo's short state (idle, alloc, mix, down*, drain...)."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", timeout=30, check=False)
        states = {}
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _terminate(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pids_with_env(entry: str) -> list[int]:
    """Processes whose initial environment holds `entry` ("NAME=value"), never this process or its ancestors."""
    spare, pid = set(), os.getpid()
    while pid > 1:
        spare.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    needle = entry.encode() + b"\0"
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in spare:
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if env.startswith(needle) or b"\0" + needle in env:
            found.append(int(d.name))
    return found
