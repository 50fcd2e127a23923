"""The launch scripts' dry runs (every command they would run, checked) and the SLURM settings."""

import os
import pathlib
import shlex
import subprocess

from absl import flags
import jax
import pytest

from vfmtok_jax import distributed

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
TPU_ENV = {"TPU": "pod", "ZONE": "us-east5-a", "PROJECT": "proj"}


def dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
  """The commands `launch/script` prints with DRY_RUN=1, each split as the shell would."""
  clean = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TPU", "ZONE", "PROJECT", "NUM_NODES", "NODE_RANK",
                                "COORDINATOR"))}
  out = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                       env={**clean, "DRY_RUN": "1", **env}, timeout=60, check=False)
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("(")]


def _after(cmd: list[str], flag: str) -> str:
  return cmd[cmd.index(flag) + 1]


def test_tpu_create_picks_the_runtime_and_passes_gcloud_flags():
  (cmd,) = dry_run("tpu_create.sh", "v5p-128", "--spot", **TPU_ENV)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod"]
  assert (_after(cmd, "--accelerator-type"), _after(cmd, "--version")) == \
      ("v5p-128", "v2-alpha-tpuv5")
  assert (_after(cmd, "--zone"), _after(cmd, "--project"), cmd[-1]) == \
      ("us-east5-a", "proj", "--spot")
  (cmd,) = dry_run("tpu_create.sh", "v4-32", **TPU_ENV)
  assert _after(cmd, "--version") == "tpu-ubuntu2204-base"


def test_tpu_setup_copies_and_installs_on_every_worker():
  tar, scp, ssh = dry_run("tpu_setup.sh", **TPU_ENV, TMPDIR="/tmp/x y")
  assert tar[0] == "tar" and tar[tar.index("-czf") + 1] == "/tmp/x y/vfmtok_jax.tgz"
  assert "--exclude=.git" in tar and tar[2] == str(LAUNCH.parent)
  assert scp[4:7] == ["scp", "/tmp/x y/vfmtok_jax.tgz", "pod:/tmp/vfmtok_jax.tgz"]
  assert "--worker=all" in scp and "--worker=all" in ssh
  assert "pip install -q -e '.[tpu]'" in _after(ssh, "--command")


def test_tpu_run_starts_the_job_on_every_worker():
  (cmd,) = dry_run("tpu_run.sh", "gpt", "--config", "configs/gpt.py:gpt_xl", "--workdir",
                   "gs://b/run 1", **TPU_ENV)
  assert cmd[4] == "ssh" and "--worker=all" in cmd
  remote = _after(cmd, "--command")
  # The remote command: distributed on, the job's module, the flags quoted once more.
  assert "VFMTOK_DISTRIBUTED=1" in remote
  job = remote[remote.index("nohup"):].split(">")[0]
  assert shlex.split(job)[1:] == ["~/venv/bin/python", "-m", "vfmtok_jax.train_gpt", "--config",
                                  "configs/gpt.py:gpt_xl", "--workdir", "gs://b/run 1"]
  assert "~/vfmtok_logs/w$W.log" in remote and "~/vfmtok_logs/pid" in remote


def test_tpu_logs_and_stop():
  (logs,) = dry_run("tpu_logs.sh", **TPU_ENV, WORKER="3", LINES="7")
  assert "--worker=3" in logs and _after(logs, "--command") == "tail -n 7 ~/vfmtok_logs/w*.log"
  (stop,) = dry_run("tpu_stop.sh", **TPU_ENV)
  assert "--worker=all" in stop and "kill -TERM" in _after(stop, "--command")


def test_gpu_run_single_and_multi_node():
  mkdir, cmd = dry_run("gpu_run.sh", "tokenizer", "--config", "configs/tokenizer.py:official")
  assert mkdir == ["mkdir", "-p", "logs"]
  assert cmd == ["env", "python", "-m", "vfmtok_jax.train_tokenizer", "--config",
                 "configs/tokenizer.py:official"]
  _, cmd = dry_run("gpu_run.sh", "extract_codes", "--workdir=w", NUM_NODES="4",
                   COORDINATOR="10.0.0.1:1234", NODE_RANK="2")
  assert cmd == ["env", "VFMTOK_DISTRIBUTED=1", "JAX_COORDINATOR_ADDRESS=10.0.0.1:1234",
                 "JAX_NUM_PROCESSES=4", "JAX_PROCESS_ID=2", "python", "-m",
                 "vfmtok_jax.extract_codes", "--workdir=w"]


def test_slurm_run_runs_one_srun_with_distributed_on():
  (cmd,) = dry_run("slurm_run.sh", "eval_generator", "--config=configs/eval_generator.py",
                   SLURM_JOB_ID="77", VFMTOK_ROOT=str(LAUNCH.parent), PYTHON="py")
  assert cmd == ["srun", "--kill-on-bad-exit=1", "--export=ALL,VFMTOK_DISTRIBUTED=1", "py", "-m",
                 "vfmtok_jax.eval_generator", "--config=configs/eval_generator.py"]


def test_local_run_starts_n_processes_of_one_cluster():
  mkdir, *procs = dry_run("local_run.sh", "2", "gpt", "--workdir=/tmp/w", PORT="4567",
                          DEVICES="2", LOGDIR="/tmp/l")
  assert mkdir == ["mkdir", "-p", "/tmp/l"] and len(procs) == 2
  for i, cmd in enumerate(procs):
    env = dict(a.split("=", 1) for a in cmd[1:cmd.index("python")])
    assert env == {"JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                   "VFMTOK_DISTRIBUTED": "1", "VFMTOK_CPU_COLLECTIVES": "gloo",
                   "JAX_COORDINATOR_ADDRESS": "127.0.0.1:4567", "JAX_NUM_PROCESSES": "2",
                   "JAX_PROCESS_ID": str(i)}
    assert cmd[cmd.index("python"):] == ["python", "-m", "vfmtok_jax.train_gpt",
                                         "--workdir=/tmp/w"]


@pytest.mark.parametrize("script", ["tpu_run.sh", "gpu_run.sh", "slurm_run.sh", "local_run.sh"])
def test_an_unknown_job_is_named(script):
  args = ["2", "train"] if script == "local_run.sh" else ["train"]
  out = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                       env={**os.environ, **TPU_ENV, "DRY_RUN": "1", "SLURM_JOB_ID": "1"},
                       timeout=60, check=False)
  assert out.returncode != 0 and "unknown job 'train'" in out.stderr
  assert out.stdout == ""


def test_missing_settings_are_named():
  out = subprocess.run(["bash", str(LAUNCH / "tpu_run.sh"), "gpt"], capture_output=True,
                       text=True, env={"PATH": os.environ["PATH"], "DRY_RUN": "1"}, timeout=60,
                       check=False)
  assert out.returncode != 0 and "TPU: set TPU" in out.stderr


# ------------------------------------------------------------------------------------------------
# SLURM's environment -> jax.distributed.initialize.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, first", [
    ("gpu003", "gpu003"), ("gpu[003-005,9]", "gpu003"), ("gpu[7,3],cpu1", "gpu7"),
    ("node1,node2", "node1"), ("a[01-02]-ib[3-4]", "a01-ib3"), (" n[10-12] ", "n10")])
def test_first_host(nodelist, first):
  assert distributed.first_host(nodelist) == first


def test_slurm_settings():
  env = {"SLURM_JOB_NODELIST": "gpu[12-15]", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
         "SLURM_JOB_ID": "4100"}
  assert distributed.slurm_settings(env) == {
      "JAX_COORDINATOR_ADDRESS": f"gpu12:{12345 + 4100 % 4096}", "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": "3"}
  assert distributed.slurm_settings({**env, "VFMTOK_COORDINATOR_PORT": "999"})[
      "JAX_COORDINATOR_ADDRESS"] == "gpu12:999"
  assert distributed.slurm_settings({"PATH": "/bin"}) == {}
  with pytest.raises(ValueError, match="SLURM_NTASKS is not"):
    distributed.slurm_settings({"SLURM_JOB_NODELIST": "a", "SLURM_PROCID": "0"})


@pytest.fixture
def fake_initialize(monkeypatch):
  """Records jax.distributed.initialize's arguments; restores the orbax barrier flag that
  initialize_from_env turns on."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  name = distributed._ORBAX_DISTRIBUTED_BARRIER  # pylint: disable=protected-access
  saved = flags.FLAGS[name].value if name in flags.FLAGS else None
  yield calls
  if name in flags.FLAGS:
    flags.FLAGS[name].value = saved


def test_initialize_from_env_reads_slurm_unless_told(fake_initialize):
  calls = fake_initialize
  slurm = {"VFMTOK_DISTRIBUTED": "1", "SLURM_JOB_NODELIST": "n[4-5]", "SLURM_PROCID": "1",
           "SLURM_NTASKS": "2", "SLURM_JOB_ID": "0"}
  assert distributed.initialize_from_env(slurm)
  assert calls[-1] == dict(coordinator_address="n4:12345", num_processes=2, process_id=1)
  # An explicit coordinator wins over the scheduler's.
  assert distributed.initialize_from_env({**slurm, "JAX_COORDINATOR_ADDRESS": "h:1",
                                          "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "5"})
  assert calls[-1] == dict(coordinator_address="h:1", num_processes=8, process_id=5)
  assert not distributed.initialize_from_env({**slurm, "VFMTOK_DISTRIBUTED": "0"})
  assert len(calls) == 2
