"""A real two-node Slurm cluster on this host, for tests: Debian's slurm-wlm and munge.

Both node names (n1, n2) run a ``slurmd`` on this machine at 127.0.0.1 with their own ports;
``slurmctld`` runs beside them. Two partitions share the nodes: ``debug`` (the default) and
``urgent``, whose jobs preempt debug's (PreemptMode=REQUEUE, with a 120 s grace time).
Everything (config, state, spool, logs, and the cluster's own munged and its socket) lives in a
temporary folder; teardown cancels the jobs, waits until the queue drains and stops the daemons.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


class ClusterUnavailable(Exception):
    """Slurm cannot be installed or started here (not root, no apt-get, no network)."""


def _free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterUnavailable("slurm-wlm and munge are missing and cannot be installed (needs root + apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"],):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise ClusterUnavailable(f"apt-get install slurm-wlm munge failed: {done.stderr[-500:]}")


def _munge_running(sock: Path) -> bool:
    return subprocess.run(["munge", "-n", f"--socket={sock}"], capture_output=True).returncode == 0


def start_munge(sock: Path) -> subprocess.Popen:
    """This cluster's own munged, on ``sock`` (its files beside it). Never the system's shared one:
    `pytest -n 2` runs two clusters on this host, and a munged one cluster started and then
    stopped at its teardown left the other's daemons unable to authenticate anything."""
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    home = sock.parent
    home.mkdir(mode=0o755, parents=True, exist_ok=True)
    files = [f"--socket={sock}", f"--pid-file={home / 'munged.pid'}", f"--seed-file={home / 'munged.seed'}"]
    cmd = ["munged", "--force", "--foreground", *files, f"--log-file={home / 'munged.log'}", f"--key-file={key}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if _munge_running(sock):
            return proc
        time.sleep(0.1)
    proc.kill()
    log = home / "munged.log"
    raise ClusterUnavailable(f"munged did not start: {log.read_text()[-500:] if log.exists() else 'no log'}")


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.slurmd: dict[str, subprocess.Popen] = {}
        self.munge: subprocess.Popen | None = None
        self.munge_socket = root / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        host = socket.gethostname()
        ctld_port, d1, d2 = _free_ports(3)
        for sub in ("state", "spool/n1", "spool/n2", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(
            f"""ClusterName=bgpt-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10,socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/logs/slurmctld.log
SlurmdLogFile={r}/logs/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
MinJobAge=60
SchedulerParameters=bf_interval=2,sched_interval=2
SlurmdTimeout=30
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={d1} CPUs=2 RealMemory=8000 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={d2} CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES PriorityTier=1 GraceTime=120
PartitionName=urgent Nodes=n1,n2 MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""
        )

    def _daemon(self, *cmd: str) -> subprocess.Popen:
        with open(self.root / "logs" / f"{cmd[0]}-{len(self.procs)}.out", "w") as log:
            self.procs.append(subprocess.Popen(list(cmd), env=self.env, stdout=log, stderr=subprocess.STDOUT))
        return self.procs[-1]

    def start_slurmd(self, node: str) -> None:
        self.slurmd[node] = self._daemon("slurmd", "-D", "-N", node, "-f", str(self.conf))

    def fail_node(self, node: str) -> int:
        """What a node's power loss does to the cluster: its slurmd, and every process of the job
        steps on it (each task's slurmstepd and its children), die at once (SIGKILL). Returns how
        many job processes were killed."""
        self.slurmd[node].kill()
        self.slurmd[node].wait()
        victims = set()
        for proc in Path("/proc").iterdir():
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if f"SLURMD_NODENAME={node}".encode() in env and f"SLURM_CONF={self.conf}".encode() in env:
                victims.add(int(proc.name))
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if (Path("/proc") / str(parent) / "comm").read_text().strip() == "slurmstepd":
                    victims.add(parent)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(victims)

    def start(self) -> Cluster:
        ensure_installed()
        self.munge = start_munge(self.munge_socket)
        self.write_config()
        self._daemon("slurmctld", "-D", "-i", "-f", str(self.conf))
        time.sleep(1)
        for node in ("n1", "n2"):
            self.start_slurmd(node)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%T %D", check=False).stdout.split()
            if out[:2] == ["idle", "2"]:
                return self
            time.sleep(0.5)
        self.stop()
        raise ClusterUnavailable(f"the Slurm nodes did not come up; see {self.root / 'logs'}")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr}")
        return done

    def job_state(self, job: str) -> str:
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "GONE"

    def agent_queue(self) -> int:
        """Messages slurmctld still has to deliver (its retry list, `sdiag` "Agent queue size")."""
        for line in self.run("sdiag").stdout.splitlines():
            if line.strip().startswith("Agent queue size:"):
                return int(line.split(":", 1)[1])
        raise RuntimeError("sdiag printed no agent queue size")

    def wait_for(self, job: str, states: set[str], timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job} never reached {states}; last state {self.job_state(job)}")

    def stop(self) -> None:
        self.run("scancel", "--full", "--user", "root", check=False)
        deadline = time.time() + 60
        while time.time() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(0.5)
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.munge is not None:
            self.munge.terminate()
            self.munge.wait(timeout=20)
