"""A throw-away single-node Slurm cluster on localhost, for tests (needs root).

Debian packages: ``slurmd slurmctld slurm-client munge`` (Slurm 22.05). Everything lives in
one temporary directory: a private munged (own key and socket, run as the ``munge`` user),
``slurm.conf`` (proctrack/linuxproc, task/none, select/cons_tres, state and spool dirs
there, SlurmUser root, one node with this machine's CPUs and memory as ``slurmd -C``
reports them), and the logs. Daemons run in the foreground (``-D`` / ``-F``) as children
of this process and are torn down by PID; nothing system-wide (systemd, /etc/slurm,
/run/munge) is touched.

    with SlurmCluster() as cluster:          # daemons up, node idle
        subprocess.run(["sbatch", "--wait", "job.sh"], env=cluster.env())

By hand: ``python tests/slurm_cluster.py`` brings a cluster up, prints the SLURM_CONF to
export in another shell and keeps it up until Ctrl-C.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from e2e import DIST_VARS

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
PACKAGES = "slurmd slurmctld slurm-client munge"


def missing_requirements() -> list[str]:
    """What stops a local cluster from starting here (empty list: all good)."""
    problems = [f"{tool} not found" for tool in TOOLS if shutil.which(tool) is None]
    if problems:
        problems.append(f"install with: apt-get install -y {PACKAGES}")
    if os.geteuid() != 0:
        problems.append("must run as root (SlurmUser root, munged started as the munge user)")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        problems.append("no 'munge' user (the munge package creates it)")
    return problems


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_line(name: str | None = None) -> tuple[str, str]:
    """(node name, NodeName=... line) from ``slurmd -C`` (the machine's real CPUs/memory).
    The node keeps the machine's hostname when it resolves (jobs use the node name as
    MASTER_ADDR, as on a real cluster), else it is called ``localhost``."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("NodeName="))
    host = line.split()[0].split("=", 1)[1]
    if name is None:
        try:
            socket.gethostbyname(host)
            name = host
        except OSError:
            name = "localhost"
    return name, line.replace(f"NodeName={host}", f"NodeName={name}", 1)


class SlurmCluster:
    def __init__(self, root: str | os.PathLike | None = None, keep: bool = False, requeue_delay: int = 5,
                 node_name: str | None = None):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="janus-slurm-"))
        self.keep = keep
        self.requeue_delay = requeue_delay  # AuthInfo cred_expire: also how long a requeued job waits
        self.procs: dict[str, subprocess.Popen] = {}
        self.node = node_name or ""
        self.conf = self.root / "slurm.conf"

    # -- environment for clients (sbatch, srun inside jobs, squeue, ...) --
    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del env[key]  # never leak an outer allocation's settings into this cluster
        for key in DIST_VARS:
            env.pop(key, None)  # nor a process group's rendezvous (the launchers in the jobs make their own)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, check=check,
                              timeout=timeout)

    # -- lifecycle --
    def start(self, timeout: float = 60) -> "SlurmCluster":
        problems = missing_requirements()
        if problems:
            raise RuntimeError("cannot start a local Slurm cluster: " + "; ".join(problems))
        try:
            self._write_files()
            self._start_munged()
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_files(self) -> None:
        munge = pwd.getpwnam("munge")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # the munge user must traverse it to reach its socket
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        mdir = self.root / "munge"
        mdir.mkdir(exist_ok=True)
        os.chown(mdir, munge.pw_uid, munge.pw_gid)
        os.chmod(mdir, 0o755)
        key = mdir / "munge.key"
        if not key.exists():  # a private key: this cluster never depends on /etc/munge
            key.write_bytes(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o600)
        self.node, node_line = _node_line(self.node or None)
        ctld_port, slurmd_port = _free_ports(2)
        r = self.root
        self.conf.write_text(f"""\
# Single-node localhost test cluster (tests/slurm_cluster.py)
ClusterName=janustest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={mdir}/munge.socket,cred_expire={self.requeue_delay}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# a requeued job becomes eligible after cred_expire s; the main scheduling loop then starts it
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ReturnToService=2
# MinJobAge < 6 keeps `sbatch --wait` polling every 2 s (it backs off to 8 and 32 s otherwise)
MinJobAge=5
KillWait=15
InactiveLimit=0
JobRequeue=1
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _start_munged(self) -> None:
        mdir = self.root / "munge"
        self._spawn("munged", ["munged", "-F", f"--socket={mdir}/munge.socket", f"--key-file={mdir}/munge.key",
                               f"--pid-file={mdir}/munged.pid", f"--log-file={mdir}/munged.log",
                               f"--seed-file={mdir}/munged.seed"], user="munge", group="munge")
        sock = mdir / "munge.socket"
        deadline = time.monotonic() + 15
        while not sock.exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start:\n{self.logs('munged')}")
            time.sleep(0.05)

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env(), start_new_session=True, **kw)
        out.close()

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            res = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False, timeout=10)
            state = res.stdout.strip()
            if res.returncode == 0 and state == "idle":
                return
            time.sleep(0.2)
        raise TimeoutError(f"node {self.node} not idle after {timeout:.0f} s (state {state!r}):\n{self.logs()}")

    def stop(self) -> None:
        """Cancel every job, wait for it to end, then stop slurmd, slurmctld and munged by PID."""
        alive = {n: p for n, p in self.procs.items() if p.poll() is None}
        if "slurmctld" in alive and "slurmd" in alive:
            self.run("scancel", "--full", "--user", "root", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                res = self.run("squeue", "-h", "-o", "%i", check=False)
                if res.returncode != 0 or not res.stdout.strip():
                    break
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def logs(self, *names: str, tail: int = 40) -> str:
        files = sorted((self.root / "log").glob("*")) + sorted((self.root / "munge").glob("*.log"))
        chunks = []
        for f in files:
            if names and not any(n in f.name for n in names):
                continue
            try:
                lines = f.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            chunks.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(chunks)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    cluster = SlurmCluster(keep=True)
    cluster.start()
    print(f"Slurm is up (node {cluster.node}). In another shell:\n  export SLURM_CONF={cluster.conf}\n"
          f"Logs in {cluster.root}/log. Ctrl-C stops the daemons.", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
