"""Configuration loading (helseid_signer.config): a valid file loads; every error names its key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helseid_signer.config import ConfigError, is_loopback_host, load_settings, parse_listen

VALID = """
[server]
listen = "127.0.0.1:50051"
insecure = true
workers = 2

[backends.pkcs11]
module = "/usr/lib/softhsm/libsofthsm2.so"
pin_file = "secrets/pin"

[keys.assertion]
uri = "pkcs11:token=helseid;object=assertion"
alg = "PS256"

[keys.dpop]
uri = "pkcs11:token=helseid;object=dpop"
alg = "ES256"

[profiles.demo]
client_id = "a1b2c3"
issuer = "https://127.0.0.1:4443"
assertion_key = "assertion"
dpop_key = "dpop"
assertion_lifetime = 10
tenancy = "multi"
allowed_organization_numbers = ["912345678", "998877665"]
"""


#: VALID with a TLS listener instead of plaintext: the only way to sign for a non-loopback issuer.
VALID_TLS = VALID.replace(
    "insecure = true\n", 'tls_certificate = "server.pem"\ntls_private_key = "server.key"\nclient_ca = "ca.pem"\n'
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "signer.toml"
    path.write_text(text, encoding="utf-8")
    return path


def replace_line(text: str, key: str, new_line: str) -> str:
    """VALID with the first ``key = ...`` line replaced (or removed when new_line is empty)."""
    replacement = new_line + "\n" if new_line else ""
    result, count = re.subn(rf"^{re.escape(key)} = .*$\n?", lambda _: replacement, text, count=1, flags=re.M)
    assert count == 1, key
    return result


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    return str(info.value)


def test_valid_config_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, VALID))
    assert settings.server.listen == "127.0.0.1:50051"
    assert settings.server.insecure is True
    assert settings.server.workers == 2
    assert settings.keys["assertion"].alg == "PS256"
    assert settings.keys["dpop"].uri == "pkcs11:token=helseid;object=dpop"
    profile = settings.profiles["demo"]
    assert profile.client_id == "a1b2c3"
    assert profile.issuer == "https://127.0.0.1:4443"
    assert profile.assertion_lifetime == 10
    assert profile.tenancy == "multi"
    assert profile.allowed_organization_numbers == ("912345678", "998877665")
    assert profile.effective_token_endpoint == "https://127.0.0.1:4443/connect/token"


def test_defaults(tmp_path: Path) -> None:
    text = replace_line(VALID, "assertion_lifetime", "")
    text = replace_line(text, "tenancy", "")
    text = replace_line(text, "allowed_organization_numbers", "")
    profile = load_settings(write(tmp_path, text)).profiles["demo"]
    assert profile.assertion_lifetime == 10
    assert profile.tenancy == "single"
    assert profile.allowed_organization_numbers == ()


def test_issuer_kept_exactly_and_explicit_token_endpoint(tmp_path: Path) -> None:
    text = replace_line(VALID_TLS, "issuer", 'issuer = "https://issuer.example/tenant/"')
    text = text.replace('dpop_key = "dpop"', 'dpop_key = "dpop"\ntoken_endpoint = "https://issuer.example/tok"')
    profile = load_settings(write(tmp_path, text)).profiles["demo"]
    assert profile.issuer == "https://issuer.example/tenant/"  # no slash added or removed
    assert profile.effective_token_endpoint == "https://issuer.example/tok"


def test_relative_pin_file_resolved_against_config_folder(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)  # somewhere else than the config folder
    settings = load_settings(write(folder, VALID))
    assert settings.backends.pkcs11.pin_file == str(folder.resolve() / "secrets" / "pin")


def test_relative_pin_file_via_relative_config_path(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    write(folder, VALID)
    monkeypatch.chdir(tmp_path)
    settings = load_settings("etc/signer.toml")
    assert settings.backends.pkcs11.pin_file == str(folder.resolve() / "secrets" / "pin")


def test_absolute_pin_file_kept(tmp_path: Path) -> None:
    text = replace_line(VALID, "pin_file", 'pin_file = "/run/secrets/pin"')
    assert load_settings(write(tmp_path, text)).backends.pkcs11.pin_file == "/run/secrets/pin"


@pytest.mark.parametrize(
    "issuer",
    [
        "http://127.0.0.1:3000",
        "http://127.0.0.2/x",
        "http://[::1]:3000",
        "http://localhost:3000",
        "http://LOCALHOST/x",
        "https://helseid-sts.nhn.no",
    ],
)
def test_http_allowed_only_for_loopback(tmp_path: Path, issuer: str) -> None:
    text = replace_line(VALID_TLS, "issuer", f'issuer = "{issuer}"')
    assert load_settings(write(tmp_path, text)).profiles["demo"].issuer == issuer


@pytest.mark.parametrize(
    ("issuer", "message"),
    [
        ("http://helseid-sts.test.nhn.no", "https"),
        ("http://10.0.0.1:3000", "https"),
        ("http://[::2]:3000", "https"),
        ("http://localhost.example.com", "https"),
        ("ftp://helseid-sts.test.nhn.no", "https"),
        ("helseid-sts.test.nhn.no", "https"),
        ("https://user:pw@helseid-sts.test.nhn.no", "userinfo"),
        ("https://127.0.0.1:4443?x=1", "query"),
        ("https://127.0.0.1:4443#f", "fragment"),
        ("https://127.0.0.1:4443?", "query"),
        ("https://127.0.0.1:4443:99999", "port"),
        ("https://127.0.0.1:4443:abc", "port"),
        ("https://127.0.0.1:4443\\n", "control"),
        ("https://127.0.0.1:4443 ", "spaces"),
        ("https://helseid sts.test.nhn.no", "spaces"),
        ("https://[::1", "IPv6"),
    ],
)
def test_issuer_errors_name_the_key(tmp_path: Path, issuer: str, message: str) -> None:
    error = load_error(tmp_path, replace_line(VALID, "issuer", f'issuer = "{issuer}"'))
    assert "profiles.demo.issuer: " in error
    assert message in error


def test_token_endpoint_error_names_the_key(tmp_path: Path) -> None:
    text = VALID.replace('dpop_key = "dpop"', 'dpop_key = "dpop"\ntoken_endpoint = "http://example.com/tok"')
    assert "profiles.demo.token_endpoint: must use https" in load_error(tmp_path, text)


@pytest.mark.parametrize(("value", "ok"), [(0, False), (1, True), (60, True), (61, False), (-5, False)])
def test_assertion_lifetime_bounds(tmp_path: Path, value: int, ok: bool) -> None:
    text = replace_line(VALID, "assertion_lifetime", f"assertion_lifetime = {value}")
    if ok:
        assert load_settings(write(tmp_path, text)).profiles["demo"].assertion_lifetime == value
    else:
        assert "profiles.demo.assertion_lifetime: " in load_error(tmp_path, text)


@pytest.mark.parametrize(
    ("section_line", "extra", "key"),
    [
        ("[profiles.demo]", "audience = 'x'", "profiles.demo.audience"),
        ("[keys.dpop]", "kid = 'x'", "keys.dpop.kid"),
        ("[server]", "tls = false", "server.tls"),
        ("[backends.pkcs11]", "pin = '1234'", "backends.pkcs11.pin"),
    ],
)
def test_unknown_keys_refused(tmp_path: Path, section_line: str, extra: str, key: str) -> None:
    error = load_error(tmp_path, VALID.replace(section_line, f"{section_line}\n{extra}"))
    assert f"{key}: " in error


def test_unknown_top_level_section_refused(tmp_path: Path) -> None:
    assert "clients: " in load_error(tmp_path, VALID + "\n[clients.x]\na = 1\n")


def test_unknown_backend_section_refused(tmp_path: Path) -> None:
    assert "backends.gcpkms: " in load_error(tmp_path, VALID + '\n[backends.gcpkms]\nregion = "eu-north-1"\n')


@pytest.mark.parametrize("field", ["assertion_key", "dpop_key"])
def test_missing_key_reference(tmp_path: Path, field: str) -> None:
    error = load_error(tmp_path, replace_line(VALID, field, f'{field} = "nope"'))
    assert f"profiles.demo.{field}: no [keys.nope] section" in error


@pytest.mark.parametrize("alg", ["HS256", "none", "rs256", "EdDSA", ""])
def test_bad_alg(tmp_path: Path, alg: str) -> None:
    error = load_error(tmp_path, replace_line(VALID, "alg", f'alg = "{alg}"'))
    assert "keys.assertion.alg: must be one of" in error


@pytest.mark.parametrize("orgnr", ["12345678", "1234567890", "12345678x", "912345678\\n", " 912345678"])
def test_bad_orgnr(tmp_path: Path, orgnr: str) -> None:
    line = f'allowed_organization_numbers = ["912345678", "{orgnr}"]'
    error = load_error(tmp_path, replace_line(VALID, "allowed_organization_numbers", line))
    assert "profiles.demo.allowed_organization_numbers.1: " in error


@pytest.mark.parametrize(
    ("key", "line", "where"),
    [
        ("tenancy", 'tenancy = "both"', "profiles.demo.tenancy"),
        ("client_id", 'client_id = ""', "profiles.demo.client_id"),
        ("client_id", "", "profiles.demo.client_id"),
        ("issuer", "", "profiles.demo.issuer"),
        ("assertion_key", 'assertion_key = "bad name"', "profiles.demo.assertion_key"),
        ("uri", 'uri = ""', "keys.assertion.uri"),
        ("workers", "workers = 0", "server.workers"),
        ("insecure", "insecure = false", "server"),
        ("module", "", "backends.pkcs11.module"),
    ],
)
def test_other_errors_name_the_key(tmp_path: Path, key: str, line: str, where: str) -> None:
    assert f"{where}: " in load_error(tmp_path, replace_line(VALID, key, line))


def test_sign_on_event_loop_is_off_unless_set_and_must_be_a_boolean(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, VALID)).backends.pkcs11.sign_on_event_loop is False
    on = VALID.replace("[backends.pkcs11]", "[backends.pkcs11]\nsign_on_event_loop = true")
    assert load_settings(write(tmp_path, on)).backends.pkcs11.sign_on_event_loop is True
    text = VALID.replace("[backends.pkcs11]", '[backends.pkcs11]\nsign_on_event_loop = "yes"')
    assert "backends.pkcs11.sign_on_event_loop: " in load_error(tmp_path, text)


def test_pin_source_required(tmp_path: Path) -> None:
    error = load_error(tmp_path, replace_line(VALID, "pin_file", ""))
    assert "backends.pkcs11: " in error and "pin_env" in error


def test_pkcs11_key_needs_backend_section(tmp_path: Path) -> None:
    text = re.sub(r"\[backends\.pkcs11\]\n(.*\n){2}", "", VALID)
    assert "[backends.pkcs11]" not in text
    assert "keys.assertion.uri: a pkcs11: key needs a [backends.pkcs11] section" in load_error(tmp_path, text)


def test_bad_profile_name(tmp_path: Path) -> None:
    assert "profiles" in load_error(tmp_path, VALID.replace("[profiles.demo]", '[profiles."de mo"]'))


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.toml"):
        load_settings(tmp_path / "missing.toml")
    assert "not valid TOML" in load_error(tmp_path, VALID + "\n[[[")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LocalHost", True),
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("0:0:0:0:0:0:0:1", True),
        ("", False),
        (None, False),
        ("10.0.0.1", False),
        ("::2", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io", False),
    ],
)
def test_is_loopback_host(host: str | None, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("127.0.0.1:50051", ("127.0.0.1", 50051)), ("[::1]:0", ("::1", 0)), ("localhost:65535", ("localhost", 65535))],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["127.0.0.1", ":50051", "127.0.0.1:65536", "127.0.0.1:x", "127.0.0.1:123456"])
def test_parse_listen_refused(listen: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(listen)
