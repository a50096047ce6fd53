"""Test "machines" on one Linux box: network namespaces on a virtual switch (iproute2, as root).

Every host is a network namespace with its own loopback and one address on a /24 that a bridge in
a switch namespace joins through veth pairs, so traffic between hosts crosses a real network stack
(TCP handshakes, routing, a link that can go down). Hosts share the file system: each test gives
each host its own folders (a clone, a HOME).

    with Lab.create() as lab:
        server = lab.host("services")            # 10.x.y.1
        worker = lab.host("worker-a")            # 10.x.y.2
        worker.run(["ping", "-c1", server.address])

`python tests/netlab.py up N` builds one by hand (hosts h1..hN) and prints how to enter a host;
`python tests/netlab.py down` removes it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Namespaces are machine-wide: every lab's names carry its own prefix.
PREFIX = "mlab"
# Set (by .ci/run, as root): tests that need namespaces fail instead of skipping without them.
REQUIRE_ENV = "MNIST_LSTM_REQUIRE_NETNS"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def unavailable() -> str | None:
    """Why namespaces cannot be made here (one line), or None."""
    probe = f"{PREFIX}-probe-{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    except FileNotFoundError:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if made.returncode != 0:
        return f"network namespaces cannot be made here ({made.stderr.strip()}; needs root)"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """One namespace: `run`/`popen` a command inside it; cut or restore its paths to others."""

    name: str
    netns: str
    address: str
    processes: list[subprocess.Popen] = field(default_factory=list)
    # This host's own ~/.ssh (keys, known_hosts), seen at the account's ~/.ssh by what runs in
    # it: OpenSSH reads the account's home from the user database, never $HOME.
    ssh_dir: Path | None = None

    def command(self, cmd: list[str]) -> list[str]:
        if self.ssh_dir is None:
            return ["ip", "netns", "exec", self.netns, *cmd]
        import pwd  # Linux only, as network namespaces are

        # The account's home from the user database, as OpenSSH finds it (not $HOME, which a
        # test run may point elsewhere).
        account_ssh = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"
        account_ssh.mkdir(mode=0o700, exist_ok=True)  # the mount point
        mount = f'mount --bind "$0" {account_ssh} && exec "$@"'
        return [
            "ip", "netns", "exec", self.netns,
            "unshare", "--mount", "--propagation", "private",
            "sh", "-c", mount, str(self.ssh_dir), *cmd,
        ]  # fmt: skip

    def run(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(cmd), **kwargs)

    def popen(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        """A long-lived process in this host; stopped (its whole session) when the lab closes."""
        process = subprocess.Popen(self.command(cmd), start_new_session=True, **kwargs)
        self.processes.append(process)
        return process

    def block(self, address: str) -> None:
        """From now on this host gets "No route to host" for `address` (the others still reach
        it): one machine's path to a server broken, the server itself fine."""
        _ip("-n", self.netns, "route", "add", "unreachable", f"{address}/32")

    def unblock(self, address: str) -> None:
        _ip("-n", self.netns, "route", "del", "unreachable", f"{address}/32")

    def add_address(self, address: str) -> None:
        """A second address on this host's link (a service of its own that can be cut alone)."""
        _ip("-n", self.netns, "addr", "add", f"{address}/24", "dev", "eth0")


@dataclass
class Lab:
    """A switch namespace with a bridge, and hosts attached to it on 10.<a>.<b>.0/24."""

    prefix: str
    subnet: str
    hosts: list[Host] = field(default_factory=list)

    @classmethod
    def create(cls, prefix: str | None = None) -> Lab:
        prefix = prefix or f"{PREFIX}{os.getpid() % 10000}"
        # A subnet per lab, so two labs (two test runs) never answer for each other.
        n = os.getpid() % 250
        lab = cls(prefix=prefix, subnet=f"10.{200 + n % 50}.{n}")
        switch = lab.switch
        _ip("netns", "add", switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        return lab

    @property
    def switch(self) -> str:
        return f"{self.prefix}-switch"

    def host(self, name: str) -> Host:
        """A new host, wired to the switch, with the next address (.1, .2, ...)."""
        index = len(self.hosts) + 1
        host = Host(name=name, netns=f"{self.prefix}-{name}", address=f"{self.subnet}.{index}")
        _ip("netns", "add", host.netns)
        port = f"p{index}"
        _ip(
            "-n",
            self.switch,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "eth0",
            "netns",
            host.netns,
        )
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        self.hosts.append(host)
        return host

    def wait_reachable(self, timeout: float = 10) -> None:
        """Until every host answers every other's ping (bridge ports take a moment to forward)."""
        deadline = time.monotonic() + timeout
        for source in self.hosts:
            for target in self.hosts:
                while source.run(["ping", "-c1", "-W1", target.address]).returncode != 0:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{source.name} cannot reach {target.name}")
                    time.sleep(0.2)

    def close(self) -> None:
        """Stops every process left in a host (its whole session), then removes the namespaces."""
        for host in self.hosts:
            for process in host.processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
            pids = _ip("netns", "pids", host.netns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for netns in [host.netns for host in self.hosts] + [self.switch]:
            _ip("netns", "del", netns, check=False)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _has_ping() -> bool:
    return subprocess.run(["sh", "-c", "command -v ping"], capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="a switch and N hosts h1..hN (10.<a>.<b>.1..N)")
    up.add_argument("hosts", type=int)
    sub.add_parser("down", help=f"remove every namespace named {PREFIX}-*")
    args = parser.parse_args(argv)
    if args.action == "down":
        for line in _ip("netns", "list").stdout.splitlines():
            name = line.split()[0]
            if name.startswith(f"{PREFIX}-"):
                _ip("netns", "del", name, check=False)
        return 0
    problem = unavailable()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    lab = Lab.create(prefix=PREFIX)
    for i in range(1, args.hosts + 1):
        host = lab.host(f"h{i}")
        print(f"{host.name} {host.address}: ip netns exec {host.netns} bash")
    if _has_ping():
        lab.wait_reachable()
    print(f"remove with: python {sys.argv[0]} down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
