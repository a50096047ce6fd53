"""A team on several machines: experiments run on two hosts meet on a third, over real links.

Hosts are network namespaces on a virtual switch (tests/netlab.py). The services host runs what
docs/team.md sets up: `make server SERVER_HOST=<its address>` (MLflow on PostgreSQL; off loopback
with logins from team.yaml and HTTPS), a bare git repository and a DVC remote over SSH (Debian's
OpenSSH server, key-based; DVC's `dvc-ssh` client).
Every other host has its own HOME (its own key), its own clone, and reaches the services only
through its link: a cut link or a blocked route is a real network failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

import netlab
from conftest import BIN, LEARNS, REPO, commit, make_project, stages_run
from mnist_lstm import contracts

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
TIMEOUT = 600
# The machines of the tests below, as team.yaml lists them on the services host.
TEAM_FILE = {
    "worker-a": "trainer",
    "worker-b": "trainer",
    "worker-c": "trainer",
    "third": "reader",
    "reader": "reader",
    "lead": "promoter",
    "auditor": "reader",
}


def _why_not() -> str | None:
    problem = netlab.unavailable()
    if problem:
        return problem
    if not Path(SSHD).exists():
        return "OpenSSH's server is not installed (apt-get install openssh-server; .ci/run does it)"
    return None


# .ci/run, as root, installs what this needs and sets MNIST_LSTM_REQUIRE_NETNS=1: there a missing
# part is a failure, not a skip.
_problem = _why_not()
if _problem and not os.environ.get(netlab.REQUIRE_ENV):
    pytest.skip(_problem, allow_module_level=True)


@dataclass
class Machine:
    """A host of the lab as a teammate's machine: its HOME (SSH key, git identity) and clone."""

    host: netlab.Host
    home: Path
    env: dict[str, str]

    def run(
        self, cmd: list[str], cwd: Path, check: bool = True, **env
    ) -> subprocess.CompletedProcess:
        result = self.host.run(cmd, cwd=cwd, env={**self.env, **env}, timeout=TIMEOUT)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self.host.name}: {cmd} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def clone(self, url: str, name: str = "work") -> Path:
        target = self.home / name
        self.run(["git", "clone", "-q", url, str(target)], self.home)
        self.env["PYTHONPATH"] = str(target / "src")
        return target


@dataclass
class Team:
    lab: netlab.Lab
    services: netlab.Host
    state: Path
    git_url: str
    dvc_url: str
    tracking_uri: str
    public_key_file: Path
    root: Path

    def machine(self, name: str) -> Machine:
        """A new host with its own HOME: an SSH key the services host accepts, the services'
        host key in known_hosts, a git identity."""
        host = self.lab.host(name)
        home = self.root / name
        host.ssh_dir = home / ".ssh"
        (home / ".ssh").mkdir(parents=True)
        key = home / ".ssh" / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        with (self.state / "ssh" / "authorized_keys").open("a") as keys:
            keys.write(key.with_suffix(".pub").read_text())
        host_key = self.public_key_file.read_text().split()[:2]
        addresses = [self.services.address, *self.aliases]
        (home / ".ssh" / "known_hosts").write_text(
            "".join(f"{address} {' '.join(host_key)}\n" for address in addresses)
        )
        (home / ".gitconfig").write_text(f"[user]\n\tname = {name}\n\temail = {name}@team\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
        secrets = self.state / "mlflow" / "secrets"
        env.update(
            HOME=str(home),
            PATH=f"{BIN}{os.pathsep}{env['PATH']}",
            MLFLOW_TRACKING_URI=self.tracking_uri,
            MLFLOW_TRACKING_SERVER_CERT_PATH=str(self.state / "mlflow" / "tls" / "ca.pem"),
            MLFLOW_TRACKING_USERNAME=name,
            MLFLOW_TRACKING_PASSWORD=(secrets / "users" / name).read_text().strip(),
            GIT_SSH_COMMAND="ssh -o BatchMode=yes",
        )
        self.lab.wait_reachable()
        return Machine(host, home, env)

    @property
    def aliases(self) -> list[str]:
        return [f"{self.lab.subnet}.100"]


def _start_sshd(services: netlab.Host, ssh_dir: Path) -> None:
    host_key = ssh_dir / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    (ssh_dir / "authorized_keys").touch()
    Path("/run/sshd").mkdir(exist_ok=True)  # OpenSSH's privilege separation directory
    options = {
        "ListenAddress": "0.0.0.0",
        "HostKey": str(host_key),
        "AuthorizedKeysFile": str(ssh_dir / "authorized_keys"),
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "PermitRootLogin": "prohibit-password",
        # The test's folders live under /tmp (world-writable): the real sshd would refuse them.
        "StrictModes": "no",
        "UsePAM": "no",
        "PidFile": str(ssh_dir / "sshd.pid"),
        "Subsystem": "sftp internal-sftp",
    }
    args = [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]
    log = (ssh_dir / "sshd.log").open("w")
    services.popen([SSHD, "-D", "-e", "-f", "/dev/null", *args], stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while services.run(["bash", "-c", f"exec 3<>/dev/tcp/{services.address}/22"]).returncode:
        assert time.monotonic() < deadline, (ssh_dir / "sshd.log").read_text()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def team():
    """The services host, set up as docs/team.md says; the team's repo pushed to its git."""
    if _problem:
        raise AssertionError(_problem)
    # Not under pytest's tmp folder: PostgreSQL runs as `postgres`, who must enter every parent.
    root = Path(tempfile.mkdtemp(prefix="mnist-lstm-team-"))
    root.chmod(0o755)
    lab = netlab.Lab.create()
    try:
        services = lab.host("services")
        state = root / "services"
        (state / "ssh").mkdir(parents=True)
        _start_sshd(services, state / "ssh")
        services.add_address(f"{lab.subnet}.100")
        # The git remote and the DVC remote: folders on the services host, reached over SSH.
        git_dir, dvc_dir = state / "git" / "mnist-lstm.git", state / "dvc-store"
        subprocess.run(["git", "init", "-q", "--bare", str(git_dir)], check=True)
        dvc_dir.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
        # The team as docs/team.md has it: each machine's user, one role each.
        (root / "team.yaml").write_text(yaml.safe_dump({"users": TEAM_FILE}))
        server = [sys.executable, "-m", "mnist_lstm.server"]
        started = services.run(
            [*server, "start", "--state", str(state / "mlflow"), "--host", services.address,
             "--team", str(root / "team.yaml")],
            cwd=REPO,
            env=env,
            timeout=TIMEOUT,
        )  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr
        # Off loopback: a login and HTTPS, without being asked.
        tracking_uri = f"https://{services.address}:5001"
        assert f"MLflow tracking server: {tracking_uri}" in started.stdout

        # One teammate makes the repo: the project with the team's DVC remote committed.
        git_url = f"ssh://root@{services.address}{git_dir}"
        dvc_url = f"ssh://root@{services.address}{dvc_dir}"
        origin, origin_env = make_project(root / "origin")
        config = origin / ".dvc" / "config"
        config.write_text(config.read_text().replace("~/.cache/mnist-lstm/dvc-remote", dvc_url))
        commit(origin, origin_env, "the team's DVC remote: SSH on the services host")
        subprocess.run(
            ["git", "push", "-q", str(git_dir), "HEAD:refs/heads/main"], cwd=origin, check=True
        )
        subprocess.run(["git", "symbolic-ref", "HEAD", "refs/heads/main"], cwd=git_dir, check=True)
        yield Team(
            lab=lab,
            services=services,
            state=state,
            git_url=git_url,
            dvc_url=dvc_url,
            tracking_uri=tracking_uri,
            public_key_file=state / "ssh" / "host_ed25519.pub",
            root=root,
        )
        services.run([*server, "stop", "--state", str(state / "mlflow")], env=env, timeout=120)
    finally:
        lab.close()
        shutil.rmtree(root, ignore_errors=True)


def remote_exp_refs(team: Team) -> list[str]:
    """The experiment refs the team's git remote holds (read on the services host itself)."""
    listed = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
        cwd=team.state / "git" / "mnist-lstm.git",
        capture_output=True,
        text=True,
        check=True,
    )
    return listed.stdout.split()


def exp_model_md5(machine: Machine, work: Path, exp: str) -> str:
    """The model md5 an experiment's dvc.lock records (read from its git ref)."""
    shown = machine.run(["git", "show", f"{_exp_ref(machine, work, exp)}:dvc.lock"], work).stdout
    outs = yaml.safe_load(shown)["stages"]["train"]["outs"]
    return next(out["md5"] for out in outs if out["path"] == "models/model.keras")


def _exp_ref(machine: Machine, work: Path, exp: str) -> str:
    refs = machine.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], work).stdout
    (ref,) = [ref for ref in refs.split() if ref.endswith(f"/{exp}")]
    return ref


def runs_with_model(machine: Machine, md5: str) -> list[dict]:
    """The server's runs that trained the model with this md5, asked from `machine` over its link
    (the test's own process is on no lab network)."""
    query = (
        "import json, mlflow; c = mlflow.MlflowClient();"
        "e = c.get_experiment_by_name('mnist-lstm');"
        f"runs = c.search_runs([e.experiment_id], \"tags.`dvc.model_md5` = '{md5}'\");"
        "print(json.dumps([dict(id=r.info.run_id, name=r.info.run_name, status=r.info.status,"
        " tags=r.data.tags, metrics=r.data.metrics) for r in runs]))"
    )
    return json.loads(machine.run([sys.executable, "-c", query], machine.home).stdout)


# What `make promote` does once its gate passes (the tiny experiments' metrics would not): the
# run's logged model, hashed, registered as the champion.
REGISTER = """
import pathlib, sys, tempfile
from mnist_lstm.tracking import registry
registry.connect()
(model,) = registry.logged_models(sys.argv[1], pathlib.Path(tempfile.mkdtemp()))
print(registry.promote(sys.argv[1], model.model_id, model.md5, None))
"""


def test_two_workers_share_experiments_and_third_hosts_reproduce_the_champion(team):
    worker_a, worker_b = team.machine("worker-a"), team.machine("worker-b")
    work_a, work_b = worker_a.clone(team.git_url), worker_b.clone(team.git_url)

    # Worker A trains while worker B cannot reach the tracking server (its route is cut).
    log_a = (worker_a.home / "exp-a.log").open("w+")
    exp_a = worker_a.host.popen(
        ["dvc", "exp", "run", "-n", "exp-a", "-S", "train.units=8"],
        cwd=work_a,
        env=worker_a.env,
        stdout=log_a,
        stderr=subprocess.STDOUT,
    )
    worker_b.host.block(team.services.address)
    refused = worker_b.run(
        ["dvc", "exp", "run", "-n", "exp-b", "-S", "train.units=12"], work_b, check=False
    )
    assert refused.returncode != 0
    (line,) = [s for s in refused.stderr.splitlines() if s.startswith("error: MLflow tracking")]
    assert team.tracking_uri in line and "MNIST_LSTM_TRACKING=offline" in line
    assert "Traceback" not in refused.stderr + refused.stdout
    # The same experiment with the store unreachable: trained, its run kept for later.
    worker_b.run(
        ["dvc", "exp", "run", "-n", "exp-b", "-S", "train.units=12"],
        work_b,
        MNIST_LSTM_TRACKING="offline",
    )
    assert exp_a.wait(timeout=TIMEOUT) == 0, (worker_a.home / "exp-a.log").read_text()
    worker_b.host.unblock(team.services.address)
    synced = worker_b.run([sys.executable, "-m", "mnist_lstm.sync"], work_b)
    assert "sending" in synced.stdout and team.tracking_uri in synced.stdout, synced.stdout

    # Both share at the same time over SSH.
    pushes = [
        machine.host.popen(
            [sys.executable, "-m", "mnist_lstm.share", "exp-" + suffix],
            cwd=work,
            env=machine.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for machine, work, suffix in ((worker_a, work_a, "a"), (worker_b, work_b, "b"))
    ]
    for push in pushes:
        assert push.wait(timeout=TIMEOUT) == 0, push.stdout.read()
    assert sorted(ref.rsplit("/", 1)[1] for ref in remote_exp_refs(team)) == ["exp-a", "exp-b"]
    md5 = {"exp-a": exp_model_md5(worker_a, work_a, "exp-a")}
    md5["exp-b"] = exp_model_md5(worker_b, work_b, "exp-b")
    assert md5["exp-a"] != md5["exp-b"]

    # A third host: pull both, apply one, pull its data; nothing needs to run.
    third = team.machine("third")
    work = third.clone(team.git_url)
    third.run(["dvc", "exp", "pull", "origin", "exp-a", "exp-b"], work)
    listed = third.run(["dvc", "exp", "list", "--name-only"], work).stdout.split()
    assert sorted(listed) == ["exp-a", "exp-b"]
    third.run(["dvc", "exp", "apply", "exp-b"], work)
    third.run(["dvc", "pull"], work)
    assert stages_run(third.run(["dvc", "repro"], work)) == []
    assert "units: 12" in (work / "params.yaml").read_text()
    for exp, digest in md5.items():
        (logged,) = runs_with_model(third, digest)
        assert logged["name"].startswith(f"{exp}:"), logged
        assert logged["status"] == "FINISHED"
    # `make lineage` there finds each experiment's run on the server by the hashes in its dvc.lock.
    for exp in ("exp-b", "exp-a"):
        third.run(["dvc", "exp", "apply", exp], work)
        third.run(["dvc", "pull"], work)
        lineage = third.run([sys.executable, "-m", "mnist_lstm.lineage"], work).stdout
        (logged,) = runs_with_model(third, md5[exp])
        assert logged["id"] in lineage, lineage

    # The lead registers exp-a's model as the champion; the third host, which pulled the
    # experiment, and an auditor's fresh clone, which did not, each rebuild it byte for byte from
    # its name: the experiment's own commit, or the run's commit with its logged params, and the
    # team's DVC remote (the run-cache `make share` pushed).
    (trained,) = runs_with_model(third, md5["exp-a"])
    lead = team.machine("lead")
    lead.clone(team.git_url)
    registered = lead.run([sys.executable, "-c", REGISTER, trained["id"]], lead.home)
    assert registered.stdout.split() == ["1"], registered.stdout
    auditor = team.machine("auditor")
    fresh = auditor.clone(team.git_url)
    for machine, clone, source in (
        (third, work, "experiment exp-a's commit"),
        (auditor, fresh, "the run's commit"),
    ):
        rebuilt = machine.run([sys.executable, "-m", "mnist_lstm.reproduce"], clone)
        assert f"md5 {md5['exp-a']}, at {source}" in rebuilt.stdout, rebuilt.stdout
        assert rebuilt.stdout.splitlines()[-1] == (
            "models:/mnist-lstm@champion (version 1): reproduced bit for bit "
            "(restored from the cache)"
        ), rebuilt.stdout


def test_ssh_remote_unreachable_during_share_publishes_no_half_experiment(team):
    worker = team.machine("worker-c")
    work = worker.clone(team.git_url)
    # A configuration that learns the tiny bands (conftest.LEARNS), so the metrics checked at the
    # end tell a model that learnt from one that did not.
    learns = [f"train.{key.split('__')[1]}={value}" for key, value in LEARNS.items()]
    overrides = [arg for setting in ["train.units=10", *learns] for arg in ("-S", setting)]
    worker.run(["dvc", "exp", "run", "-n", "exp-c", *overrides], work)
    before = remote_exp_refs(team)

    # The whole services host unreachable: one line, exit 1, no ref published.
    worker.host.block(team.services.address)
    failed = worker.run([sys.executable, "-m", "mnist_lstm.share", "exp-c"], work, check=False)
    worker.host.unblock(team.services.address)
    assert failed.returncode == 1
    (line,) = failed.stderr.strip().splitlines()
    assert (
        line.startswith("error: share: DVC remote 'shared' (ssh://root@")
        and "No route to host" in line
    ), line
    assert remote_exp_refs(team) == before

    # Only the DVC remote unreachable (the data on a second address of the services host), git
    # fine: share still publishes nothing...
    alias = team.aliases[0]
    worker.run(
        [
            "dvc",
            "remote",
            "modify",
            "--local",
            "shared",
            "url",
            team.dvc_url.replace(team.services.address, alias),
        ],
        work,
    )
    worker.host.block(alias)
    failed = worker.run([sys.executable, "-m", "mnist_lstm.share", "exp-c"], work, check=False)
    assert failed.returncode == 1 and remote_exp_refs(team) == before, failed.stderr
    # ...while DVC's own `dvc exp push` publishes the ref without the data: what share.py is
    # for. When this fails, DVC pushes data first: drop share.py and use `dvc exp push`.
    half = worker.run(["dvc", "exp", "push", "origin", "exp-c"], work, check=False)
    assert half.returncode != 0
    assert any(ref.endswith("/exp-c") for ref in remote_exp_refs(team)), half.stderr
    worker.host.unblock(alias)

    # Reachable again: share completes it, and a fresh clone gets the whole experiment.
    worker.run([sys.executable, "-m", "mnist_lstm.share", "exp-c"], work)
    reader = team.machine("reader")
    fresh = reader.clone(team.git_url)
    reader.run(["dvc", "exp", "pull", "origin", "exp-c"], fresh)
    reader.run(["dvc", "exp", "apply", "exp-c"], fresh)
    reader.run(["dvc", "pull"], fresh)
    assert stages_run(reader.run(["dvc", "repro"], fresh)) == []
    metrics = json.loads((fresh / "reports" / "metrics.json").read_text())
    # ~0.97 when measured, where chance is 0.1.
    assert metrics["val_accuracy"] >= 0.8 and metrics["holdout_accuracy"] >= 0.8, metrics
    # The metrics are those the worker's run logged to the server for the very model pulled...
    md5 = exp_model_md5(worker, work, "exp-c")
    assert contracts.md5_file(fresh / "models" / "model.keras") == md5
    (logged,) = runs_with_model(reader, md5)
    for key in ("val_accuracy", "val_loss", "holdout_accuracy"):
        assert logged["metrics"][f"eval/{key}"] == pytest.approx(metrics[key]), key
    # ...and what that model file, on the pulled data, really scores.
    import keras

    data = np.load(fresh / "data" / "processed" / "mnist.npz")
    model = keras.models.load_model(fresh / "models" / "model.keras")
    predicted = model.predict(data["x_val"], verbose=0).argmax(axis=1)
    assert metrics["val_accuracy"] == pytest.approx((predicted == data["y_val"]).mean(), abs=1e-6)
