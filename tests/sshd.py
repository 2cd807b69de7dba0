"""A throwaway OpenSSH server on 127.0.0.1 for the remote-mode tests.

Everything lives in one temporary directory: the host key, a fresh client key
pair, ``authorized_keys``, ``sshd_config``, the pid file and the server log.
Nothing is written to ``~/.ssh``.  The server runs in the foreground
(``sshd -D -e``) as a child of the test process and is killed on exit.

    with start_sshd(tmp_path) as server:
        subprocess.run(server.ssh_command("true"), check=True)

If ``sshd`` is missing this raises (the tests fail, they do not skip):
``.ci/run`` installs ``openssh-server``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")


@dataclasses.dataclass
class SSHServer:
    host: str
    port: int
    user: str
    key_file: Path          # private key of the client
    workdir: Path
    log_file: Path
    proc: subprocess.Popen

    def ssh_command(self, remote_command: str, *, key_file: Path | None = None) -> list[str]:
        """An ``ssh`` command line that runs ``remote_command`` on this server."""
        return [
            "ssh", "-p", str(self.port), "-i", str(key_file or self.key_file),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
            f"{self.user}@{self.host}", remote_command,
        ]

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""


def find_sshd() -> str:
    found = shutil.which("sshd")
    if found:
        return found
    for cand in SSHD_CANDIDATES:
        if os.access(cand, os.X_OK):
            return cand
    raise RuntimeError(
        "OpenSSH server binary 'sshd' not found: the remote-mode tests need a real "
        "SSH server on 127.0.0.1; install it with `apt-get install -y openssh-server`"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port free here, and the one after it (a search's finalize starts its folds' manager there), drawn below the
    kernel's ephemeral range (32768 and up), where no outgoing connection takes it meanwhile, from a stretch of its
    own for each pytest-xdist worker: a port the kernel handed out was taken by another worker's connection before
    the NNI manager listened on it (EADDRINUSE)."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    low = 20000 + 3000 * (worker % 4)
    while True:
        port = random.randrange(low, low + 2999)
        if all(can_bind(host, p) for p in (port, port + 1)):
            return port


def can_bind(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def keygen(path: Path, comment: str = "nni-test") -> Path:
    """Create an ed25519 key pair at ``path`` / ``path.pub`` without passphrase."""
    if shutil.which("ssh-keygen") is None:
        raise RuntimeError("ssh-keygen not found: install openssh-client")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True, stdin=subprocess.DEVNULL,
    )
    return path


def _write_config(workdir: Path, port: int, host_key: Path, user: str) -> Path:
    lines = [
        f"ListenAddress 127.0.0.1:{port}",
        f"HostKey {host_key}",
        f"PidFile {workdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        f"AllowUsers {user}",
        "Subsystem sftp internal-sftp",   # NNI uploads code and files over SFTP
        "MaxStartups 50:30:100",
        "MaxSessions 50",
        "ClientAliveInterval 30",
        "LogLevel VERBOSE",
    ]
    cfg = workdir / "sshd_config"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def _wait_banner(host: str, port: int, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.settimeout(2)
                if s.recv(64).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def start_sshd(workdir: Path | str, *, timeout: float = 15.0) -> Iterator[SSHServer]:
    """Start sshd on 127.0.0.1:<free port>; yields an :class:`SSHServer`."""
    sshd = find_sshd()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    user = getpass.getuser()
    host_key = keygen(workdir / "ssh_host_ed25519_key", "host")
    client_key = keygen(workdir / "id_ed25519", "client")
    auth = workdir / "authorized_keys"
    auth.write_text((workdir / "id_ed25519.pub").read_text())
    auth.chmod(0o600)
    if os.geteuid() == 0:
        # privilege separation directory; Debian creates it only in its service unit
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    log_file = workdir / "sshd.log"

    proc = None
    for _attempt in range(5):  # a free port can be taken between probe and bind
        port = free_port()
        cfg = _write_config(workdir, port, host_key, user)
        check = subprocess.run([sshd, "-t", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"sshd rejected its test config {cfg}: {check.stderr.strip()}")
        log = open(log_file, "ab")
        # own process group, so that the per-connection children die with it
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
        log.close()
        if _wait_banner("127.0.0.1", port, proc, timeout):
            break
        _stop(proc)
        proc = None
    if proc is None:
        raise RuntimeError(f"sshd did not start on 127.0.0.1; its log:\n{log_file.read_text(errors='replace')}")

    server = SSHServer("127.0.0.1", port, user, client_key, workdir, log_file, proc)
    try:
        yield server
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Terminate sshd and its connection children (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


if __name__ == "__main__":  # manual use: python tests/sshd.py [DIR]
    import sys
    import tempfile

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so `kill PID` also stops sshd
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="sshd-"))
    with start_sshd(d) as srv:
        print(f"sshd on {srv.host}:{srv.port} user={srv.user} key={srv.key_file} (Ctrl-C to stop)", flush=True)
        try:
            srv.proc.wait()
        except KeyboardInterrupt:
            pass
