"""The scripts in launch/, each run to completion the way a user runs it: one process; torchrun
on one node; torchrun with --nnodes=2 as two node processes over loopback; mpiexec (MPICH from
the pip wheel, ranks via mpi4py); and the SLURM batch script's srun line with SLURM's variables."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from tests.support.paths import ROOT

LAUNCH = ROOT / "launch"
SUMMARY = re.compile(r"(\w+): loss ([\d.]+) -> ([\d.]+) in (\d+) steps \(global step (\d+)\); "
                     r"world size (\d+); parameters identical on all ranks: (\w+); rank 0 keeps "
                     r"state for (\d+) of (\d+) elements")
PLACE = re.compile(r"rank (\d+) of (\d+), local rank (\d+), launcher (\w+)")


def env(**extra) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "PMI_", "OMPI_")) and k not in
         ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::UserWarning", **extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, timeout=300, **extra) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       env=env(**extra), cwd=ROOT)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout


def summary(out: str, world: int, steps: int):
    m = SUMMARY.search(out)
    assert m, out
    _, first, last, n, global_step, w, same, local, total = m.groups()
    assert int(w) == world and int(n) == steps and same == "True"
    assert float(last) < 0.7 * float(first)
    assert int(local) <= -(-int(total) // world)  # rank 0 keeps state for its 1/N only
    return int(global_step)


def places(out: str) -> list[tuple[int, int, int, str]]:
    return sorted((int(r), int(w), int(lr), how) for r, w, lr, how in PLACE.findall(out))


@pytest.mark.parametrize("opt", ["grokadamw", "supergrok"])
def test_single_process_script_trains(opt):
    out = run([sys.executable, LAUNCH / "train_single.py", "--optimizer", opt, "--steps", "60"])
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < 0.5 * first


def test_torchrun_single_node_then_resume_on_one_process(tmp_path):
    ck = tmp_path / "ck.pt"
    out = run([LAUNCH / "torchrun_single_node.sh", "--steps", "30", "--save", ck], NPROC="2")
    assert places(out) == [(0, 2, 0, "torchrun"), (1, 2, 1, "torchrun")]
    assert summary(out, 2, 30) == 30
    # the full state saved at world size 2 resumes on one process
    out = run([sys.executable, LAUNCH / "train_sharded.py", "--steps", "10", "--resume", ck])
    assert places(out) == [(0, 1, 0, "single")]
    assert summary(out, 1, 10) == 40


def test_torchrun_two_nodes_over_loopback():
    port = str(free_port())
    procs = [subprocess.Popen([str(LAUNCH / "torchrun_multi_node.sh"), "--optimizer", "grokadamw",
                               "--steps", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT,
                              env=env(NNODES="2", NODE_RANK=str(node), NPROC="1",
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for node in (0, 1)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-5000:]
        outs.append(out)
    assert places(outs[0]) == [(0, 2, 0, "torchrun")]
    assert places(outs[1]) == [(1, 2, 0, "torchrun")]
    summary(outs[0], 2, 30)


def test_mpiexec_with_mpi4py_rank_discovery():
    pytest.importorskip("mpi4py")
    out = run([LAUNCH / "mpirun.sh", "--optimizer", "grokadamw", "--steps", "30"], NPROC="2",
              PYTHON=sys.executable)
    assert places(out) == [(0, 2, 0, "mpi"), (1, 2, 1, "mpi")]
    summary(out, 2, 30)


def test_slurm_launch_line_maps_ranks():
    script = (LAUNCH / "slurm.sbatch").read_text()
    assert re.search(r"^export MASTER_ADDR$", script, re.M) and "SLURM_JOB_NODELIST" in script
    (line,) = [ln for ln in script.splitlines() if ln.startswith("srun ")]
    command = re.sub(r"^srun(\s+-\S+)*\s+", "", line)   # what srun starts on every task
    port = str(free_port())
    ntasks = 2
    procs = []
    for task in range(ntasks):
        slurm = dict(SLURM_PROCID=str(task), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(task),
                     SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="1",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(["bash", "-c", command, "srun", "--steps", "30"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=ROOT, env=env(**slurm)))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-5000:]
        outs.append(out)
    for task, out in enumerate(outs):
        assert places(out) == [(task, ntasks, task, "slurm")]
    summary(outs[0], ntasks, 30)


def test_scripts_import_their_common_module_from_their_own_folder(tmp_path):
    """launch/common.py reaches the scripts by the folder Python puts first on sys.path, the
    script's own, whatever the working directory; no script edits sys.path."""
    for script in sorted(LAUNCH.glob("train_*.py")):
        text = script.read_text()
        assert re.search(r"^import common$", text, re.M) and "sys.path" not in text, script
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    p = subprocess.run([sys.executable, str(LAUNCH / "train_single.py"), "--steps", "3"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env(PYTHONPATH=path))
    assert p.returncode == 0 and "in 3 steps" in p.stdout, p.stderr[-3000:]


FSDP2_LINE = re.compile(r"(\w+) on FSDP2 \(([^)]*\)[^)]*)\): loss ([\d.]+) -> ([\d.]+) in (\d+) "
                        r"steps \(global step (\d+)\); world size (\d+)")


def test_fsdp2_script_with_torchrun_then_resume_on_one_process(tmp_path):
    ck = tmp_path / "dcp"
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", LAUNCH / "train_fsdp2.py", "--steps", "30", "--save", ck])
    _, mesh, first0, last, _, global_step, world = FSDP2_LINE.search(out).groups()
    assert (mesh, world, global_step) == ("mesh (2,)", "2", "30")
    assert float(last) < 0.3 * float(first0)
    # the DCP checkpoint written at world size 2 resumes on one process (resharded)
    out = run([sys.executable, LAUNCH / "train_fsdp2.py", "--steps", "5", "--resume", ck])
    _, mesh, first, _, _, global_step, world = FSDP2_LINE.search(out).groups()
    assert (mesh, world, global_step) == ("mesh (1,)", "1", "35")
    assert float(first) < 0.3 * float(first0)  # it starts from the trained state


def test_deepspeed_launcher_with_the_config_entry():
    pytest.importorskip("deepspeed")
    out = run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
               LAUNCH / "train_deepspeed.py", "--deepspeed_config", LAUNCH / "ds_config.json"])
    m = re.search(r"SuperGrok via the DeepSpeed config \(ZeRO stage 2\): loss ([\d.]+) -> "
                  r"([\d.]+) in 40 steps \(global step 40\); world size 2", out)
    assert m, out[-3000:]
    assert float(m.group(2)) < 0.3 * float(m.group(1))
