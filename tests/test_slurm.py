"""The Slurm launchers (recipes/slurm/*.sbatch).

First their logic with stand-ins for srun, scontrol and torchrun (no Slurm needed): ranks per
node from the allocation, the c10d rendezvous on the first node, the container flags, the
errors a user sees. Then under a real single-node Slurm that this module starts itself (munged,
slurmctld, slurmd from Debian's packages: tools/install_test_slurm.sh): each launcher trains
and exports the tiny recipe on 2 CPU ranks (train_ngc.sbatch with its container switched off:
pyxis and the NGC image are not here), and a job without a recipe leaves a log that says why.
Without Slurm those tests skip, except under CI=true, where they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "recipes" / "slurm"
RECIPE = REPO / "recipes" / "flux_tiny_cpu.yaml"
# What the launchers read from the environment: removed from the tests' environment so that a
# value set where the tests run cannot change what they check.
LAUNCHER_ENV = ("MFMEGATRON_NPROC_PER_NODE", "MFMEGATRON_CONTAINER", "MFMEGATRON_VENV", "MASTER_PORT",
                "OMP_NUM_THREADS", "CONTAINER_IMAGE", "DATA_MOUNTS")


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_")) and k not in LAUNCHER_ENV}
    env.update(extra)
    return env


# --------------------------------------------------------------------------- launcher logic

# A stand-in for a command: records its arguments and a few variables as one JSON line. As srun,
# it then runs its command on the host when there is no container (its only option before the
# command is --kill-on-bad-exit=1); as scontrol it prints $STUB_HOSTNAMES.
STUB = """\
import json, os, sys
name = os.path.basename(sys.argv[0])
keys = ("OMP_NUM_THREADS", "SRUN_CPUS_PER_TASK", "CUDA_DEVICE_MAX_CONNECTIONS")
with open(os.environ["STUB_RECORD"], "a") as record:
    record.write(json.dumps({"name": name, "argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}) + "\\n")
if name == "scontrol":
    print("\\n".join(os.environ["STUB_HOSTNAMES"].split()))
elif name == "srun" and "--container-image" not in sys.argv:
    os.execvp(sys.argv[2], sys.argv[2:])
"""


@pytest.fixture
def stubs(tmp_path) -> Path:
    """A venv-like folder whose bin/ holds the stand-ins for srun, scontrol and torchrun."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("srun", "scontrol", "torchrun"):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{STUB}")
        path.chmod(0o755)
    return tmp_path / "venv"


def _launch(launcher: str, args: list[str], stubs: Path, cwd: Path, **env: str):
    """Runs the launcher as Slurm would run it on the first node of a job; returns the process
    and the recorded calls by name."""
    record = stubs.parent / "calls.jsonl"
    record.unlink(missing_ok=True)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "STUB_HOSTNAMES": "gpu07 gpu08", "SLURM_CPUS_PER_TASK": "64"}
    environment = _clean_env(**slurm, STUB_RECORD=str(record), MFMEGATRON_VENV=str(stubs),
                             PATH=f"{stubs / 'bin'}{os.pathsep}{os.environ['PATH']}")
    environment.update(env)
    result = subprocess.run(["bash", str(LAUNCHERS / launcher), *args], cwd=cwd, env=environment,
                            capture_output=True, text=True, timeout=60)
    calls = {}
    if record.exists():
        for line in record.read_text().splitlines():
            call = json.loads(line)
            calls[call["name"]] = call
    return result, calls


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


HOST = {"train.sbatch": {}, "train_ngc.sbatch": {"MFMEGATRON_CONTAINER": "0"}}


@pytest.mark.parametrize("launcher", sorted(HOST))
@pytest.mark.parametrize(
    "allocation,nproc,threads",
    [
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "4"}, "4", "16"),  # what Slurm allocated
        ({"SLURM_GPUS_PER_NODE": "h100:8"}, "8", "8"),  # only the request, with a GPU type
        ({"SLURM_GPUS_PER_NODE": "0", "SLURM_CPUS_PER_TASK": "2"}, "2", "1"),  # no GPUs: CPU ranks
        ({"SLURM_GPUS_ON_NODE": "8", "MFMEGATRON_NPROC_PER_NODE": "3"}, "3", "21"),  # the override
    ],
    ids=["gpus_on_node", "gpus_per_node_typed", "cpu_ranks", "override"],
)
def test_ranks_per_node_come_from_the_allocation(tmp_path, stubs, launcher, allocation, nproc, threads):
    override = "model.overrides={attention_tangent_pass: logsumexp}"  # spaces and braces
    result, calls = _launch(launcher, [str(RECIPE), "train.steps=3", override], stubs, tmp_path,
                            **HOST[launcher], **allocation)
    assert result.returncode == 0, result.stderr
    torchrun = calls["torchrun"]["argv"]
    assert _option(torchrun, "--nproc-per-node") == nproc
    # Multi-node: every node's torchrun meets at the first node of the job.
    assert _option(torchrun, "--nnodes") == "2"
    assert _option(torchrun, "--rdzv-backend") == "c10d"
    assert _option(torchrun, "--rdzv-endpoint") == "gpu07:29500"
    assert _option(torchrun, "--rdzv-id") == "4242"
    assert torchrun[-5:] == ["-m", "mfmegatron.train", str(RECIPE), "train.steps=3", override]
    env = calls["torchrun"]["env"]
    assert env["OMP_NUM_THREADS"] == threads and env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert calls["srun"]["env"]["SRUN_CPUS_PER_TASK"] == allocation.get("SLURM_CPUS_PER_TASK", "64")
    assert f"x {nproc} rank(s) per node" in result.stdout


def test_ngc_launcher_runs_the_step_in_the_container(tmp_path, stubs):
    override = "model.overrides={attention_tangent_pass: logsumexp}"
    result, calls = _launch("train_ngc.sbatch", ["recipes/flux_tiny_cpu.yaml", override], stubs, REPO,
                            SLURM_GPUS_ON_NODE="8", CONTAINER_IMAGE="registry/pytorch:1", DATA_MOUNTS="/data:/data")
    assert result.returncode == 0, result.stderr
    srun = calls["srun"]["argv"]
    assert _option(srun, "--container-image") == "registry/pytorch:1"
    assert _option(srun, "--container-mounts") == f"{REPO}:/workspace/mfmegatron,/data:/data"
    assert _option(srun, "--container-workdir") == "/workspace/mfmegatron"
    # The step's shell gets the recipe and overrides as its own arguments, unsplit.
    assert srun[srun.index("-c") + 2:] == ["bash", "recipes/flux_tiny_cpu.yaml", override]
    assert "pip install" in srun[srun.index("-c") + 1]
    assert "torchrun" not in calls  # it would run inside the container


@pytest.mark.parametrize("launcher", sorted(HOST))
def test_launcher_errors_are_one_clear_line(tmp_path, stubs, launcher):
    result, calls = _launch(launcher, [], stubs, tmp_path, **HOST[launcher])
    assert result.returncode == 2 and not calls
    assert result.stderr == (f"{launcher}: error: no recipe given; usage: sbatch recipes/slurm/{launcher} "
                             "RECIPE.yaml [key=value ...]\n")
    result, calls = _launch(launcher, ["recipes/nowhere.yaml"], stubs, tmp_path, **HOST[launcher])
    assert result.returncode == 2 and not calls
    assert result.stderr == (f"{launcher}: error: recipe recipes/nowhere.yaml not found (relative paths are "
                             f"from the submit directory {tmp_path})\n")
    result, calls = _launch(launcher, [str(RECIPE)], stubs, tmp_path, **HOST[launcher],
                            MFMEGATRON_VENV=str(tmp_path / "novenv"))
    assert result.returncode == 2 and not calls
    assert f"error: no {tmp_path / 'novenv'}/bin/torchrun: set MFMEGATRON_VENV" in result.stderr
    result, calls = _launch(launcher, [str(RECIPE)], stubs, tmp_path, **HOST[launcher],
                            MFMEGATRON_NPROC_PER_NODE="two")
    assert result.returncode == 2 and "torchrun" not in calls
    assert "error: cannot take ranks per node from 'two'" in result.stderr


# --------------------------------------------------------------------------- a real Slurm

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "scancel")


def _slurm_or_skip() -> dict[str, str]:
    tools = {name: shutil.which(name, path=SBIN) for name in DAEMONS + CLIENTS}
    missing = sorted(name for name, path in tools.items() if path is None)
    reason = None
    if missing:
        reason = f"Slurm is not installed (missing {', '.join(missing)}): bash tools/install_test_slurm.sh"
    elif os.geteuid() != 0:
        reason = "the test cluster runs its daemons as root (SlurmUser=root)"
    if reason:
        if os.environ.get("CI") == "true":  # CI installs it; never let it skip these silently
            pytest.fail(reason)
        pytest.skip(reason)
    return tools


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_conf(root: Path, node_line: str) -> str:
    """One node (this machine, as slurmd -C describes it) and one partition; no cgroups, no
    accounting; every file of the cluster under ``root``; free ports, so that it does not meet
    another Slurm on the machine."""
    host = node_line.split()[0].split("=", 1)[1]
    return "\n".join([
        "ClusterName=mfmtest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge.socket'}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "ReturnToService=2",
        f"{node_line} NodeAddr=127.0.0.1 State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


@pytest.fixture(scope="module")
def slurm():
    """A single-node Slurm cluster of this machine; yields the environment its clients need.
    The daemons are stopped at the end, whatever happened."""
    tools = _slurm_or_skip()
    # munged wants every folder above its socket searchable by all; pytest's are private.
    root = Path(tempfile.mkdtemp(prefix="mfmegatron-slurm-"))
    root.chmod(0o755)
    daemons: list[subprocess.Popen] = []
    env = _clean_env(SLURM_CONF=str(root / "slurm.conf"), PATH=SBIN)
    try:
        (root / "state").mkdir()
        (root / "spool").mkdir()
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        node_line = subprocess.run([tools["slurmd"], "-C"], capture_output=True, text=True, check=True,
                                   timeout=30).stdout.splitlines()[0]  # "NodeName=... RealMemory=..."
        (root / "slurm.conf").write_text(_slurm_conf(root, node_line))

        def start(name: str, *args: str) -> None:
            log = open(root / f"{name}.out", "w")
            daemons.append(subprocess.Popen([tools[name], *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))
            log.close()

        start("munged", "--foreground", f"--key-file={key}", f"--socket={root / 'munge.socket'}",
              f"--pid-file={root / 'munged.pid'}", f"--seed-file={root / 'munged.seed'}")
        _wait_for(lambda: (root / "munge.socket").exists(), root, "munged to open its socket")
        start("slurmctld", "-D", "-f", str(root / "slurm.conf"))
        start("slurmd", "-D", "-f", str(root / "slurm.conf"))

        def node_idle() -> bool:
            state = subprocess.run([tools["sinfo"], "-h", "-o", "%t"], env=env, capture_output=True, text=True,
                                   timeout=30).stdout.strip()
            return state == "idle"

        _wait_for(node_idle, root, "the node to be idle")
        yield {"env": env, "tools": tools, "root": root}
    finally:
        if len(daemons) > 1:  # slurmctld was started: cancel what still runs before slurmd goes
            subprocess.run([tools["scancel"], "--user", "root"], env=env, capture_output=True, timeout=30)
        for process in reversed(daemons):
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_for(condition, root: Path, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(root.glob("*.out")) + sorted(root.glob("*.log")))
    raise TimeoutError(f"timed out waiting for {what}\n{logs}")


def _sbatch(slurm: dict, launcher: str, args: list[str], cwd: Path, **env: str) -> tuple[str, str]:
    """Submits the launcher as a user would (from ``cwd``, CPU ranks on 2 CPUs) and waits for the
    job; returns its final state and its log, read from where the launcher puts it."""
    environment = dict(slurm["env"], PATH=os.environ["PATH"] + os.pathsep + SBIN,
                       PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       MFMEGATRON_VENV=sys.prefix, MASTER_PORT=str(_free_port()), **env)
    result = subprocess.run(
        [slurm["tools"]["sbatch"], "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--time=15",
         str(LAUNCHERS / launcher), *args],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=60,
    )
    job_id = result.stdout.strip().split(";")[0]
    assert result.returncode == 0 and job_id.isdigit(), result.stdout + result.stderr
    state = _wait_for_job(slurm, job_id)
    name = {"train.sbatch": "mfmegatron", "train_ngc.sbatch": "mfmegatron-ngc"}[launcher]
    log = cwd / f"{name}-{job_id}.out"
    assert log.exists(), f"no job log {log.name} in the submit directory: {sorted(p.name for p in cwd.iterdir())}"
    return state, log.read_text()


def _wait_for_job(slurm: dict, job_id: str, timeout: float = 600) -> str:
    """The job's final state (COMPLETED, FAILED...). Polled here: sbatch --wait sleeps 2, 8, then
    32 s between its checks, which would add up to half a minute to each job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = subprocess.run([slurm["tools"]["scontrol"], "show", "job", "-o", job_id], env=slurm["env"],
                                capture_output=True, text=True, timeout=30).stdout.split()
        state = dict(field.split("=", 1) for field in fields if "=" in field).get("JobState", "")
        if state not in ("", "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return state
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still running after {timeout} s")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from mfmegatron.data import build_prompt_shards

    root = tmp_path_factory.mktemp("data")
    source = root / "prompts.txt"
    source.write_text("\n".join(f"prompt {i} about a {kind}" for i, kind in enumerate(["cat", "boat"] * 8)) + "\n")
    build_prompt_shards([source], root / "shards", samples_per_shard=8)
    return root / "shards"


def _tiny(shards: Path, output: Path) -> list[str]:
    """The tiny recipe made shorter still: 2 steps of a 4x4-token model, and the export."""
    return [str(RECIPE), "model.image_size=64", "model.text_tokens=8", "data.micro_batch_size=2",
            "alignment.enabled=false", "meanflow.align_weight=0", "train.steps=2", "train.save_interval=2", "train.sample_interval=0",
            "train.export_at_end=true", "logging.progress_bar=false", "logging.tensorboard=false",
            f"data.shards={shards}", f"train.output_dir={output}"]


@pytest.mark.parametrize("launcher,env", [("train.sbatch", {}), ("train_ngc.sbatch", {"MFMEGATRON_CONTAINER": "0"})],
                         ids=["train", "train_ngc_without_container"])
def test_launcher_trains_and_exports_under_slurm(slurm, shards, tmp_path, launcher, env):
    output = tmp_path / "run"
    state, log = _sbatch(slurm, launcher, _tiny(shards, output), tmp_path, **env)
    assert state == "COMPLETED", log[-5000:]
    # 2 ranks from --cpus-per-task=2 and no GPUs: TP=2 of the tiny recipe, data-parallel 1.
    assert "1 node(s) x 2 rank(s) per node (0 GPU(s) per node)" in log
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2]
    assert (output / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert (output / "student" / "interval_embedder.safetensors").exists()


def test_a_job_without_a_recipe_says_why_in_its_log(slurm, tmp_path):
    state, log = _sbatch(slurm, "train.sbatch", [], tmp_path)
    assert state == "FAILED"
    assert log == ("train.sbatch: error: no recipe given; usage: sbatch recipes/slurm/train.sbatch RECIPE.yaml "
                   "[key=value ...]\n")
