"""Property-based fuzzing of the real signer process through gRPC (issue 6, item 5).

A real ``helseid-signer serve`` process on SoftHSM gets malformed and hostile requests
on every RPC: arbitrary (also huge) unicode in every string field, arbitrary bytes as
``access_token_sha256``, valid-looking but hostile ``htu`` values, and raw arbitrary bytes
as the serialized request, also near and over the 64 KiB message limit. Over 10,000
cases in all, the same ones every run (``derandomize``).

The property for each case: the call either succeeds - and then the JWS verifies with
jwcrypto against the public JWK printed by ``keys create``, and its claims obey the
profile's policy, checked by an oracle written here from the rules, not from the
product's code - or it fails with INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED
or RESOURCE_EXHAUSTED and a message that starts with a field name and ``:``. Never
UNKNOWN or INTERNAL, never a crash: after each test the process is alive and a valid
request still gets signed. A request over the server's 64 KiB limit is refused by gRPC
itself (RESOURCE_EXHAUSTED, "Received message larger than max"), before the service
sees it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jwcrypto import jwk, jws

from helseid_signer_client.proto import signer_pb2 as pb
from tests.support.jose_verify import verified as _verify
from tests.support.signer_process import start_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token

ISSUER = "https://127.0.0.1:4443"
TOKEN_ENDPOINT = ISSUER + "/connect/token"
CLIENT_ID = "fuzz-client"
ALLOWED_ORGS = ("123456789", "987654321")
LIFETIMES = {"single": 7, "multi": 10}
PROFILES = ("single", "multi", "other")  # the caller may use single and multi only
#: The API base URLs as configured, and canonical (what a signed htu must start with).
API_BASES = ("https://api.example.no/deft", "https://a.example", "https://[2001:db8::1]:8443/api")
CANONICAL_BASES = ("https://api.example.no/deft", "https://a.example/", "https://[2001:db8::1]:8443/api")
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
MAX_MESSAGE_BYTES = 64 * 1024  # the server's limit (server.MAX_MESSAGE_BYTES)
SERVICE = "/helseid.signer.v1.SignerService/"
RPCS = {
    "SignClientAssertion": (pb.SignClientAssertionRequest, pb.SignClientAssertionResponse),
    "SignDpopProof": (pb.SignDpopProofRequest, pb.SignDpopProofResponse),
    "GetClientProfile": (pb.GetClientProfileRequest, pb.GetClientProfileResponse),
    "GetKeySet": (pb.GetKeySetRequest, pb.GetKeySetResponse),
}
REFUSALS = {"INVALID_ARGUMENT", "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}
FIELDS = {
    "request", "caller", "profile", "child_organization_number", "parent_organization_number",
    "htm", "htu", "nonce", "access_token_sha256", "avoid_kid",
}  # fmt: skip
_FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def fuzz(test_name: str) -> settings:
    """The fuzz settings with the planned number of cases of ``test_name``."""
    return settings(_FUZZ, max_examples=PLANNED[test_name])


#: Cases run per test and outcomes, for the count check at the end and the report.
CASES: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()
PLANNED = {
    "test_assertion_fields": 2000,
    "test_dpop_proof_fields": 2000,
    "test_hostile_htu": 2500,
    "test_profile_rpcs": 1000,
    "test_raw_bytes": 2000,
    "test_raw_protobuf_records": 1000,
    "test_messages_near_the_limit": 60,  # each one over the limit costs gRPC ~0.2-0.4 s
}


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    """A real signer process (its Popen, to check it stays alive), one channel to it, and
    the public JWKs from ``keys create``."""
    folder = tmp_path_factory.mktemp("fuzz")
    token = create_token(folder / "token", label="fuzz")
    jwks = {
        "assertion": jwk.JWK(**keys_create(token, "assertion", "EC-P256", "ES256")),
        "dpop": jwk.JWK(**keys_create(token, "dpop", "RSA-2048", "PS256")),
    }
    orgs = "allowed_organization_numbers = [" + ", ".join(f'"{o}"' for o in ALLOWED_ORGS) + "]"
    config = write_config(
        folder / "signer.toml", token, issuer=ISSUER, client_id=CLIENT_ID,
        keys={"assertion": "ES256", "dpop": "PS256"},
        profiles={name: ("assertion", "dpop") for name in PROFILES},
        extra_profile_lines={"single": [orgs, "assertion_lifetime = 7"], "multi": [orgs, 'tenancy = "multi"']},
        api_base_urls=API_BASES,
        extra_lines=("[callers.app]", 'profiles = ["single", "multi"]', 'tls_names = ["dns:app.example"]',
                     "", "[audit]", 'sink = "file"', f'path = "{folder / "audit.jsonl"}"'),
    )  # fmt: skip
    config.write_text(config.read_text().replace("insecure = true", 'insecure = true\ninsecure_caller = "app"'))
    signer = start_signer(config, token.env())  # its log is <config>.log, where tests/zz_last looks for secrets
    try:
        with grpc.insecure_channel(signer.address) as channel:
            calls = {
                name: channel.unary_unary(
                    SERVICE + name, request_serializer=lambda b: b, response_deserializer=lambda b: b
                )
                for name in RPCS
            }
            yield {
                "proc": signer.proc,
                "address": signer.address,
                "calls": calls,
                "jwks": jwks,
                "log": signer.log,
            }
    finally:
        signer.stop()


@pytest.fixture(autouse=True)
def still_serving(signer):
    """After each test: the process is alive and a valid request still gets signed."""
    yield
    assert signer["proc"].poll() is None, signer["log"].read_text()[-3000:]
    ok = pb.SignDpopProofRequest(profile="single", htm="GET", htu="https://a.example/ok")
    answer = signer["calls"]["SignDpopProof"](ok.SerializeToString(), timeout=10)
    jwt = pb.SignDpopProofResponse.FromString(answer).jwt
    jws.JWS().deserialize(jwt, key=signer["jwks"]["dpop"])  # raises if the signature is wrong


# ---------------------------------------------------------------- the oracle


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def htu_allowed(htu: str) -> bool:
    """The policy, written from the issue's rules: the token endpoint, or a URL under one
    of the canonical bases (same origin, so no userinfo; base path then end or ``/``),
    ASCII without spaces, no query/fragment/backslash, no dot-segments (also
    percent-encoded, and ``..;x`` which Tomcat-style servers treat as ``..``, and names
    that are only dots and spaces, which Windows servers reduce to ``..``), no encoded
    slash, backslash, ``%``, ``;`` or control character, valid percent-encoding of UTF-8."""
    if htu == TOKEN_ENDPOINT:
        return True
    if not htu.isascii() or any(c <= " " or c in "\\?#\x7f" for c in htu):
        return False
    for base in CANONICAL_BASES:
        if htu == base or htu.startswith(base.rstrip("/") + "/"):
            path = htu[len(base.split("/", 3)[0]) + 2 :].partition("/")[2]
            if re.search(r"%(2f|5c|25|3b|[01][0-9a-f]|7f)|%(?![0-9a-f]{2})", path, re.I):
                return False
            try:
                names = [unquote(seg.partition(";")[0], errors="strict") for seg in path.split("/")]
            except UnicodeDecodeError:
                return False
            return not any(name and not name.rstrip(". ") for name in names)
    return False


def _check_success(rpc: str, request, raw_response: bytes, jwks: dict[str, jwk.JWK]) -> None:
    response = RPCS[rpc][1].FromString(raw_response)
    assert request.profile in ("single", "multi"), f"{request.profile!r} got an answer"
    if rpc == "SignClientAssertion":
        header, claims = _verify(response.jwt, jwks["assertion"])
        assert header == {"alg": "ES256", "typ": "client-authentication+jwt", "kid": jwks["assertion"].thumbprint()}
        assert claims["iss"] == claims["sub"] == CLIENT_ID and claims["aud"] == ISSUER
        assert claims["exp"] - claims["iat"] == LIFETIMES[request.profile] <= 60
        assert claims["iat"] == claims["nbf"] and abs(claims["iat"] - time.time()) < 10
        assert claims["jti"] == response.jti and len(response.jti) >= 22
        asked = [n for n in (request.parent_organization_number, request.child_organization_number) if n]
        assert all(n in ALLOWED_ORGS for n in asked)
        if asked:
            value = claims["assertion_details"]["practitioner_role"]["organization"]["identifier"]["value"]
            assert value == (asked[0] if request.profile == "single" else "NO:ORGNR:" + ":".join(asked))
        else:
            assert "assertion_details" not in claims
    elif rpc == "SignDpopProof":
        header, claims = _verify(response.jwt, jwks["dpop"])
        assert header["typ"] == "dpop+jwt" and header["alg"] == "PS256"
        assert header["jwk"] == {k: jwks["dpop"].export_public(as_dict=True)[k] for k in ("kty", "n", "e")}
        assert claims["htm"] == request.htm and claims["htm"] in METHODS
        assert htu_allowed(claims["htu"]) and claims["htu"] == response.htu, claims["htu"]
        assert claims.get("nonce") == (request.nonce or None)
        digest = request.access_token_sha256
        assert len(digest) in (0, 32)
        assert claims.get("ath") == (_b64url(digest) if digest else None)
        assert set(claims) <= {"jti", "htm", "htu", "iat", "nonce", "ath"}
    elif rpc == "GetClientProfile":
        assert (response.client_id, response.issuer, response.token_endpoint) == (CLIENT_ID, ISSUER, TOKEN_ENDPOINT)
        assert response.assertion_kid == jwks["assertion"].thumbprint()
        assert response.dpop_jkt == jwks["dpop"].thumbprint()
    else:
        assert [k["kid"] for k in json.loads(response.jwks_json)["keys"]] == [jwks["assertion"].thumbprint()]


def exercise(signer, rpc: str, request=None, raw: bytes | None = None) -> None:
    """Send ``request`` (a message) or ``raw`` bytes to ``rpc`` and check the property."""
    if raw is None:
        raw = request.SerializeToString()
    CASES[os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].split(" ")[0]] += 1  # "<file>::<test> (call)"
    try:
        answer = signer["calls"][rpc](raw, timeout=10)
    except grpc.RpcError as err:
        code, details = err.code().name, err.details() or ""
        OUTCOMES[code] += 1
        if len(raw) > MAX_MESSAGE_BYTES:
            assert code == "RESOURCE_EXHAUSTED" and "larger than max" in details, (code, details)
            return
        if code == "FAILED_PRECONDITION":  # avoid_kid naming the profile's only key, and nothing else
            assert details.startswith("avoid_kid: no other"), (code, details)
            return
        assert code in REFUSALS, (code, details, raw[:200])
        field = details.partition(":")[0]
        assert field in FIELDS and details.startswith(field + ": "), (code, details)
        return
    OUTCOMES["OK"] += 1
    assert len(raw) <= MAX_MESSAGE_BYTES
    if request is None:  # raw bytes that happened to parse: check what they parse to
        request = RPCS[rpc][0].FromString(raw)
    _check_success(rpc, request, answer, signer["jwks"])


# ---------------------------------------------------------------- strategies


def _fit(text: str, size: int) -> str:
    """``text`` cut to at most ``size`` UTF-8 bytes, at a character boundary."""
    return text.encode()[:size].decode(errors="ignore")


#: Huge strings (2-12 kB each, so that a request with five stays under the 64 KiB limit;
#: sizes at and over the limit are in test_messages_near_the_limit), cheap to generate.
huge_text = st.builds(lambda s, n: _fit(s * n, n), st.text(min_size=1, max_size=4), st.integers(2_000, 12_000))
any_text = st.one_of(st.text(), st.text(max_size=300), huge_text)


def mixed(valid: tuple, hostile: tuple):
    """Half valid values (so that the checks after the first one are reached and some
    requests get signed), then known-hostile ones, then arbitrary text."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(hostile), any_text)


profiles = mixed(("single", "multi"), ("other", "SINGLE", "single ", "../single", "", "x" * 65, "sin\x00gle"))
org_numbers = mixed(
    ("", *ALLOWED_ORGS), ("111111111", "12345678", "1234567890", "\uff11" * 9, "12345678\n", "12345678\u0669")
)
methods = mixed(METHODS, ("get", "Post", "", "GET ", "FETCH", "G\u0130T", "GET\x00"))
nonces = mixed(
    ("", "eyJ7S_zG.eyJH0-Z.HX4w-7v", "n" * 512, "!#[]~"), ("n" * 513, 'a"b', "a\\b", "a b", "\u00e9", "a\nb")
)
digests = st.one_of(st.binary(min_size=32, max_size=32), st.just(b""), st.binary(max_size=100))
proof_htus = mixed(
    ("https://a.example/x", TOKEN_ENDPOINT, "https://api.example.no/deft/files?SenderHerId=1", "HTTPS://A.EXAMPLE:443"),
    ("https://a.example.evil/", "https://api.example.no/deft/../x", "/deft", "https://api.example.no/deftx"),
)

hosts = st.sampled_from([
    "api.example.no", "API.EXAMPLE.NO", "a.example", "helseid-sts.test.nhn.no", "api.example.no.evil",
    "evil.example", "a.example.", "[2001:db8::1]", "[2001:DB8::1]", "[2001:db8:0::1]", "[::1]", "[fe80::1%25eth0]",
    "[2001:db8::1", "2001:db8::1", "[v1.x]", "127.0.0.1", "0x7f.1", "xn--bcher-kva.example", "bücher.example",
    "a.exa\u0301mple", "ａ.example", "a%2eexample", "",
])  # fmt: skip
ports = st.sampled_from(["", ":", ":443", ":80", ":0443", ":8443", ":0", ":65535", ":65536", ":99999", ":-1", ":x"])
userinfo = st.sampled_from(["", "", "", "user@", "u:p@", "api.example.no@", "%40@", "@"])
segments = st.one_of(
    st.sampled_from([
        "deft", "api", "x", "", ".", "..", "%2e", "%2E%2e", ".%2e", "%2f", "%2F", "%5c", "\\", "..;", ";",
        "deft-admin", "connect", "token", "%00", "%", "~", "a%2fb", "..%2f", "%252e%252e",
        "%3b", "...", "..%20", "%c0%ae", "x%zz",
    ]),
    st.text(max_size=8),
)  # fmt: skip


#: Characters a path segment may hold unencoded (RFC 3986 pchar without pct-encoded).
PCHARS = "ABCXYZabcxyz0189._~!$&'()*+,;=:@-"


@st.composite
def hostile_urls(draw) -> str:
    scheme = draw(st.sampled_from(["https", "HTTPS", "http", "ftp", "javascript", "", "https:", "hTTps"]))
    path = "/".join(draw(st.lists(segments, max_size=6)))
    tail = draw(st.sampled_from(["", "?q=1", "#frag", "?a=/../b", "#/../admin", "?"]))
    lead = draw(st.sampled_from(["/", "/", "//", "", "\\"]))
    return f"{scheme}://{draw(userinfo)}{draw(hosts)}{draw(ports)}{lead}{path}{tail}"


htus = st.one_of(
    hostile_urls(),
    st.sampled_from([TOKEN_ENDPOINT, TOKEN_ENDPOINT + "/", TOKEN_ENDPOINT + "?x", *API_BASES]),
    st.builds(lambda base, rest: base + rest, st.sampled_from([*API_BASES, TOKEN_ENDPOINT]), st.text(max_size=30)),
    st.builds(  # under a base with unreserved and percent-encoded characters: most get signed
        lambda base, parts: base + "/" + "/".join(parts),
        st.sampled_from(API_BASES),
        st.lists(st.text(PCHARS, max_size=8) | st.sampled_from(["%41", "%7e", "%C3%A6", "%00", "%2e"]), max_size=5),
    ),
    any_text,
)


# ---------------------------------------------------------------- the tests


#: ``avoid_kid``: none, the profile's own (only) key ("SELF"), kid-shaped strings, anything.
avoid_kids = st.sampled_from(["", "", "SELF"]) | st.text(B64URL, min_size=42, max_size=44) | st.text(max_size=50)


@fuzz("test_assertion_fields")
@given(profile=profiles, child=org_numbers, parent=org_numbers, avoid=avoid_kids)
def test_assertion_fields(signer, profile, child, parent, avoid):
    avoid = signer["jwks"]["assertion"].thumbprint() if avoid == "SELF" else avoid
    request = pb.SignClientAssertionRequest(
        profile=profile, child_organization_number=child, parent_organization_number=parent, avoid_kid=avoid
    )
    exercise(signer, "SignClientAssertion", request)


@fuzz("test_dpop_proof_fields")
@given(profile=profiles, htm=methods, htu=proof_htus, nonce=nonces, ath=digests)
def test_dpop_proof_fields(signer, profile, htm, htu, nonce, ath):
    request = pb.SignDpopProofRequest(profile=profile, htm=htm, htu=htu, nonce=nonce, access_token_sha256=ath)
    exercise(signer, "SignDpopProof", request)


@fuzz("test_hostile_htu")
@given(profile=st.sampled_from(["single", "multi"]), htm=st.sampled_from(METHODS), htu=htus)
@example(profile="single", htm="GET", htu="https://api.example.no/deft/..;/admin")  # path parameters on ..
@example(profile="single", htm="GET", htu="https://api.example.no/deft/.%2e;jsessionid=1/admin")
@example(profile="single", htm="GET", htu="https://a.example/.;x/y")
def test_hostile_htu(signer, profile, htm, htu):
    exercise(signer, "SignDpopProof", pb.SignDpopProofRequest(profile=profile, htm=htm, htu=htu))


@fuzz("test_profile_rpcs")
@given(rpc=st.sampled_from(["GetClientProfile", "GetKeySet"]), profile=profiles)
def test_profile_rpcs(signer, rpc, profile):
    exercise(signer, rpc, RPCS[rpc][0](profile=profile))


#: Large byte strings (1-60 kB, under the limit), cheap to generate: a short pattern repeated.
big_bytes = st.builds(lambda p, n: (p * n)[:n], st.binary(min_size=1, max_size=16), st.integers(1_000, 60_000))


@fuzz("test_raw_bytes")
@given(rpc=st.sampled_from(sorted(RPCS)), raw=st.one_of(st.binary(), st.binary(max_size=500), big_bytes))
def test_raw_bytes(signer, rpc, raw):
    exercise(signer, rpc, raw=raw)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


#: Wire-format records: (field number, wire type, payload). Known fields with good and bad
#: values, wrong wire types, unknown and huge field numbers, bad UTF-8, truncated lengths.
payloads = st.one_of(
    st.sampled_from([b"single", b"multi", b"GET", b"https://a.example/p", b"123456789", b"\xff\xfe", b"\xed\xa0\x80",
                     b"\xc0\xae", b"sin\x00gle", b"\x80" * 11, b""]),
    st.binary(max_size=64),
    st.text(max_size=16).map(str.encode),
)  # fmt: skip
records = st.tuples(st.one_of(st.integers(1, 6), st.integers(0, 2**29 - 1)), st.integers(0, 7), payloads, st.booleans())


def _encode(record: tuple[int, int, bytes, bool]) -> bytes:
    number, wire, payload, honest_length = record
    tag = _varint((number << 3) | wire)
    if wire == 2:  # length-delimited: a correct or a lying length
        return tag + _varint(len(payload) if honest_length else len(payload) + 7) + payload
    if wire == 0:
        return tag + (_varint(int.from_bytes(payload[:9] or b"\0", "big")) if honest_length else payload)
    return tag + payload


@fuzz("test_raw_protobuf_records")
@given(
    rpc=st.sampled_from(sorted(RPCS)),
    parts=st.lists(records, max_size=8),
    nesting=st.sampled_from([0, 0, 0, 1, 50, 101, 5000]),
)
def test_raw_protobuf_records(signer, rpc, parts, nesting):
    # ``nesting`` opens that many groups (wire type 3) of an unknown field first: parser depth.
    raw = b"\x3b" * nesting + b"".join(_encode(r) for r in parts) + b"\x3c" * nesting
    exercise(signer, rpc, raw=raw)


@st.composite
def near_the_limit(draw) -> tuple[str, bytes]:
    """A request whose serialized size is at, just under or just over the 64 KiB limit:
    one string field filled to the size, or raw bytes of that size."""
    size = draw(st.sampled_from([MAX_MESSAGE_BYTES - 1, MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES + 1])
                | st.integers(MAX_MESSAGE_BYTES - 300, MAX_MESSAGE_BYTES + 40))  # fmt: skip
    rpc = draw(st.sampled_from(sorted(RPCS)))
    if draw(st.booleans()):
        pattern = draw(st.binary(min_size=1, max_size=8))
        return rpc, (pattern * size)[:size]
    message = RPCS[rpc][0]
    field = draw(st.sampled_from([f.name for f in message.DESCRIPTOR.fields]))
    is_bytes = message.DESCRIPTOR.fields_by_name[field].type == message.DESCRIPTOR.fields_by_name[field].TYPE_BYTES
    base = message(profile="single") if field != "profile" else message()
    overhead = len(base.SerializeToString()) + 1 + 3  # tag, 3-byte length
    fill = size - overhead
    pattern = draw(st.text(min_size=1, max_size=3))
    value = (pattern.encode() * fill)[:fill] if is_bytes else _fit(pattern * fill, fill)
    base.MergeFrom(message(**{field: value}))
    return rpc, base.SerializeToString()


@fuzz("test_messages_near_the_limit")
@given(case=near_the_limit())
def test_messages_near_the_limit(signer, case):
    rpc, raw = case
    exercise(signer, rpc, raw=raw)


def test_all_cases_ran(signer):
    """At least 10,000 cases in all (skipped when only some of the fuzz tests were selected)."""
    stat = Path(f"/proc/{signer['proc'].pid}/stat").read_text().rpartition(")")[2].split()
    server_cpu = int(stat[11]) + int(stat[12])  # utime, stime (proc(5) fields 14 and 15)
    own = os.times()
    print(
        f"\nfuzz cases per test: {dict(CASES)}; outcomes: {dict(OUTCOMES)}; CPU seconds: tests "
        f"{own.user + own.system:.1f}, signer {server_cpu / os.sysconf('SC_CLK_TCK'):.1f}"
    )
    if set(CASES) != set(PLANNED):
        pytest.skip("not every fuzz test ran")
    assert all(CASES[name] >= planned for name, planned in PLANNED.items()), CASES
    assert sum(CASES.values()) >= 10_000
