"""slurm/pretrain.sh on a real (localhost, single-node) Slurm cluster, CPU path, 2 ranks.

The cluster comes from tests/slurm_cluster.py (Debian's slurmd/slurmctld/slurm-client/munge,
installed by .ci/run). In CI (CI set) missing Slurm tools are a failure, not a skip.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e import DIST_VARS, REPO, build_shards, torchrun
from slurm_cluster import SlurmCluster, missing_requirements

SCRIPTS = ("slurm/pretrain.sh", "slurm/finetune.sh", "slurm/common.sh")
CONFIG = "pretrain/configs/tiny_cpu.json"
STEP_TIMEOUT = 300  # seconds for one sbatch --wait


def _require(what: str, problems: list[str]) -> None:
    if not problems:
        return
    msg = f"{what}: " + "; ".join(problems)
    if os.environ.get("CI"):
        pytest.fail(msg + " (CI must provide it: see .ci/run)")
    pytest.skip(msg)


# ---------------------------------------------------------------- static checks (fast)

def test_scripts_parse_and_pass_shellcheck():
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", script], cwd=REPO, check=True)
    _require("shellcheck", [] if shutil.which("shellcheck") else ["shellcheck not found (apt-get install shellcheck)"])
    proc = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _dry_run(script: str, env: dict, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_")) and k not in ("CONFIG", "OMP_NUM_THREADS", *DIST_VARS)} | env
    proc = subprocess.run(["bash", str(REPO / script), *args], cwd="/", env=env | {"DRY_RUN": "1"},
                          capture_output=True, text=True)
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


def _command(proc: subprocess.CompletedProcess) -> str:
    return next(ln for ln in proc.stdout.splitlines() if "command:" in ln).split("command: ", 1)[1].rstrip()


def test_node_command_puts_jit_ops_in_a_node_local_folder(tmp_path):
    """The node command, run as each node runs it: a node-local default, a user's value kept."""
    node_cmd = _command(_dry_run("slurm/pretrain.sh", {"DEVICE": "cpu", "CONFIG": CONFIG}))
    script = node_cmd.split("bash -c '", 1)[1].split("' janus-node", 1)[0]
    probe = script.replace('exec "$py" -m torch.distributed.run --node_rank "$SLURM_PROCID" "$@"',
                           'echo "$TORCH_EXTENSIONS_DIR"')
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), "USER": "alice"}
    out = subprocess.run(["bash", "-c", probe, "janus-node", "python"], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == f"{tmp_path}/torch_extensions_alice"
    out = subprocess.run(["bash", "-c", probe, "janus-node", "python"], env=env | {"TORCH_EXTENSIONS_DIR": "/shared/ops"},
                         capture_output=True, text=True)
    assert out.stdout.strip() == "/shared/ops"


def test_launch_command_cpu_and_gpu_from_one_script_and_finetune_alike(tmp_path):
    # Outside Slurm: one node on this machine, same composition (the CPU path as in the CI test).
    cpu = _command(_dry_run("slurm/pretrain.sh", {"DEVICE": "cpu", "NPROC_PER_NODE": "2", "CONFIG": CONFIG,
                                                  "SAVE_DIR": "runs/x", "EXTRA_ARGS": "--run.max_steps 3"},
                            "--run.log_every", "1"))
    # torchrun outlives a stop: it ignores USR1 and TERM (Slurm signals every process of the step) and handles
    # neither, so the ranks save and torchrun exits when they do.
    assert cpu.startswith("bash -c 'trap \"\" USR1 TERM XCPU;") and '--node_rank "$SLURM_PROCID"' in cpu
    assert "--max_restarts 0 --signals_to_handle SIGINT\\,SIGHUP\\,SIGQUIT pretrain/train.py" in cpu
    # JIT-built DeepSpeed ops go to a node-local folder unless the user points at a shared pre-build.
    assert 'TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/torch_extensions_' in cpu
    assert "--nnodes 1 --nproc_per_node 2 --rdzv_backend static --rdzv_endpoint 127.0.0.1:" in cpu
    assert cpu.endswith("pretrain/train.py --config pretrain/configs/tiny_cpu.json --run.save_dir runs/x "
                        "--run.max_steps 3 --run.log_every 1")
    assert "CONFIG" in _dry_run("slurm/pretrain.sh", {}, ok=False).stderr  # no silent default config
    # Inside a (fake) 2-node GPU allocation: srun, first host, port from the job id, 8 ranks/node.
    _require("scontrol", [] if shutil.which("scontrol") else ["scontrol not found"])
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\n")  # enough for `scontrol show hostnames`
    alloc = {"SLURM_CONF": str(conf), "SLURM_JOB_ID": "1234", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_CPUS_PER_TASK": "32", "SLURM_GPUS_ON_NODE": "8", "CONFIG": "cfg.json", "SAVE_DIR": "/ckpt/a b"}
    gpu = _dry_run("slurm/pretrain.sh", alloc, "--run.max_steps", "10")
    assert "2 node(s) x 8 rank(s), device gpu, OMP_NUM_THREADS 4, master gpu07:11234" in gpu.stdout
    cmd = _command(gpu)
    assert cmd.startswith("srun --kill-on-bad-exit=1 --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=32 "
                          "bash -c ")
    assert ("--nnodes 2 --nproc_per_node 8 --rdzv_backend static --rdzv_endpoint gpu07:11234 --rdzv_id 1234 "
            "--max_restarts 0 --signals_to_handle SIGINT\\,SIGHUP\\,SIGQUIT pretrain/train.py --config cfg.json "
            "--run.save_dir /ckpt/a\\ b --run.max_steps 10") in cmd
    fin = _command(_dry_run("slurm/finetune.sh", alloc, "--run.max_steps", "10"))
    assert fin == cmd.replace("pretrain/train.py", "finetune/train.py")
    assert "no GPUs found" in _dry_run("slurm/pretrain.sh", {**alloc, "SLURM_GPUS_ON_NODE": "0"},
                                       ok=False).stderr


# ---------------------------------------------------------------- the real cluster

@pytest.fixture(scope="module")
def cluster():
    _require("local Slurm cluster", missing_requirements())
    c = SlurmCluster()
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("slurm_data"))


def _sbatch(cluster: SlurmCluster, name: str, out: Path, save_dir: Path, shards: Path, *trainer_args: str,
            sbatch_args: tuple[str, ...] = ("--time=5",)):
    """Start `sbatch --wait slurm/pretrain.sh` for the CPU path (1 node, 2 ranks); returns the Popen."""
    env = cluster.env()
    env.update(DEVICE="cpu", NPROC_PER_NODE="2", CONFIG=CONFIG, SAVE_DIR=str(save_dir), PYTHON=sys.executable)
    cmd = ["sbatch", "--wait", f"--job-name={name}", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2",
           *sbatch_args, f"--output={out}", "slurm/pretrain.sh", "--data.shards_dir", str(shards),
           "--run.log_every", "1", *trainer_args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, cluster: SlurmCluster, out: Path, ok: bool | None = True) -> str:
    """Wait for `sbatch --wait`; its exit status must be 0 (ok), or anything (None: a cancelled or timed-out
    job reports its batch script's status, 0 when the trainer saved and exited in time)."""
    try:
        stdout, stderr = proc.communicate(timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    # `sbatch --wait` returns as soon as a cancelled or timed-out job leaves the running state; its
    # processes may still be saving (until KillWait). Wait until Slurm lists the job no more.
    job = re.search(r"Submitted batch job (\d+)", stdout or "")
    deadline = time.monotonic() + 60
    while job and time.monotonic() < deadline and cluster.run("squeue", "-h", "-j", job.group(1), check=False).stdout.strip():
        time.sleep(0.2)
    log = out.read_text(errors="replace") if out.exists() else "(no job output)"
    assert ok is None or (proc.returncode == 0) == ok, (f"sbatch --wait returned {proc.returncode}\n{stdout}\n{stderr}\n--- job "
                                          f"output\n{log[-6000:]}\n{cluster.logs(tail=20)}")
    return log


def _wait_for(proc: subprocess.Popen, cluster: SlurmCluster, out: Path, what: str, condition) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            stdout, stderr = proc.communicate()
            log = out.read_text(errors="replace") if out.exists() else ""
            pytest.fail(f"the job ended (sbatch: {proc.returncode}) or stalled before {what}:\n{stdout}{stderr}\n"
                        f"{log[-3000:]}\n{cluster.logs(tail=20)}")
        time.sleep(0.2)


def _metric_rows(save_dir: Path) -> list[dict]:
    path = save_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _complete(save_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in (save_dir / "checkpoints").glob("step_*/COMPLETE"))


@pytest.mark.slow
def test_sbatch_pretrain_trains_checkpoints_resumes_and_requeues_on_usr1(cluster, shards, tmp_path):
    save = tmp_path / "run"
    common = ("--run.keep_last", "0")

    # 1. A fresh job trains 4 steps on 2 CPU ranks and checkpoints every 2.
    out1 = tmp_path / "first.out"
    log1 = _finish(_sbatch(cluster, "janus-first", out1, save, shards, "--run.max_steps", "4", "--run.save_every", "2",
                           *common), cluster, out1)
    rows = _metric_rows(save)
    assert [r["step"] for r in rows] == [1, 2, 3, 4], log1[-3000:]
    assert all(math.isfinite(r["loss/total"]) for r in rows)
    assert _complete(save) == [2, 4]
    assert (save / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert "resumed from" not in log1 and "2 rank(s), device cpu" in log1

    # 2. Submitted again with more steps and the same save dir, it resumes at step 4 ...
    out2 = tmp_path / "second.out"
    proc = _sbatch(cluster, "janus-second", out2, save, shards, "--run.max_steps", "50", "--run.save_every", "1000",
                   *common)

    def wait_for(what: str, condition) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT
        while not condition():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                stdout, stderr = proc.communicate()
                pytest.fail(f"the job ended (sbatch: {proc.returncode}) or stalled before {what}:\n{stdout}{stderr}\n"
                            f"{log2()[-3000:]}\n{cluster.logs(tail=20)}")
            time.sleep(0.2)

    def log2() -> str:
        return out2.read_text(errors="replace") if out2.exists() else ""

    wait_for("step 7", lambda: _metric_rows(save)[-1]["step"] >= 7)  # the resumed loop runs: handler installed
    job = cluster.run("squeue", "-h", "-n", "janus-second", "-o", "%i").stdout.split()
    assert len(job) == 1, job
    # 3. ... then gets the pre-walltime signal as `#SBATCH --signal=B:USR1@120` sends it (to the
    # batch shell only): the shell forwards it to the step, the trainer saves and stops, the job
    # requeues itself and resumes from that checkpoint.
    cluster.run("scancel", "--batch", "--signal=USR1", job[0])
    wait_for("the requeue", lambda: "(restart 1)" in log2())
    first_stop = int(re.findall(r"checkpoint saved at step (\d+), stopping", log2())[0])
    wait_for("the requeued run trains", lambda: _metric_rows(save)[-1]["step"] >= first_stop + 3)
    # 4. The same signal sent to every process of the job (`scancel --signal=USR1 --full`; a one-node
    # job runs torchrun in the batch step itself): torchrun and the loader workers ignore it, the
    # ranks save and stop, and the batch shell requeues again.
    cluster.run("scancel", "--signal=USR1", "--full", job[0])
    log = _finish(proc, cluster, out2)

    assert f"resumed from {save}/checkpoints/step_00000004 at step 4" in log, log[-3000:]
    assert log.count("USR1 received") == 2 and log.count(f"requeueing job {job[0]}") == 2, log[-4000:]
    assert f"job {job[0]} (restart 1)" in log and f"job {job[0]} (restart 2)" in log, log[-4000:]
    stops = [int(s) for s in re.findall(r"checkpoint saved at step (\d+), stopping", log)]
    assert len(stops) == 2 and 7 <= stops[0] < stops[1] < 50, log[-4000:]
    for k in stops:
        assert f"resumed from {save}/checkpoints/step_{k:08d} at step {k}" in log, log[-4000:]
    rows = _metric_rows(save)
    assert [r["step"] for r in rows] == list(range(1, 51))  # steps continue: nothing lost, nothing re-run
    assert all(math.isfinite(r["loss/total"]) for r in rows)
    assert rows[-1]["loss/total"] < rows[0]["loss/total"]
    assert _complete(save) == [2, 4, *stops, 50]


@pytest.mark.slow
def test_sbatch_finetune_trains_evaluates_and_exports(cluster, tmp_path):
    from e2e import make_base_model, write_copy_task

    base = make_base_model(tmp_path / "base")
    task = write_copy_task(tmp_path / "task", n_train=200)
    save, out = tmp_path / "ft", tmp_path / "ft.out"
    env = cluster.env()
    env.update(DEVICE="cpu", NPROC_PER_NODE="2", CONFIG="finetune/configs/tiny_cpu.json", SAVE_DIR=str(save),
               PYTHON=sys.executable)
    cmd = ["sbatch", "--wait", "--job-name=ft", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=5",
           f"--output={out}", "slurm/finetune.sh", "--model.init_from", str(base), "--data.dir", str(task),
           "--mode", "nar", "--run.max_steps", "10", "--run.eval_every", "5"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = _finish(proc, cluster, out)
    assert "xsum nar: 10 steps" in log
    rows = _metric_rows(save)
    assert [r["step"] for r in rows] == [5, 10] and all(math.isfinite(r["loss/nar"]) for r in rows)
    assert _complete(save) == [10]
    evals = [json.loads(line) for line in (save / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [5, 10]
    assert (save / "best" / "janus_extras.pt").exists()  # the NAR length head is exported with the model


def _saved_at(log: str) -> int:
    """The step a stop signal saved at (TERM = 15; at the time limit Slurm also sends XCPU = 24)."""
    found = re.findall(r"signal (?:15|24) received: checkpoint saved at step (\d+), stopping", log)
    assert len(found) == 1, log[-4000:]
    return int(found[0])


@pytest.mark.slow
def test_sbatch_scancel_and_time_limit_save_and_the_next_job_resumes_exactly(cluster, shards, tmp_path):
    """Slurm's own stops: `scancel` and the time limit send SIGTERM (the limit also SIGXCPU) to every process
    of the step (torchrun, both ranks, their DataLoader workers), then SIGKILL after KillWait. Each must end in a complete checkpoint,
    and the next job continue at the next step with the losses of an uninterrupted run."""
    save = tmp_path / "run"
    # A constant LR after warm-up: the jobs' --run.max_steps differ, and a decaying schedule depends on it.
    common = ("--run.keep_last", "0", "--run.save_every", "1000", "--data.num_workers", "2", "--optim.schedule", "constant")
    # Saves that take seconds, as a real model's do: srun turning its own TERM into SIGKILL of the
    # tasks ("forcing job termination") would win that race every time.
    slow_save = ("--run.faults.save_sleep_seconds", "3")
    # 1. scancel while it trains.
    out1 = tmp_path / "cancel.out"
    proc = _sbatch(cluster, "janus-cancel", out1, save, shards, "--run.max_steps", "1000", *common, *slow_save)
    _wait_for(proc, cluster, out1, "step 3", lambda: (_metric_rows(save) or [{"step": 0}])[-1]["step"] >= 3)
    cluster.run("scancel", "--name", "janus-cancel")
    log1 = _finish(proc, cluster, out1, ok=None)
    first = _saved_at(log1)
    assert _complete(save) == [first], log1[-4000:]
    assert "forcing job termination" not in log1, log1[-4000:]
    # 2. Resubmitted with a 1-minute limit, it resumes there and runs into the limit (slow steps keep the
    # run short; CONT replaces the script's warning USR1, which Slurm would send before the limit).
    out2 = tmp_path / "limit.out"
    log2 = _finish(_sbatch(cluster, "janus-limit", out2, save, shards, "--run.max_steps", "1000",
                           "--run.faults.step_sleep_seconds", "1", *common, *slow_save,
                           sbatch_args=("--time=1", "--signal=B:CONT@1")),
                   cluster, out2, ok=None)
    assert f"resumed from {save}/checkpoints/step_{first:08d} at step {first}" in log2, log2[-4000:]
    second = _saved_at(log2)
    assert second > first and _complete(save) == [first, second], log2[-4000:]
    assert "forcing job termination" not in log2, log2[-4000:]
    # 3. Resubmitted again, it resumes at the second stop and finishes two steps later.
    final = second + 2
    out3 = tmp_path / "last.out"
    log3 = _finish(_sbatch(cluster, "janus-last", out3, save, shards, "--run.max_steps", str(final), *common),
                   cluster, out3)
    assert f"resumed from {save}/checkpoints/step_{second:08d} at step {second}" in log3, log3[-4000:]
    rows = _metric_rows(save)
    assert [r["step"] for r in rows] == list(range(1, final + 1))  # each job continued at the next step
    # 4. The same run, uninterrupted: every step's loss is the same.
    ref = tmp_path / "ref"
    torchrun("pretrain/train.py", ["--config", CONFIG, "--data.shards_dir", str(shards), "--run.save_dir", str(ref),
                                   "--run.max_steps", str(final), "--run.log_every", "1", *common])
    expected = {r["step"]: r["loss/total"] for r in _metric_rows(ref)}
    assert {r["step"]: r["loss/total"] for r in rows} == pytest.approx(expected, rel=1e-6)
