"""What start-up needs from the host, checked before anything starts: the server's TLS
files (readable PEM, the key matches the certificate, ``client_ca`` holds CA certificates),
the audit file's folder, each caller socket's folder.

One function, :func:`startup_problems`, used by both ``serve`` (which refuses to start
with exit status 2 and one JSON log line per problem) and ``check`` (which reports each
as a configuration error, exit status 2), so that ``check`` passes exactly the files
``serve`` accepts. Each problem names the configuration key it is about, e.g.
``server.client_ca: /etc/ca.pem is a leaf certificate (basicConstraints CA:FALSE), not a
CA certificate``. The TLS checks also run on every reload (``identity.TlsFiles``), so a
reload with bad TLS files is refused as a whole (docs/operations.md, "Reload").

Folder checks use ``os.access`` for the user running the command: run ``check`` as the
service's user, or as root while the service runs (docs/operations.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError, Settings
from .identity import load_tls_files, owner_ids


def _folder_problem(key: str, path: str, what: str) -> str | None:
    """A problem if the folder holding ``path`` is missing, not a folder or not writable."""
    folder = Path(path).parent
    if not folder.exists():
        return f"{key}: folder {folder} of the {what} does not exist"
    if not folder.is_dir():
        return f"{key}: {folder} (the {what}'s folder) is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{key}: folder {folder} of the {what} is not writable by this user (uid {os.getuid()})"
    return None


def startup_problems(settings: Settings) -> list[str]:
    """Every host-side fault start-up would stop at, each naming its key; [] when none.

    Checks (the same as ``serve`` runs before it binds a port):

    * ``server.tls_certificate``/``tls_private_key``/``client_ca`` (with a TLS listener):
      :func:`identity.load_tls_files`;
    * ``audit.path`` (with ``sink = "file"``): the file, if it exists, is no folder and is
      writable; otherwise its folder exists and is writable;
    * ``callers.NAME.unix_socket``: the folder of ``path`` exists and is writable (the
      socket is created there); ``owner`` and ``group`` exist on this host, and (without
      root) are this user and one of its groups, so the socket can be handed to them.
    """
    problems: list[str] = []
    server = settings.server
    if server.listen and not server.insecure:
        try:
            load_tls_files(server)
        except ConfigError as exc:
            problems.append(str(exc))
    audit = settings.audit
    if audit.sink == "file" and audit.path is not None:
        path = Path(audit.path)
        if path.exists():
            if path.is_dir():
                problems.append(f"audit.path: {path} is a folder, not a file")
            elif not os.access(path, os.W_OK):
                problems.append(f"audit.path: {path} is not writable by this user (uid {os.getuid()})")
        elif problem := _folder_problem("audit.path", str(path), "audit file"):
            problems.append(problem)
    for name, caller in settings.callers.items():
        sock = caller.unix_socket
        if sock is None:
            continue
        if problem := _folder_problem(f"callers.{name}.unix_socket.path", sock.path, "socket"):
            problems.append(problem)
        key = f"callers.{name}.unix_socket"
        try:
            uid, _ = owner_ids(sock.owner, None)
            _, gid = owner_ids(None, sock.group)
        except KeyError as exc:
            field, what = ("owner", "user") if "getpwnam" in str(exc) else ("group", "group")
            problems.append(f"{key}.{field}: no {what} {getattr(sock, field)!r} on this host")
            continue
        if os.geteuid() != 0:  # without root, chown hands a socket only to our own groups
            if uid not in (-1, os.geteuid()):
                problems.append(f"{key}.owner: {sock.owner!r} is another user; only root may hand it the socket")
            if gid not in (-1, os.getegid(), *os.getgroups()):
                problems.append(
                    f"{key}.group: this user (uid {os.geteuid()}) is not in group {sock.group!r}, so it cannot "
                    "hand it the socket (systemd: SupplementaryGroups=)"
                )
    return problems
