"""launch/slurm.sbatch and launch/ray-slurm.sbatch run under stand-ins for srun, scontrol, nvidia-smi, accelerate, ray
and python: the commands each node runs."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAND_INS = {
    # srun: the command once per node, as SLURM would set SLURM_NODEID on each.
    "srun": 'while [[ "$1" == --* ]]; do shift; done\n'
            'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@"; done',
    "scontrol": "echo gpu-a01; echo gpu-a02",
    "accelerate": 'printf "node %s:" "$SLURM_NODEID"; printf " %q" "$@"; echo',
}


# The same for a Ray cluster: each srun says where it runs, then runs its command once (a line in one write: the steps
# in the background print at once). `python -c` is the count of nodes alive (STANDIN_ALIVE, default all); the search
# itself, with STANDIN_DRIVER_WAITS, runs until SIGINT. A head with STANDIN_HEAD_STAYS keeps running; a worker with
# STANDIN_WORKER_FAILS fails at once.
RAY_STAND_INS = {
    "srun": 'echo "srun$(printf " %q" "$@")" >&2\n'
            'while [[ "$1" == -* ]]; do [[ "$1" == -w ]] && shift; shift; done\nexec "$@"',
    "scontrol": "echo gpu-a01; echo gpu-a02; echo gpu-a03",
    "hostname": 'case "$1" in --ip-address) echo 127.0.1.1 fe80::1 ;; *) echo 10.0.0.1 172.17.0.1 ;; esac',
    "ray": 'case "$1 $2" in\n'
           '  "get-auth-token "*) printf TOKEN ;;\n'
           '  "status "*) ;;\n'
           '  *) echo "ray$(printf " %q" "$@")"\n'
           '     [[ "$2" == --head && -n "${STANDIN_HEAD_STAYS:-}" ]] && exec sleep 20 >/dev/null 2>&1\n'
           '     [[ "$2" == --address=* && -n "${STANDIN_WORKER_FAILS:-}" ]] && exit 1 ;;\n'
           'esac\nexit 0',
    "python": 'if [[ "$1" == -c ]]; then echo "${STANDIN_ALIVE:-3}"; exit; fi\n'
              'echo "python $* (RAY_ADDRESS=$RAY_ADDRESS RAY_AUTH_TOKEN=$RAY_AUTH_TOKEN" \\\n'
              '  "SRUN_CPUS_PER_TASK=$SRUN_CPUS_PER_TASK PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-})"\n'
              'if [[ -n "${STANDIN_DRIVER_WAITS:-}" ]]; then\n'
              '  trap \'echo "driver: SIGINT"; exit 130\' INT\n'
              '  while :; do sleep 0.1; done\n'
              'fi',
}


def _job(tmp_path, stand_ins):
    """A job's working directory (the repository's launch files, an empty .venv) and its environment."""
    shutil.copytree(REPO / "launch", tmp_path / "launch")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-a[01-02]",
           "SLURM_JOB_ID": "12345", "SLURM_CPUS_PER_TASK": "32", "SLURM_GPUS_ON_NODE": "8"}
    return tmp_path, env


@pytest.fixture
def job(tmp_path):
    return _job(tmp_path, STAND_INS)


def _sbatch(job, *args, script="launch/slurm.sbatch", **env):
    folder, base = job
    return subprocess.run(["bash", script, *args], cwd=folder, env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_each_node_launches_all_its_gpus_with_its_rank_pointing_at_the_first_node(job):
    done = _sbatch(job, "configs/x.yaml", "train.lr=0.001", "name=a b")
    assert done.returncode == 0, done.stderr
    port = 20000 + 12345 % 12000
    assert done.stdout.splitlines() == [
        f"node {rank}: launch --config_file launch/multinode.yaml --num_machines 2 --num_processes 16 --machine_rank "
        f"{rank} --main_process_ip gpu-a01 --main_process_port {port} -m temu_dist.train --config configs/x.yaml "
        r"train.lr=0.001 name=a\ b" for rank in (0, 1)]
    deepspeed = _sbatch(job, "configs/x.yaml", LAUNCH="launch/deepspeed-multinode.yaml")
    assert deepspeed.stdout.count("--config_file launch/deepspeed-multinode.yaml") == 2
    # Where the first node's name does not reach it from the others.
    assert _sbatch(job, "configs/x.yaml", MAIN_IP="10.1.2.3").stdout.count("--main_process_ip 10.1.2.3 ") == 2


@pytest.mark.parametrize("launch", ["launch/gpu1.yaml", "launch/deepspeed.yaml"])
def test_a_one_node_launch_file_on_several_nodes_is_refused_before_any_launch(job, launch):
    # Each node would train alone: gpu1.yaml runs one process, deepspeed.yaml's pdsh launcher reaches no other node.
    done = _sbatch(job, "configs/x.yaml", LAUNCH=launch)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"slurm.sbatch: LAUNCH={launch} starts one node; on 2 each would train alone: use " \
                          "launch/multinode.yaml or launch/deepspeed-multinode.yaml\n"
    # On one node it is what it says.
    assert _sbatch(job, "configs/x.yaml", LAUNCH=launch, SLURM_NNODES="1").returncode == 0


def test_a_node_without_gpus_or_a_missing_launch_file_stops_the_job_before_any_launch(job):
    folder, env = job
    del env["SLURM_GPUS_ON_NODE"]  # and no nvidia-smi on the PATH
    done = _sbatch(job, "configs/x.yaml")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "slurm.sbatch: no GPUs on this node (SLURM_GPUS_ON_NODE 'unset'; nvidia-smi lists 0): ask " \
                          "for them with --gpus-per-node\n"
    (folder / "bin" / "nvidia-smi").write_text("#!/usr/bin/env bash\nprintf 'GPU 0: H100\\nGPU 1: H100\\n'\n")
    (folder / "bin" / "nvidia-smi").chmod(0o755)
    assert "--num_processes 4 " in _sbatch(job, "configs/x.yaml").stdout
    missing = _sbatch(job, "configs/x.yaml", LAUNCH="launch/deepspeed-multi.yaml")
    assert missing.returncode == 2 and missing.stderr == \
        "slurm.sbatch: LAUNCH=launch/deepspeed-multi.yaml: no such file (run sbatch from the repository)\n"


def test_the_multinode_deepspeed_file_starts_each_node_itself():
    """accelerate's default multi-node DeepSpeed launcher is pdsh, which without a hostfile trains each node alone."""
    import yaml

    config = yaml.safe_load((REPO / "launch" / "deepspeed-multinode.yaml").read_text())
    single = yaml.safe_load((REPO / "launch" / "deepspeed.yaml").read_text())
    assert config["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
    # Otherwise as the one-node file: stage 0, no DeepSpeed mixed precision, no clipping.
    assert {k: v for k, v in config["deepspeed_config"].items() if k != "deepspeed_multinode_launcher"} == \
        single["deepspeed_config"]
    assert config["mixed_precision"] == single["mixed_precision"] == "no"


RAY_SBATCH = "launch/ray-slurm.sbatch"


def _ray_job(tmp_path, **env):
    folder, base = _job(tmp_path, RAY_STAND_INS)
    base.update(SLURM_NNODES="3", SLURM_JOB_NODELIST="gpu-a[01-03]", **env)
    return folder, base


def test_a_search_under_slurm_starts_a_ray_head_and_a_worker_per_other_node_with_slurms_cpus_and_gpus(tmp_path):
    job = _ray_job(tmp_path)
    done = _sbatch(job, "configs/tune/x.yaml", "num_samples=2", script=RAY_SBATCH)
    assert done.returncode == 0, done.stderr
    port = 20000 + 12345 % 4000 * 3
    head = f"ray start --head --node-ip-address=10.0.0.1 --port={port} --ray-client-server-port={port + 1} " \
           f"--include-dashboard=false --num-cpus=32 --num-gpus=8 --dashboard-agent-listen-port={port + 2} --block"
    worker = f"ray start --address=10.0.0.1:{port} --num-cpus=32 --num-gpus=8 --dashboard-agent-listen-port=" \
             f"{port + 2} --block"
    # srun says on stderr where each step runs; the steps' commands print on stdout. The head and the workers run in
    # the background, so only the first step comes in a fixed order. The head's address is its first IPv4 one that
    # is not loopback (127.0.1.1 is what Debian maps a host's name to).
    steps = done.stderr.splitlines()
    # Every step with this script's environment, whatever sbatch --export the site defaults to.
    srun = "srun --export=ALL --nodes=1 --ntasks=1"
    assert steps[0] == rf"{srun} -w gpu-a01 bash -c hostname\ --ip-address\;\ hostname\ -I"
    assert sorted(steps[1:]) == [f"{srun} -w gpu-a01 {head}", f"{srun} -w gpu-a02 {worker}",
                                 f"{srun} -w gpu-a03 {worker}"]
    assert sorted(done.stdout.splitlines()) == sorted([
        head, worker, worker, f"python -m temu_dist.tune --config configs/tune/x.yaml num_samples=2 "
        f"(RAY_ADDRESS=10.0.0.1:{port} RAY_AUTH_TOKEN=TOKEN SRUN_CPUS_PER_TASK=32 PYTHONUNBUFFERED=1)"])
    # A CPU-only allocation is a CPU-only cluster, not an error: a search may well run without GPUs.
    del job[1]["SLURM_GPUS_ON_NODE"]
    cpu = _sbatch(job, "configs/tune/x.yaml", script=RAY_SBATCH)
    assert cpu.returncode == 0 and cpu.stdout.count("--num-gpus=0") == 3  # the head and both workers


def test_a_worker_that_cannot_join_stops_the_job_before_the_search(tmp_path):
    job = _ray_job(tmp_path, STANDIN_ALIVE="1", STANDIN_HEAD_STAYS="1", STANDIN_WORKER_FAILS="1")
    done = _sbatch(job, "configs/tune/x.yaml", script=RAY_SBATCH)
    assert done.returncode == 1 and "python -m temu_dist.tune" not in done.stdout
    # Both workers fail, in either order; srun's own lines may come after the message.
    assert re.search(r"^ray-slurm\.sbatch: the Ray node on gpu-a0[23] exited before joining$", done.stderr, re.M)


def test_sigterm_to_the_job_stops_the_search_as_ctrl_c_does(tmp_path):
    import signal
    import time

    folder, env = _ray_job(tmp_path, STANDIN_DRIVER_WAITS="1")
    job = subprocess.Popen(["bash", RAY_SBATCH, "configs/tune/x.yaml"], cwd=folder, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (line := job.stdout.readline()).startswith("python -m temu_dist.tune"):
        assert line, "the job ended before the search started"
    time.sleep(0.5)  # the driver's trap is set on its first line
    job.send_signal(signal.SIGTERM)  # as SLURM's --signal=B:TERM, or scancel --batch --signal=TERM
    out, _ = job.communicate(timeout=30)
    assert job.returncode == 130 and "driver: SIGINT" in out
