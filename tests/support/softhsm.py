"""Throwaway SoftHSM tokens for tests: one folder holds the configuration, the token
store and the PIN file; nothing touches the system token directory.

``softhsm2-util`` (Debian package ``softhsm2``) must be installed; without it these
helpers raise :class:`SoftHsmError`, they never skip.

SoftHSM reads ``SOFTHSM2_CONF`` once, when the module is initialised: a process that
loads the module through python-pkcs11 must have it set before the first
``pkcs11.lib()`` call (see ``tests/conftest.py``). The helpers here pass it explicitly
to each ``softhsm2-util`` run, so they work whatever the current environment says.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

#: Where Debian's softhsm2 package puts the module.
#: Resolved like Pkcs11Backend resolves it: a test that calls pkcs11.lib() itself must load
#: the same file, or Cryptoki is initialised twice in one process.
DEFAULT_MODULE = os.path.realpath("/usr/lib/softhsm/libsofthsm2.so")
_TIMEOUT_S = 60


class SoftHsmError(RuntimeError):
    """softhsm2-util is missing or failed; the message carries its output."""


@dataclass(frozen=True)
class SoftHsmToken:
    """An initialised SoftHSM token in its own folder.

    Attributes:
        conf: path of its ``softhsm2.conf`` (the value for ``SOFTHSM2_CONF``).
        module: path of the PKCS#11 module.
        label: token label (what ``pkcs11:token=...`` names).
        pin_file: 0600 file holding the user PIN (no trailing newline).
        serial: the token's serial number as SoftHSM reports it (16 hex digits).
    """

    conf: Path
    module: str
    label: str
    pin_file: Path
    serial: str

    @property
    def pin(self) -> str:
        """The user PIN (read from :attr:`pin_file`)."""
        return self.pin_file.read_text()

    def env(self) -> dict[str, str]:
        """A copy of ``os.environ`` with ``SOFTHSM2_CONF`` pointing to this token's config."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def uri(self, obj: str, **attrs: str) -> str:
        """``pkcs11:token=<label>;object=<obj>`` plus any further ``name=value`` attributes."""
        extra = "".join(f";{k}={v}" for k, v in attrs.items())
        return f"pkcs11:token={self.label};object={obj}{extra}"


def softhsm2_util() -> str:
    """Path of ``softhsm2-util``; SoftHsmError naming the package if it is missing."""
    path = shutil.which("softhsm2-util")
    if path is None:
        raise SoftHsmError("softhsm2-util is not on PATH: install the softhsm2 package (apt-get install softhsm2)")
    return path


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file


def _run(args: list[str], conf: Path, redact: tuple[str, ...] = ()) -> str:
    try:
        proc = subprocess.run(
            [softhsm2_util(), *args],
            env={**os.environ, "SOFTHSM2_CONF": str(conf)},
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SoftHsmError(f"softhsm2-util {args[0]} timed out after {_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        shown = " ".join("***" if a in redact else a for a in args)
        raise SoftHsmError(
            f"softhsm2-util {shown} failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


def write_conf(folder: Path) -> Path:
    """Write ``folder/softhsm2.conf`` with its token store in ``folder/tokens``; return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = folder / "tokens"
    tokens.mkdir(mode=0o700, exist_ok=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
    )
    return conf


def serial_of(conf: Path, label: str) -> str:
    """The serial number of the token labelled ``label`` (parsed from ``--show-slots``)."""
    out = _run(["--show-slots"], conf)
    for block in re.split(r"\n(?=Slot )", out):
        label_m = re.search(r"^\s*Label:\s*(.*?)\s*$", block, re.M)
        serial_m = re.search(r"^\s*Serial number:\s*(\S+)\s*$", block, re.M)
        if label_m and serial_m and label_m.group(1) == label:
            return serial_m.group(1)
    raise SoftHsmError(f"no initialised token labelled {label!r} in softhsm2-util --show-slots")


def create_token(
    folder: str | os.PathLike[str], label: str = "helseid-test", module: str = DEFAULT_MODULE
) -> SoftHsmToken:
    """Initialise a fresh token labelled ``label`` in ``folder`` (created if needed).

    A random user PIN and SO-PIN are generated; the user PIN goes to ``folder/user.pin``
    (0600), the SO-PIN to ``folder/so.pin`` (0600). Raises SoftHsmError.
    """
    folder = Path(folder)
    conf = write_conf(folder)
    pin = secrets.token_hex(8)
    so_pin = secrets.token_hex(8)
    pin_file = folder / "user.pin"
    _write_secret(pin_file, pin)
    _write_secret(folder / "so.pin", so_pin)
    _run(
        ["--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
        conf,
        redact=(pin, so_pin),
    )
    return SoftHsmToken(conf=conf, module=module, label=label, pin_file=pin_file, serial=serial_of(conf, label))


def import_private_key(
    token: SoftHsmToken,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    label: str,
    id: bytes | str,
) -> str:
    """Import ``key`` (and its public key) into ``token`` with CKA_LABEL ``label`` and CKA_ID ``id``.

    For fixed test vectors only: an imported key was extractable once, unlike one made
    by ``keys create``. ``id`` is raw bytes or a hex string. The PKCS#8 PEM goes to a
    0600 temporary file that is deleted afterwards. Returns the key's PKCS#11 URI
    (by label). Raises SoftHsmError.
    """
    id_hex = id.hex() if isinstance(id, bytes) else id
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd, name = tempfile.mkstemp(prefix="import-", suffix=".pem", dir=token.conf.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        pin = token.pin
        _run(
            ["--import", name, "--token", token.label, "--label", label, "--id", id_hex, "--pin", pin],
            token.conf,
            redact=(pin,),
        )
    finally:
        os.unlink(name)
    return token.uri(label)
