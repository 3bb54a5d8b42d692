"""``helseid-signer check --config FILE``: is this configuration ready for production?

In order, each step printing one line per finding (``ok:``, ``info:``, ``warning:`` or
``error:`` and what it is about) and a summary at the end:

1. the file validates (otherwise the message names the key, exit 2), and what start-up
   needs from the host is there (:func:`preflight.startup_problems`: the TLS files load,
   the key matches the certificate, ``client_ca`` holds CA certificates, the audit and
   socket folders exist and are writable; otherwise one error per fault naming the key,
   and exit 2 at the end - the same checks ``serve`` runs before it starts);
2. every key resolves in its backend and fits its ``alg`` (RSA >= 2048 bits; ES256/384/512
   on P-256/384/521) - the same checks the service makes at start-up;
3. per profile, a test client assertion (also one with the rotation's next key, if any)
   and a test DPoP proof are built and signed through the service's own path
   (the signing core, :func:`signing.client_assertion` / :func:`signing.dpop_proof`,
   :func:`signing.sign`) and verified here
   with ``cryptography`` alone: the signature, the header (``alg``, ``typ``, ``kid`` as an
   RFC 7638 thumbprint computed here, the public-only ``jwk``) and the claims;
4. each issuer's discovery document, when reachable (unreachable is a warning): its
   ``issuer`` and ``token_endpoint`` must equal the profile's, and its HTTP ``Date`` must
   be within 5 s of the local clock (a warning otherwise);
5. risky settings: plaintext listener, a Unix socket others may use, reflection, assertion
   lifetimes over 30 s, one key for both assertions and proofs, one key (current, next or
   previous) for two issuers, audit ``on_failure = continue``, a caller's burst too small
   for a token fetch and an API call (:data:`COLD_START_CALLS`), a rotation's next key
   without a registration record (warnings); a caller without a rate limit (info).

Exit status: 0 without errors (warnings allowed), 1 with errors, 2 when the file is invalid
or start-up would refuse it.
Never prints a PIN, a private key or a JWS: keys appear as ``kid`` and ``alg`` only.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from . import signing
from .backends.base import CustodyReporter
from .config import (
    ConfigError,
    ProfileSettings,
    Settings,
    is_loopback_host,
    load_settings,
    parse_listen,
)
from .htu import HtuPolicy, canonical_htu
from .identity import socket_directory_problem
from .keys import ASSERTION_TYP, DPOP_TYP, SigningKey, build_backends, make_signing_key
from .preflight import startup_problems
from .rotation import RegistrationBook

#: Above this an assertion lifetime draws a warning (HelseID allows 60 s; NHN uses 5-10 s).
LONG_ASSERTION_LIFETIME = 30
#: Above this the issuer's clock (HTTP ``Date``) differs too much from ours.
MAX_CLOCK_SKEW = 5.0
#: Seconds a test signature may take.
SIGN_TIMEOUT = 15.0
LEVELS = ("ok", "info", "warning", "error")
#: Signer calls of one HelseID token fetch by the client library (token.py): GetClientProfile
#: (once per TokenClient), a client assertion and a DPoP proof, and - since HelseID answers
#: the first request with ``use_dpop_nonce`` - a new assertion and proof with the nonce.
TOKEN_FETCH_CALLS = 5
#: Signer calls of one API call (dpop.py): a DPoP proof, and one more when the resource
#: server answers with a nonce challenge.
API_CALL_CALLS = 2
#: A process's first API call: a token fetch and the call. A smaller burst refuses it.
COLD_START_CALLS = TOKEN_FETCH_CALLS + API_CALL_CALLS


@dataclass
class Report:
    """The findings so far; :meth:`add` prints each one as it is made."""

    out: TextIO
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LEVELS, 0))

    def add(self, level: str, what: str) -> None:
        self.counts[level] += 1
        print(f"{level}: {what}", file=self.out, flush=True)

    def ok(self, what: str) -> None:
        self.add("ok", what)

    def info(self, what: str) -> None:
        self.add("info", what)

    def warning(self, what: str) -> None:
        self.add("warning", what)

    def error(self, what: str) -> None:
        self.add("error", what)

    def summary(self) -> str:
        c = self.counts
        verdict = "FAILED" if c["error"] else "passed"
        return f"check {verdict}: {c['ok']} ok, {c['info']} info, {c['warning']} warning(s), {c['error']} error(s)"


# ---------------------------------------------------------------- independent JOSE verification
# Written here from RFC 7515/7518/7638 with ``cryptography`` only, so that a fault in the
# product's JOSE code cannot make its own test signature look right.

#: alg -> (family, hash, EC coordinate bytes)
_JWS: dict[str, tuple[str, type[hashes.HashAlgorithm], int]] = {
    "RS256": ("pkcs1", hashes.SHA256, 0),
    "RS384": ("pkcs1", hashes.SHA384, 0),
    "RS512": ("pkcs1", hashes.SHA512, 0),
    "PS256": ("pss", hashes.SHA256, 0),
    "PS384": ("pss", hashes.SHA384, 0),
    "PS512": ("pss", hashes.SHA512, 0),
    "ES256": ("ec", hashes.SHA256, 32),
    "ES384": ("ec", hashes.SHA384, 48),
    "ES512": ("ec", hashes.SHA512, 66),
}
_CURVES = {"P-256": (ec.SECP256R1, 32), "P-384": (ec.SECP384R1, 48), "P-521": (ec.SECP521R1, 66)}
_PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


class VerifyError(Exception):
    """The test JWS is wrong; the message says how."""


def _b64d(text: str) -> bytes:
    if not text or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in text):
        raise VerifyError("a segment is not base64url without padding")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _uint(value: int, size: int = 0) -> str:
    return _b64e(value.to_bytes(size or max(1, (value.bit_length() + 7) // 8), "big"))


def rfc7638_thumbprint(public_key: Any) -> str:
    """RFC 7638 SHA-256 thumbprint of a public key: required members, sorted, no spaces."""
    if isinstance(public_key, rsa.RSAPublicKey):
        n = public_key.public_numbers()
        members = {"e": _uint(n.e), "kty": "RSA", "n": _uint(n.n)}
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        crv, size = next((c, s) for c, (cls, s) in _CURVES.items() if isinstance(public_key.curve, cls))
        n = public_key.public_numbers()
        members = {"crv": crv, "kty": "EC", "x": _uint(n.x, size), "y": _uint(n.y, size)}
    else:
        raise VerifyError(f"unsupported key type {type(public_key).__name__}")
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return _b64e(hashlib.sha256(canonical).digest())


def _key_from_jwk(jwk: dict[str, Any]) -> Any:
    if _PRIVATE_MEMBERS & set(jwk):
        raise VerifyError("the jwk header carries private key members")
    try:
        if jwk.get("kty") == "RSA":
            e, n = (int.from_bytes(_b64d(jwk[m]), "big") for m in ("e", "n"))
            return rsa.RSAPublicNumbers(e, n).public_key()
        if jwk.get("kty") == "EC":
            curve, size = _CURVES[jwk["crv"]]
            x, y = (_b64d(jwk[m]) for m in ("x", "y"))
            if len(x) != size or len(y) != size:
                raise VerifyError("EC jwk coordinates are not full width")
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve()
            ).public_key()
    except (KeyError, ValueError) as exc:
        raise VerifyError(f"the jwk header is not a usable public key: {exc}") from None
    raise VerifyError(f"the jwk header has kty {jwk.get('kty')!r}")


def _same_key(a: Any, b: Any) -> bool:
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(*der) == b.public_bytes(*der)


def verify_jws(token: str, public_key: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify a compact JWS with ``public_key``; return (header, claims). VerifyError otherwise."""
    parts = token.split(".")
    if len(parts) != 3:
        raise VerifyError("not a compact JWS of three segments")
    try:
        header, claims = json.loads(_b64d(parts[0])), json.loads(_b64d(parts[1]))
    except ValueError as exc:
        raise VerifyError(f"header or payload is not JSON: {exc}") from None
    signature = _b64d(parts[2])
    if header.get("alg") not in _JWS:
        raise VerifyError(f"alg {header.get('alg')!r} is not one HelseID accepts")
    family, hash_class, size = _JWS[header["alg"]]
    data = f"{parts[0]}.{parts[1]}".encode("ascii")
    try:
        if family == "ec":
            if not isinstance(public_key, ec.EllipticCurvePublicKey) or len(signature) != 2 * size:
                raise VerifyError(f"{header['alg']} signature is {len(signature)} bytes, not R || S of {2 * size}")
            r, s = int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            public_key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hash_class()))
        else:
            if not isinstance(public_key, rsa.RSAPublicKey) or len(signature) != (public_key.key_size + 7) // 8:
                raise VerifyError(f"{header['alg']} signature is not modulus-sized")
            pad = (
                padding.PSS(mgf=padding.MGF1(hash_class()), salt_length=hash_class.digest_size)
                if family == "pss"
                else padding.PKCS1v15()
            )
            public_key.verify(signature, data, pad, hash_class())
    except InvalidSignature:
        raise VerifyError(f"the {header['alg']} signature does not verify") from None
    return header, claims


# ---------------------------------------------------------------- the steps


def _describe(public_key: Any) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size} bits"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "EC " + next((c for c, (cls, _) in _CURVES.items() if isinstance(public_key.curve, cls)), "?")
    return type(public_key).__name__


def check_keys(settings: Settings, report: Report) -> tuple[dict[str, SigningKey], list[Any]]:
    """Resolve every key in its backend and check it fits its alg. Returns the keys that
    did, and the backends to close."""
    keys: dict[str, SigningKey] = {}
    backends: list[Any] = []
    by_scheme: dict[str, list[str]] = {}
    for name, key in settings.keys.items():
        by_scheme.setdefault(key.uri.partition(":")[0], []).append(name)
    for scheme, names in by_scheme.items():
        subset = settings.model_copy(update={"keys": {n: settings.keys[n] for n in names}})
        try:
            backend = build_backends(subset)[scheme]
        except Exception as exc:
            for name in names:
                report.error(f"keys.{name}: backend {scheme!r} is not usable: {exc}")
            continue
        backends.append(backend)
        for name in names:
            configured = settings.keys[name]
            try:
                resolved = backend.resolve(configured.uri)
            except Exception as exc:
                report.error(f"keys.{name}: cannot resolve {configured.uri}: {exc}")
                continue
            try:
                key = make_signing_key(name, configured.alg, backend, resolved)
            except Exception as exc:
                report.error(f"keys.{name}: {_describe(resolved.public_key)} does not fit alg {configured.alg}: {exc}")
                continue
            keys[name] = key
            report.ok(
                f"keys.{name}: {_describe(resolved.public_key)} fits {key.alg.name} "
                f"(kid {key.kid}, version {resolved.version})"
            )
            if isinstance(backend, CustodyReporter) and (custody := backend.custody_warning(resolved)):
                report.warning(f"keys.{name}: {custody}")
    return keys, backends


def _test_organization_numbers(p: ProfileSettings) -> tuple[str, str]:
    """(parent, child) naming the first allowed organisation number, so that path is signed too."""
    if not p.allowed_organization_numbers:
        return "", ""
    first = p.allowed_organization_numbers[0]
    return ("", first) if p.tenancy == "single" else (first, "")


def _test_profile(name: str, p: ProfileSettings, key: SigningKey) -> signing.Profile:
    """The profile as the service holds it, with ``key`` as the key under test (in both
    roles: each test signs only one JWT)."""
    return signing.Profile.with_keys(
        name, p, key, key, HtuPolicy.from_settings(p.effective_token_endpoint, p.api_base_urls)
    )


def _check_assertion(name: str, p: ProfileSettings, key: SigningKey, now: int) -> str:
    parent, child = _test_organization_numbers(p)
    signable = signing.client_assertion(_test_profile(name, p, key), parent, child, now, {})
    token = signing.sign(signable, time.monotonic() + SIGN_TIMEOUT)
    jti = signable.jti
    header, got = verify_jws(token, key.resolved.public_key)
    expected_header = {"alg": key.alg.name, "typ": ASSERTION_TYP, "kid": rfc7638_thumbprint(key.resolved.public_key)}
    if header != expected_header:
        raise VerifyError(f"header {header} is not {expected_header}")
    problems = [
        f"{claim} is {got.get(claim)!r}, not {want!r}"
        for claim, want in (("iss", p.client_id), ("sub", p.client_id), ("aud", p.issuer), ("jti", jti))
        if got.get(claim) != want
    ]
    times = [got.get(c) for c in ("iat", "nbf", "exp")]
    if not all(type(t) is int for t in times) or times[0] != times[1] or not 0 < times[2] - times[0] <= 60:
        problems.append(f"iat/nbf/exp {times} are not integers with exp at most 60 s after iat")
    if problems:
        raise VerifyError("; ".join(problems))
    return f"kid {header['kid']}, {header['alg']}, exp - iat = {times[2] - times[0]} s"


def _check_proof(name: str, p: ProfileSettings, key: SigningKey, now: int) -> str:
    htu = canonical_htu(p.effective_token_endpoint)
    signable = signing.dpop_proof(_test_profile(name, p, key), "POST", p.effective_token_endpoint, "", b"", now, {})
    token = signing.sign(signable, time.monotonic() + SIGN_TIMEOUT)
    header = json.loads(_b64d(token.split(".")[0]))
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise VerifyError("the proof header has no jwk")
    header_key = _key_from_jwk(jwk)
    if not _same_key(header_key, key.resolved.public_key):
        raise VerifyError("the jwk header is not the DPoP key's public key")
    header, got = verify_jws(token, header_key)
    if header.get("typ") != DPOP_TYP or header.get("alg") != key.alg.name:
        raise VerifyError(f"typ/alg are {header.get('typ')!r}/{header.get('alg')!r}")
    if (got.get("htm"), got.get("htu")) != ("POST", htu) or type(got.get("iat")) is not int:
        raise VerifyError(f"htm/htu/iat are {got.get('htm')!r}/{got.get('htu')!r}/{got.get('iat')!r}")
    return f"jkt {rfc7638_thumbprint(header_key)}, {header['alg']}"


def check_profiles(settings: Settings, keys: dict[str, SigningKey], report: Report, clock: Callable[[], float]) -> None:
    """Per profile: sign a test assertion and a test proof and verify both here; also a test
    assertion with the rotation's next key, which will sign once it is current."""
    for name, p in settings.profiles.items():
        roles = [("test client assertion", p.assertion_key), ("test DPoP proof", p.dpop_key)]
        if p.rotation.next_key is not None:
            roles.append(("test client assertion (rotation.next_key)", p.rotation.next_key))
        for what, key_name in roles:
            key = keys.get(key_name)
            if key is None:
                report.error(f"profiles.{name}: no {what}: keys.{key_name} is not usable (see above)")
                continue
            now = int(clock())
            try:
                check = _check_proof if what == "test DPoP proof" else _check_assertion
                detail = check(name, p, key, now)
            except VerifyError as exc:
                report.error(f"profiles.{name}: {what} signed with keys.{key_name} does not verify: {exc}")
            except Exception as exc:
                report.error(f"profiles.{name}: signing a {what} with keys.{key_name} failed: {exc}")
            else:
                report.ok(f"profiles.{name}: {what} signed with keys.{key_name} and verified ({detail})")


def discovery_url(issuer: str) -> str:
    """``{issuer}/.well-known/openid-configuration``, as the client library builds it."""
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def check_discovery(settings: Settings, report: Report, timeout: float, clock: Callable[[], float]) -> None:
    """Per issuer: fetch discovery; compare issuer, token endpoint and clock with ours."""
    import httpx

    by_issuer: dict[str, list[str]] = {}
    for name, p in settings.profiles.items():
        by_issuer.setdefault(p.issuer, []).append(name)
    for issuer, names in by_issuer.items():
        url = discovery_url(issuer)
        # Loopback issuers (development, tests) never go through a proxy from the environment.
        trust_env = not is_loopback_host(urlsplit(url).hostname)
        try:
            with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=trust_env) as http:
                before = clock()
                response = http.get(url, headers={"Accept": "application/json"})
                after = clock()
        except httpx.HTTPError as exc:
            report.warning(
                f"issuer {issuer}: discovery not reachable ({type(exc).__name__}: {exc}); "
                "token endpoint and clock not compared"
            )
            continue
        if response.status_code != 200:
            message = f"issuer {issuer}: {url} answered HTTP {response.status_code}, not a discovery document"
            (report.warning if response.status_code >= 500 else report.error)(message)
            continue
        try:
            document = response.json()
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            report.error(f"issuer {issuer}: discovery document is not a JSON object ({exc})")
            continue
        for name in names:
            p = settings.profiles[name]
            if document.get("issuer") == p.issuer:
                report.ok(f"profiles.{name}.issuer: equals discovery's issuer")
            else:
                report.error(
                    f"profiles.{name}.issuer: {p.issuer!r} differs from discovery's issuer {document.get('issuer')!r}"
                )
            endpoint = p.effective_token_endpoint
            if document.get("token_endpoint") == endpoint:
                report.ok(f"profiles.{name}.token_endpoint: {endpoint} equals discovery's")
            else:
                report.error(
                    f"profiles.{name}.token_endpoint: {endpoint!r} differs from discovery's token_endpoint "
                    f"{document.get('token_endpoint')!r}"
                )
        _check_clock(issuer, response.headers.get("date"), (before + after) / 2, report)


def _check_clock(issuer: str, date: str | None, local: float, report: Report) -> None:
    if not date:
        report.warning(f"issuer {issuer}: no Date header; clock not compared")
        return
    try:
        server = email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        report.warning(f"issuer {issuer}: unreadable Date header {date[:64]!r}; clock not compared")
        return
    skew = server + 0.5 - local  # Date has whole seconds: the server's time lies in [Date, Date + 1)
    if abs(skew) > MAX_CLOCK_SKEW:
        report.warning(
            f"issuer {issuer}: its clock differs from the local clock by {skew:+.0f} s (over {MAX_CLOCK_SKEW:.0f} s): "
            "assertions and proofs may be refused; synchronise the clock (NTP)"
        )
    else:
        report.ok(f"issuer {issuer}: clock within {abs(skew):.1f} s of the local clock")


def check_settings(settings: Settings, keys: dict[str, SigningKey], report: Report) -> None:
    """Warnings for risky settings; info for callers without a rate limit."""
    server = settings.server
    if server.listen and server.insecure:
        who = (
            f"every request there is caller {server.insecure_caller!r}"
            if server.insecure_caller
            else "every request there may use EVERY profile"
        )
        report.warning(
            f"server.insecure: {server.listen} listens in plaintext without client certificates "
            f"(development only); {who}"
        )
    if server.reflection:
        report.warning("server.reflection: on; anyone who can connect can list the service's methods")
    if settings.metrics and not is_loopback_host(parse_listen(settings.metrics.listen)[0]):
        report.warning(
            f"metrics.listen: {settings.metrics.listen} is not loopback; admit only monitoring to it "
            "(a network policy), anyone who reaches it reads the service's counters"
        )
    if server.max_concurrent_rpcs is not None:
        report.warning(
            f"server.max_concurrent_rpcs: {server.max_concurrent_rpcs} is counted before callers are identified: "
            "a peer that fills it refuses every caller (callers.*.max_in_flight limits each caller instead)"
        )
    for name, caller in settings.callers.items():
        sock = caller.unix_socket
        if sock is not None:
            try:
                problem = socket_directory_problem(sock.path)
            except OSError as exc:
                problem = f"cannot read its directory: {exc.strerror or exc}"
            if problem:
                report.error(f"callers.{name}.unix_socket.path: {problem} (serve refuses it)")
        if sock is not None and sock.mode & 0o007:
            report.warning(
                f"callers.{name}.unix_socket.mode: {sock.mode:#o} lets other users connect as this caller "
                "(use 0660 or tighter)"
            )
        if caller.rate_limit is None:
            report.info(f"callers.{name}: no rate_limit")
        else:
            burst = caller.rate_burst or max(1, int(caller.rate_limit))
            if burst < COLD_START_CALLS:
                report.warning(
                    f"callers.{name}.rate_burst: {burst} cannot cover a first API call: one token fetch is up to "
                    f"{TOKEN_FETCH_CALLS} signer calls and the API call up to {API_CALL_CALLS} more; set rate_burst to "
                    f"at least {COLD_START_CALLS} per application process using this caller (docs/configuration.md)"
                )
    if settings.audit.on_failure == "continue":
        report.warning("audit.on_failure: continue signs without an audit record when the audit sink fails")
    for warning in settings.backends.warnings():
        report.warning(warning)
    # A key is the same key under two names if its thumbprint is (otherwise compare names).
    identity = {name: keys[name].kid if name in keys else f"name:{name}" for name in settings.keys}
    issuers_of: dict[str, set[str]] = {}
    names_of: dict[str, set[str]] = {}
    for name, p in settings.profiles.items():
        if p.assertion_lifetime > LONG_ASSERTION_LIFETIME:
            report.warning(
                f"profiles.{name}.assertion_lifetime: {p.assertion_lifetime} s is long "
                f"(over {LONG_ASSERTION_LIFETIME} s; HelseID allows 60, NHN's libraries use 5-10)"
            )
        if identity[p.assertion_key] == identity[p.dpop_key]:
            same = p.assertion_key if p.assertion_key == p.dpop_key else f"{p.assertion_key} and {p.dpop_key}"
            report.warning(
                f"profiles.{name}: one key (keys.{same}) signs both client assertions and DPoP proofs; "
                "separate keys limit what one leak reaches"
            )
        for key_name in (p.assertion_key, p.dpop_key, p.rotation.next_key, p.rotation.previous_key):
            if key_name is None:
                continue
            issuers_of.setdefault(identity[key_name], set()).add(p.issuer)
            names_of.setdefault(identity[key_name], set()).add(key_name)
    for ident, issuers in issuers_of.items():
        if len(issuers) > 1:
            names = " = ".join(f"keys.{n}" for n in sorted(names_of[ident]))
            report.warning(
                f"{names}: one key signs for {len(issuers)} issuers ({', '.join(sorted(issuers))}); "
                "a test key must never sign for production (set keys.*.issuers)"
            )


def check_rotation(settings: Settings, keys: dict[str, SigningKey], report: Report, clock: Callable[[], float]) -> None:
    """Warn for each rotation whose next key has no registration record (``keys register``):
    at ``next_active_from`` the current key would go on signing and health would show
    ``rotation:PROFILE`` NOT_SERVING."""
    records_dir = settings.selfservice.records_dir if settings.selfservice else None
    book = RegistrationBook(records_dir)
    now = clock()
    for name, p in settings.profiles.items():
        rotation = p.rotation
        if rotation.next_key is None or rotation.next_active_from is None:
            continue
        key = keys.get(rotation.next_key)
        if key is None:
            continue  # already an error above
        when = rotation.next_active_from.isoformat().replace("+00:00", "Z")
        if book.is_registered(key.kid, now, p.client_id, p.issuer):
            report.ok(f"profiles.{name}.rotation.next_key: keys.{rotation.next_key} (kid {key.kid}) is registered")
        else:
            report.warning(
                f"profiles.{name}.rotation.next_key: keys.{rotation.next_key} (kid {key.kid}) has no registration "
                f"record in {records_dir} for this client: it will not take over at {when} (the current key "
                f"keeps signing); register it: helseid-signer keys register --config FILE --profile {name}"
            )


def run_check(
    config_path: str, timeout: float = 3.0, out: TextIO | None = None, clock: Callable[[], float] = time.time
) -> int:
    """Run every check on ``config_path``, print the findings and a summary to ``out``
    (stdout); return the exit status (0 no errors, 1 errors, 2 invalid configuration)."""
    report = Report(out or sys.stdout)
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        report.error(f"configuration: {exc}")
        print(report.summary(), file=report.out)
        return 2
    report.ok(
        f"configuration {config_path}: valid ({len(settings.keys)} key(s), {len(settings.profiles)} profile(s), "
        f"{len(settings.callers)} caller(s))"
    )
    problems = startup_problems(settings)
    for problem in problems:
        report.error(f"configuration: {problem}")
    if not problems:
        report.ok("start-up: TLS files, audit and socket folders are usable")
    keys, backends = check_keys(settings, report)
    try:
        check_profiles(settings, keys, report, clock)
    finally:
        for backend in backends:
            try:
                backend.close()
            except Exception as exc:  # closing is best effort; the findings stand
                report.info(f"closing backend {getattr(backend, 'scheme', '?')}: {exc}")
    check_discovery(settings, report, timeout, clock)
    check_settings(settings, keys, report)
    check_rotation(settings, keys, report, clock)
    print(report.summary(), file=report.out, flush=True)
    if problems:
        return 2
    return 1 if report.counts["error"] else 0
