"""Many threads signing in one PKCS#11 module, run as a separate process so that a crash
(SIGSEGV, SIGABRT from heap corruption) fails the calling test instead of killing pytest.

Usage (``SOFTHSM2_CONF`` must point to the token's configuration)::

    python pkcs11_threads.py MODE --module M --token LABEL --pin-file F \\
        --rsa-label L --rsa-pem PUB.pem --ec-label L --ec-pem PUB.pem [--threads 32 --per-thread 200]

MODE ``backend`` signs through one shared :class:`Pkcs11Backend` (which serialises every
Cryptoki call with its module lock); MODE ``raw`` calls python-pkcs11 directly from every
thread, each on its own session, with no lock at all (the negative control).

Each thread alternates RS256 and ES256 over signing inputs unique to (thread, index).
After all threads end, every signature is verified with ``cryptography`` against the
public keys given as PEM files (known independently of the token). Prints one JSON
object: ``signatures``, ``valid``, ``invalid``, ``errors`` (count), ``error_samples``,
``seconds``, ``per_second``. Exit status 0 whenever the process survives.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature


def _signing_input(thread: int, index: int) -> bytes:
    return (
        f"eyJhbGciOiJYIn0.{thread}-{index}-".encode()
        + hashlib.sha256(f"{thread}/{index}".encode()).hexdigest().encode()
    )


def _signers_backend(args: argparse.Namespace):
    from helseid_signer.algorithms import ALGORITHMS
    from helseid_signer.backends.pkcs11 import Pkcs11Backend

    backend = Pkcs11Backend(args.module, pin_file=args.pin_file)
    rsa_key = backend.resolve(f"pkcs11:token={args.token};object={args.rsa_label}")
    ec_key = backend.resolve(f"pkcs11:token={args.token};object={args.ec_label}")
    rs256, es256 = ALGORITHMS["RS256"], ALGORITHMS["ES256"]

    def make(_thread: int):
        def sign(kind: str, data: bytes) -> bytes:
            if kind == "RS256":
                return backend.sign(rsa_key, rs256, data)
            return backend.sign(ec_key, es256, data)

        return sign

    return make


def _signers_raw(args: argparse.Namespace):
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass

    lib = pkcs11.lib(args.module)
    token = lib.get_token(token_label=args.token)
    pin = Path(args.pin_file).read_text().rstrip("\r\n")
    token.open(user_pin=pin, rw=True)  # logs the token in; kept open (a close would log out)

    def make(_thread: int):
        session = token.open(rw=True)  # one session per thread: the sessions are not shared
        rsa_key = session.get_key(ObjectClass.PRIVATE_KEY, label=args.rsa_label)
        ec_key = session.get_key(ObjectClass.PRIVATE_KEY, label=args.ec_label)

        def sign(kind: str, data: bytes) -> bytes:
            if kind == "RS256":
                return rsa_key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
            return ec_key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA)

        return sign

    return make


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["backend", "raw"])
    parser.add_argument("--module", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--pin-file", required=True)
    parser.add_argument("--rsa-label", required=True)
    parser.add_argument("--rsa-pem", required=True)
    parser.add_argument("--ec-label", required=True)
    parser.add_argument("--ec-pem", required=True)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--per-thread", type=int, default=200)
    args = parser.parse_args()

    rsa_pub = serialization.load_pem_public_key(Path(args.rsa_pem).read_bytes())
    ec_pub = serialization.load_pem_public_key(Path(args.ec_pem).read_bytes())
    make = _signers_backend(args) if args.mode == "backend" else _signers_raw(args)

    results: list[tuple[str, bytes, bytes]] = []
    errors: list[str] = []
    guard = threading.Lock()
    start = threading.Barrier(args.threads)

    # Sessions and key handles are set up one thread at a time, before any thread runs:
    # only signing is concurrent.
    signers = [make(thread) for thread in range(args.threads)]

    def work(thread: int) -> None:
        local: list[tuple[str, bytes, bytes]] = []
        try:
            sign = signers[thread]
            start.wait()
            for index in range(args.per_thread):
                kind = "RS256" if (thread + index) % 2 == 0 else "ES256"
                data = _signing_input(thread, index)
                local.append((kind, data, bytes(sign(kind, data))))
        except BaseException as exc:  # noqa: BLE001 - every failure is data here
            with guard:
                errors.append(f"thread {thread}: {type(exc).__name__}: {exc}")
            if start.n_waiting:
                start.abort()
        with guard:
            results.extend(local)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(args.threads)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began

    valid = invalid = 0
    for kind, data, signature in results:
        try:
            if kind == "RS256":
                rsa_pub.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            else:
                if len(signature) != 64:
                    raise InvalidSignature(f"{len(signature)}-byte ES256 signature")
                der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
                ec_pub.verify(der, data, ec.ECDSA(hashes.SHA256()))
            valid += 1
        except InvalidSignature:
            invalid += 1
    print(
        json.dumps(
            {
                "signatures": len(results),
                "valid": valid,
                "invalid": invalid,
                "errors": len(errors),
                "error_samples": errors[:5],
                "seconds": round(seconds, 3),
                "per_second": round(len(results) / seconds) if seconds else None,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
