"""A real one-node Slurm cluster for tests (../shared/docs/SCALE.md): Debian's slurm-wlm + munge, installed with
apt-get when missing (as root), configured in a private folder, daemons started here and stopped by their pid files.
`python tests/slurm_cluster.py start|stop DIR` does the same by hand."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")


def ensure_packages() -> str | None:
    """None when slurmctld, slurmd, munged and sbatch are there (installing them if possible), else why not."""
    tools = ("slurmctld", "slurmd", "munged", "sbatch", "squeue")
    if all(shutil.which(t) for t in tools):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"Slurm is not installed and cannot be installed here (need root and apt-get for {PACKAGES})"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            return f"apt-get could not install {PACKAGES}"
    return None if all(shutil.which(t) for t in tools) else f"{PACKAGES} installed but their tools are missing"


def _conf(root: Path) -> str:
    return f"""ClusterName=segbench-test
SlurmctldHost=localhost
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmdSpoolDir={root}/spool
StateSaveLocation={root}/state
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort=6917
SlurmdPort=6918
NodeName=localhost CPUs={os.cpu_count() or 2} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def start(root: Path) -> dict:
    """Start munge (if not running) and a slurmctld + slurmd configured under `root`; returns the environment
    clients need (SLURM_CONF)."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("spool", "state"):
        (root / sub).mkdir(exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(_conf(root))
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf), "-N", "localhost"], env=env, check=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.split()
        if out and out[0] in ("idle", "mix", "alloc"):
            return {"SLURM_CONF": str(conf)}
        time.sleep(0.5)
    stop(root)
    raise RuntimeError(f"the test Slurm node did not become idle; see {root}/slurmctld.log and slurmd.log")


def stop(root: Path) -> None:
    """Stop the daemons started by `start` (munged keeps running: other clusters may share it)."""
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        f = root / pid_file
        if f.exists():
            try:
                os.kill(int(f.read_text().strip()), 15)
            except (ProcessLookupError, ValueError):
                pass
    time.sleep(0.5)


if __name__ == "__main__":
    action, folder = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        why = ensure_packages()
        if why:
            sys.exit(why)
        print(start(folder))
    else:
        stop(folder)
