"""A real OpenSSH server on 127.0.0.1 for the SSH device tests: throwaway host and client keys in a temporary folder.

Debian's openssh-server provides /usr/sbin/sshd (tools/_setup.sh installs it where it can). The server accepts only
the throwaway client key, and the client trusts only the throwaway host key through its own known_hosts file, so
the tests exercise the same host-key checking a real board gets.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalSshServer:
    folder: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def identity(self) -> Path:
        return self.folder / "client_key"

    @property
    def known_hosts(self) -> Path:
        return self.folder / "known_hosts"

    def url(self, python: str = sys.executable, **extra: str) -> str:
        query = {"identity": self.identity, "known_hosts": self.known_hosts, "python": python, **extra}
        return f"ssh://{getpass.getuser()}@127.0.0.1:{self.port}?" + "&".join(f"{k}={v}" for k, v in query.items())

    def start(self) -> None:
        # sshd refuses to start without its privilege-separation folder, which only the service's unit creates.
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        command = [SSHD, "-D", "-e", "-f", str(self.folder / "sshd_config")]
        with open(self.folder / "sshd.log", "w") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not start: {(self.folder / 'sshd.log').read_text()[-500:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def make_server(folder: Path) -> LocalSshServer:
    """Keys, known_hosts and an sshd_config in ``folder``; call ``start()`` to run it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    server = LocalSshServer(folder, free_port())
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    host_public = (folder / "host_key.pub").read_text().split()[:2]
    server.known_hosts.write_text(f"[127.0.0.1]:{server.port} {' '.join(host_public)}\n")
    (folder / "sshd_config").write_text(
        f"Port {server.port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
    )
    for key in ("host_key", "client_key"):
        (folder / key).chmod(0o600)
    return server


def sshd_available() -> bool:
    return Path(SSHD).is_file() and shutil.which("ssh") is not None and shutil.which("scp") is not None
