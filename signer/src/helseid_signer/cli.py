"""``helseid-signer`` command line: serve, check, health, keys create|jwk|list|register, jwks, audit verify.

Exit codes: 0 success, 2 usage or configuration error (message on stderr naming the
key), 1 any other failure. Never prints a private key or a PIN.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from pathlib import Path

from pydantic import ValidationError

from .algorithms import AlgorithmError, get_algorithm
from .backends.base import KEY_SPECS, BackendError, KeyCreator, backend_class, scheme_of
from .config import BackendsSettings, ConfigError, load_settings
from .keys import KeyResolutionError, build_backends, resolve_keys
from .logs import capture_native_stderr, setup_logging


def _backend_for_create(args: argparse.Namespace):
    """The backend for ``keys create``: from the ``[backends]`` section of ``--config``, or
    from the command-line flags (PKCS#11: ``--module``/``--pin-*``), validated by the
    backend's own settings class; the cloud backends need none and use their SDKs' default
    credential chains (AWS: environment/profile/role; Azure: DefaultAzureCredential)."""
    scheme = scheme_of(args.uri)
    if args.config:
        try:
            data = tomllib.loads(Path(args.config).read_text())
            base = str(Path(args.config).resolve().parent)
            backends = BackendsSettings.model_validate(data.get("backends", {}), context={"base": base})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{args.config}: {exc}") from None
        except ValidationError as exc:
            raise ConfigError(f"{args.config}: backends: {exc}") from None
        options = backends.configured.get(scheme)
        if options is None:
            raise ConfigError(f"{args.config}: no [backends.{scheme}] section")
    else:
        flags = {"module": args.module, "pin_env": args.pin_env, "pin_file": args.pin_file}
        backend_settings = backend_class(scheme).Settings
        try:
            options = backend_settings.model_validate({k: v for k, v in flags.items() if v})
        except ValidationError as exc:
            raise ConfigError(
                f"keys create: give --config FILE, or the [backends.{scheme}] settings as flags "
                f"(pkcs11: --module PATH with --pin-env or --pin-file): {exc}"
            ) from None
    return backend_class(scheme)(**options.model_dump())


def _check_spec_fits(alg_name: str, spec: str) -> None:
    """Refuse ``--alg`` that cannot fit a key of ``--spec`` before the key is created
    (a refused key would otherwise stay behind in the token). AlgorithmError otherwise."""
    alg = get_algorithm(alg_name)
    kind, _, size = spec.partition("-")
    if alg.kty.value != kind:
        raise AlgorithmError(f"alg {alg.name} needs an {alg.kty.value} key, --spec {spec} is {kind}")
    if alg.curve is not None and alg.curve.name != f"P-{size[1:]}":
        raise AlgorithmError(f"alg {alg.name} needs curve {alg.curve.name}, --spec {spec} is not")


def cmd_serve(args: argparse.Namespace) -> int:
    """Start-up's checks first (the same as ``check``'s: :func:`preflight.startup_problems`);
    a configuration fault is one JSON log line naming the key and exit status 2 (a systemd
    unit with ``RestartPreventExitStatus=2`` then does not restart), never a traceback."""
    from .preflight import startup_problems
    from .supervisor import run

    capture_native_stderr()  # gRPC core's own lines become JSON log lines too
    log = logging.getLogger("helseid_signer.server")
    try:
        settings = load_settings(args.config)
        problems = startup_problems(settings)
        for problem in problems:
            log.error("configuration error: %s", problem)
        if problems:
            return 2
        run(settings, ready_file=args.ready_file, config_path=args.config)
    except (ConfigError, KeyResolutionError, BackendError, ValueError) as exc:
        log.error("configuration error: %s", exc)
        return 2
    return 0


def _health_target(args: argparse.Namespace) -> tuple[str, object | None]:
    """Where ``health`` asks: ``--target`` (with ``--ca-file``/``--cert-file``/``--key-file``
    for mTLS), else a caller Unix socket of ``--config`` (a probe caller's, without
    profiles, first), else its plaintext development listener. ConfigError when none."""
    import grpc

    if args.target:
        tls = [args.ca_file, args.cert_file, args.key_file]
        if not any(tls):
            return args.target, None
        if not all(tls):
            raise ConfigError("health: mTLS needs --ca-file, --cert-file and --key-file together")
        try:
            ca, cert, key = (Path(p).read_bytes() for p in tls)
        except OSError as exc:
            raise ConfigError(f"health: cannot read {exc.filename}: {exc.strerror}") from None
        return args.target, grpc.ssl_channel_credentials(ca, key, cert)
    if not args.config:
        raise ConfigError("health: give --config FILE (its first caller Unix socket is asked) or --target")
    settings = load_settings(args.config)
    # A probe caller (no profiles) first: it can ask for health and nothing else.
    with_socket = [c for c in settings.callers.values() if c.unix_socket is not None]
    sockets = [c.unix_socket.path for c in sorted(with_socket, key=lambda c: bool(c.profiles))]
    if sockets:
        return f"unix:{sockets[0]}", None
    if settings.server.listen and settings.server.insecure:
        return settings.server.listen, None
    raise ConfigError(
        f"health: {args.config} has no caller Unix socket (add a probe caller with profiles = [] and a "
        "unix_socket, docs/operations.md) - or give --target with --ca-file/--cert-file/--key-file"
    )


def cmd_health(args: argparse.Namespace) -> int:
    """One ``grpc.health.v1.Health/Check`` call: exit 0 when the answer is SERVING, 1 for any
    other answer or none (unreachable, TLS refused, timeout), 2 for a usage error."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target, credentials = _health_target(args)
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        except grpc.RpcError as exc:
            status = f"{exc.code().name}: {exc.details()}"
    ok = status == "SERVING"
    print(f"{target} {args.service or '(overall)'}: {status}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_keys_create(args: argparse.Namespace) -> int:
    from .keys import make_signing_key

    if args.alg:
        _check_spec_fits(args.alg, args.spec)
    backend = _backend_for_create(args)
    if not isinstance(backend, KeyCreator):
        raise BackendError(f"backend {backend.scheme} cannot create keys")
    resolved = backend.create_key(args.uri, args.spec, alg=get_algorithm(args.alg) if args.alg else None)
    key = make_signing_key(args.uri, args.alg, backend, resolved) if args.alg else None
    from .jwt import public_jwk, thumbprint

    jwk = public_jwk(resolved.public_key)
    out = dict(jwk, kid=thumbprint(jwk))
    if key:
        out["alg"] = key.alg.name
    print(json.dumps({"uri": resolved.uri, "version": resolved.version, "jwk": out}, indent=2))
    return 0


def cmd_keys_jwk(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    names = [args.key] if args.key else list(settings.keys)
    for name in names:
        if name not in settings.keys:
            raise ConfigError(f"no [keys.{name}] in {args.config}")
    subset = settings.model_copy(update={"keys": {n: settings.keys[n] for n in names}})
    keys = resolve_keys(subset, build_backends(subset))
    jwks = [dict(k.jwk, kid=k.kid, alg=k.alg.name, use="sig") for k in keys.values()]
    print(json.dumps(jwks[0] if args.key else {"keys": jwks}, indent=2))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import run_check

    return run_check(args.config, timeout=args.timeout)


def cmd_keys_list(args: argparse.Namespace) -> int:
    from .register import format_key_list, list_keys

    entries = list_keys(load_settings(args.config))
    print(json.dumps(entries, indent=2) if args.json else format_key_list(entries))
    return 0


def cmd_jwks(args: argparse.Namespace) -> int:
    from .register import RegistrationRefused, profile_jwks

    try:
        print(json.dumps(profile_jwks(load_settings(args.config), args.profile), indent=2))
    except RegistrationRefused as exc:
        print(f"helseid-signer: error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_keys_register(args: argparse.Namespace) -> int:
    from .register import RegistrationRefused, RegistrationUsageError, register_manual, register_next_key

    settings = load_settings(args.config)
    try:
        if args.manual:
            if not args.expires:
                raise RegistrationUsageError("--manual needs --expires (the expiry the self-service portal shows)")
            result = register_manual(
                settings, args.profile, args.expires, key_name=args.key, records_dir=args.records_dir
            )
        else:
            if args.expires or args.key:
                raise RegistrationUsageError("--expires and --key go with --manual (the API answers the expiry itself)")
            result = register_next_key(settings, args.profile, records_dir=args.records_dir)
    except RegistrationRefused as exc:
        print(f"helseid-signer: keys register refused: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, RegistrationUsageError) else 1
    print(json.dumps(result, indent=2))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from .audit import Verification, verify_anchors, verify_lines

    result = Verification()
    for path in args.files:  # in order: a chain may continue from one (rotated) file to the next
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                verify_lines(f, result, source=path)
        except OSError as exc:
            print(f"helseid-signer: error: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    if args.service_log:
        lines: list[str] = []
        for path in args.service_log:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines += f.readlines()
            except OSError as exc:
                print(f"helseid-signer: error: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
                return 2
        anchors = verify_anchors(lines, result)
        print(f"service log: {anchors} chain anchor(s) from {len(args.service_log)} file(s)")
    print(f"{len(args.files)} file(s): {len(result.chains)} chain(s), {result.records} record(s), "
          f"{result.other_lines} other line(s)")  # fmt: skip
    for report in result.chains.values():
        verdict = "intact" if not report.problems else f"{len(report.problems)} problem(s)"
        span = f"{report.first_time} .. {report.last_time}"
        print(f"  chain {report.chain}: {report.records} record(s), {span}: {verdict}")
        for problem in report.problems:
            print(f"    {problem}")
    for problem in result.problems:
        print(f"  {problem}")
    if not result.records:
        print("  no audit records found")
    return 0 if result.ok else 1


def _seconds(text: str) -> float:
    """argparse type: a number of seconds from 0.1 to 60."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.1 <= value <= 60:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r}: give 0.1 to 60 seconds")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``helseid-signer`` command."""
    parser = argparse.ArgumentParser(prog="helseid-signer", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gRPC signing service")
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.add_argument("--ready-file", help="write the bound host:port here once serving")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "check",
        help="validate a configuration: keys, test signatures, discovery, clock, risky settings",
        description="Exit 0: no errors (warnings allowed); 1: errors; 2: invalid configuration.",
    )
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.add_argument(
        "--timeout", type=_seconds, default=3.0, help="seconds to wait for each discovery document (0.1 to 60)"
    )
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "health",
        help="ask a running service for its health status (grpc.health.v1 Check); for systemd hosts and scripts",
        description="Exit 0: SERVING; 1: NOT_SERVING, no answer, or refused; 2: usage error. Asks --target, or "
        "else a caller Unix socket in --config (a probe caller's, with profiles = [], first), "
        "else its plaintext development listener (insecure = true).",
    )
    p.add_argument("--config", help="TOML configuration file: ask a caller Unix socket of it")
    p.add_argument("--target", help="gRPC target instead: unix:/run/helseid-signer/probe.sock or host:port")
    p.add_argument("--ca-file", help="with a host:port --target: the CA of the service's certificate (PEM)")
    p.add_argument("--cert-file", help="with a host:port --target: a client certificate the service accepts (PEM)")
    p.add_argument("--key-file", help="with a host:port --target: that certificate's private key (PEM)")
    p.add_argument("--service", default="", help='health service name (default "": the overall status), '
                   'e.g. backend:pkcs11 or rotation:PROFILE')  # fmt: skip
    p.add_argument("--timeout", type=_seconds, default=3.0, help="seconds to wait for the answer (0.1 to 60)")
    p.set_defaults(func=cmd_health)

    keys = sub.add_parser("keys", help="key lifecycle").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("create", help="create a non-exportable signing key and print its public JWK")
    p.add_argument("--uri", required=True, help="key reference: pkcs11:token=T;object=my-key, awskms:alias/my-key")
    p.add_argument("--spec", required=True, choices=KEY_SPECS)
    p.add_argument("--alg", help="check the new key fits this JWS alg and add it to the JWK")
    p.add_argument("--config", help="take backend settings from this TOML file's [backends] section")
    p.add_argument("--module", help="PKCS#11 module path (without --config)")
    p.add_argument("--pin-env", help="environment variable holding the PKCS#11 user PIN")
    p.add_argument("--pin-file", help="file holding the PKCS#11 user PIN")
    p.set_defaults(func=cmd_keys_create)

    p = keys.add_parser("jwk", help="print the public JWK of a configured key (or the JWKS of all)")
    p.add_argument("--config", required=True)
    p.add_argument("--key", help="the [keys.NAME] to print; all keys as a JWKS when omitted")
    p.set_defaults(func=cmd_keys_jwk)

    p = keys.add_parser(
        "list",
        help="every configured key: kid, backend version, which profiles use it and how, HelseID registration",
    )
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_keys_list)

    p = keys.add_parser(
        "register",
        help="register a profile's NEXT assertion key with HelseID (self-service API) and record its expiry",
        description="Uploads the NEXT key's public JWK to {selfservice.url}/v1/client-secret with a DPoP-bound "
        "token this command gets with the CURRENT key, and writes the registration record the service needs "
        "before the key may sign. --manual records a key uploaded by hand in the self-service portal. "
        "Exit 0: registered; 1: refused (reason on stderr); 2: configuration error.",
    )
    p.add_argument("--config", required=True)
    p.add_argument("--profile", required=True)
    p.add_argument("--manual", action="store_true", help="the key was uploaded by hand: only write the record")
    p.add_argument("--expires", help="with --manual: HelseID's expiry of the key, e.g. 2027-11-29T00:00:00Z")
    p.add_argument("--key", help="with --manual: the profile's current or next assertion key (default: next)")
    p.add_argument(
        "--records-dir",
        help="write the record here instead of [selfservice] records_dir (when that is a read-only mount; "
        "then copy the file to every replica's records_dir)",
    )
    p.set_defaults(func=cmd_keys_register)

    p = sub.add_parser(
        "jwks",
        help="the JWK Set HelseID should have for a profile: CURRENT, NEXT and PREVIOUS assertion keys, "
        "as GetKeySet publishes them now",
    )
    p.add_argument("--config", required=True)
    p.add_argument("--profile", required=True)
    p.set_defaults(func=cmd_jwks)

    audit = sub.add_parser("audit", help="audit trail tools").add_subparsers(dest="audit_command", required=True)
    p = audit.add_parser(
        "verify",
        help="check the hash chains of audit record files (edited, removed, inserted or reordered records)",
        description="Files are read in the order given, so a chain may continue across rotated files "
        "(audit.jsonl.1 audit.jsonl). Exit 0: every chain intact; 1: a problem (each printed with its file and "
        "line; an edited record shows at the line after it) or no record at all; 2: a file cannot be read. "
        "Without --service-log, an edit to a chain's last record, or removing its last records, or removing "
        "or inserting a whole chain, goes unnoticed; with it, each chain must be announced in the service log "
        "and end where the log says. Ship records and the log off the host as they are written.",
    )
    p.add_argument("files", nargs="+", help="audit files (JSON lines; log lines among them are skipped)")
    p.add_argument(
        "--service-log", action="append", metavar="FILE",
        help="the signer's JSON log of the same period (repeatable): its audit chain anchors are checked",
    )  # fmt: skip
    p.set_defaults(func=cmd_audit_verify)

    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return args.func(args)
    except (ConfigError, KeyResolutionError, BackendError, ValueError) as exc:
        print(f"helseid-signer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
