"""A private Postfix instance on 127.0.0.1 that relays everything to one port: the MTA an operator
would pick instead of raftmail. Its own config, queue and log live in a scratch directory; the
system Postfix (none, after install-peers.sh) is never touched and port 25 is never bound."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from . import cpu
from .peers import find_tool, running_as_root
from .procs import BenchError, free_port, on_exit, tail, wait_port, wait_until

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
HOSTNAME = "postfix.bench.test"

# Only the services a relay needs; chroot off everywhere ("n"), so the queue directory needs no
# copies of /etc files. The only inet listener is the high port on 127.0.0.1.
MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
myhostname = {hostname}
mydomain = bench.test
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# Nothing is local: every recipient is relayed to the one destination, never looked up in DNS.
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{relay_port}
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
smtpd_banner = $myhostname ESMTP
biff = no
append_dot_mydomain = no
maillog_file = {log}
maillog_file_prefixes = /var, /dev/stdout, {root}
"""


def available() -> str | None:
    """None when a private Postfix can run here, else why not."""
    if not find_tool("postfix"):
        return "Postfix is not installed: run `sudo bench/install-peers.sh`"
    if not running_as_root():
        return "a private Postfix instance needs root (it switches to the postfix user)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no 'postfix' user: reinstall with bench/install-peers.sh"
    return None


class PostfixRelay:
    """`postfix -c ROOT/etc start` with smtpd on 127.0.0.1:port relaying to 127.0.0.1:relay_port."""

    def __init__(self, root: Path, relay_port: int, port: int | None = None,
                 settings: dict[str, str] | None = None) -> None:
        why = available()
        if why:
            raise BenchError(why)
        self.root = root
        self.port = port or free_port()
        self.relay_port = relay_port
        self.settings = settings or {}
        self.postfix = find_tool("postfix")
        self.etc, self.queue, self.data = root / "etc", root / "queue", root / "data"
        self.log = root / "postfix.log"
        self._cancel_cleanup = None

    def write_config(self) -> None:
        postfix_user = pwd.getpwnam("postfix")
        for folder in (self.etc, self.queue, self.data):
            folder.mkdir(parents=True, exist_ok=True)
        # The postfix user must be able to reach its queue and data directories.
        for folder in (self.root, self.etc, self.queue):
            folder.chmod(0o755)
        os.chown(self.data, postfix_user.pw_uid, postfix_user.pw_gid)
        _check_traversable(self.root)
        main_cf = MAIN_CF.format(queue=self.queue, data=self.data, hostname=HOSTNAME,
                                 relay_port=self.relay_port, log=self.log, root=self.root)
        main_cf += "".join(f"{key} = {value}\n" for key, value in self.settings.items())
        (self.etc / "main.cf").write_text(main_cf)
        (self.etc / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))

    def _postfix(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.postfix, "-c", str(self.etc), *args], capture_output=True,
                              text=True, timeout=STOP_TIMEOUT)

    def start(self) -> None:
        self.write_config()
        done = self._postfix("start")
        if done.returncode != 0:
            # postfix prints errors only to a terminal or the maillog file; `check` (2-3 s, so
            # only run on failure) writes what is wrong with the configuration to the log.
            self._postfix("check")
            raise BenchError(f"postfix start failed (exit {done.returncode}): "
                             f"{(done.stderr or '').strip()} {tail(self.log, 800)}")
        self._cancel_cleanup = on_exit(self.stop)
        wait_port(self.port, START_TIMEOUT, "Postfix smtpd")
        pid = self.master_pid()
        if pid:
            cpu.register_root(pid)  # master daemonizes: its work is ours, not "others"

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def queue_empty(self) -> bool:
        """No message files left in the incoming, active or deferred queues."""
        for name in ("incoming", "active", "deferred", "hold", "maildrop"):
            folder = self.queue / name
            if folder.exists() and any(p.is_file() for p in folder.rglob("*")):
                return False
        return True

    def stop(self) -> None:
        pid = self.master_pid()
        if pid is None or not _alive(pid):
            return
        cpu.unregister_root(pid)
        self._postfix("stop")
        try:
            wait_until(lambda: not _alive(pid), STOP_TIMEOUT, "Postfix master to exit")
        except BenchError:
            os.kill(pid, 9)
        if self._cancel_cleanup:
            self._cancel_cleanup()
            self._cancel_cleanup = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _check_traversable(folder: Path) -> None:
    """Postfix drops to its own user, which must be able to enter every folder above its queue."""
    for parent in [folder, *folder.parents]:
        if not parent.stat().st_mode & 0o001:
            raise BenchError(f"{parent} is not searchable by others (mode "
                             f"{parent.stat().st_mode & 0o777:o}); Postfix's user cannot reach "
                             f"{folder}: use a scratch directory under a world-searchable folder")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by init) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

