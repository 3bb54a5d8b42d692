"""The client's shared DPoP decisions (helseid_signer_client._rules): nonce syntax
(RFC 9449 section 8.1), WWW-Authenticate parsing (RFC 9110 section 11.6.1), the answer
classes and the retry budget."""

from __future__ import annotations

import pytest

from helseid_signer_client._rules import (
    Action,
    Answer,
    Attempts,
    NonceStore,
    classify,
    origin,
    parse_challenges,
    valid_nonce,
)


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("eyJ7S_zG.eyJH0-Z.HX4w-7v", True),  # RFC 9449 section 8, figure 20
        ("!", True),  # %x21
        ("#[]~", True),  # %x23, %x5B, %x5D, %x7E
        ("x" * 512, True),
        ("x" * 513, False),
        ("", False),
        ("a b", False),  # %x20
        ('a"b', False),  # %x22
        ("a\\b", False),  # %x5C
        ("a\x7fb", False),
        ("a\tb", False),
        ("nø", False),
        (None, False),
    ],
)
def test_nonce_syntax(value, valid):
    assert valid_nonce(value) is valid


def test_nonce_store_keeps_the_last_valid_nonce_per_origin():
    store = NonceStore()
    assert store.remember("https://a:443", "n1") and store.get("https://a:443") == "n1"
    assert not store.remember("https://a:443", "bad nonce")
    assert store.get("https://a:443") == "n1"
    assert store.get("https://b:443") is None


def test_origin_writes_the_default_port():
    assert origin("HTTPS", "Deft.Example", None) == origin("https", "deft.example", 443) == "https://deft.example:443"
    assert origin("http", "127.0.0.1", 8080) == "http://127.0.0.1:8080"


def test_parse_challenges():
    values = [
        'DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof"',
        'Bearer realm="x", error=invalid_token, DPoP algs="ES256 PS256"',
        'Basic realm="a\\"b"',
    ]
    assert parse_challenges(values) == [
        ("dpop", {"error": "use_dpop_nonce", "error_description": "Resource server requires nonce in DPoP proof"}),
        ("bearer", {"realm": "x", "error": "invalid_token"}),
        ("dpop", {"algs": "ES256 PS256"}),
        ("basic", {"realm": 'a"b'}),
    ]


@pytest.mark.parametrize(
    ("status", "challenge", "nonce", "location", "answer"),
    [
        (401, 'DPoP error="use_dpop_nonce"', "n", None, Answer.NONCE),  # RFC 9449 section 9, figure 22
        (401, 'Bearer realm="x", DPoP error="use_dpop_nonce"', "n", None, Answer.NONCE),
        (401, 'DPoP error="use_dpop_nonce"', None, None, Answer.NONE),
        (401, 'DPoP error="use_dpop_nonce"', "bad nonce", None, Answer.NONE),
        (401, 'Bearer error="use_dpop_nonce"', "n", None, Answer.NONE),
        (401, 'DPoP error="invalid_token"', None, None, Answer.INVALID_TOKEN),
        (401, 'Bearer error="invalid_token", error_description="The token expired"', None, None, Answer.INVALID_TOKEN),
        (401, 'DPoP error="invalid_dpop_proof"', None, None, Answer.NONE),
        (403, 'DPoP error="insufficient_scope"', None, None, Answer.NONE),
        (307, "", None, "https://elsewhere/", Answer.REDIRECT),
        (302, "", None, None, Answer.NONE),
        (304, "", None, "/x", Answer.NONE),
    ],
)
def test_classify(status, challenge, nonce, location, answer):
    assert classify(status, [challenge], nonce, location) is answer


def test_retry_budget_is_one_per_kind_and_needs_a_replayable_body():
    attempts = Attempts()
    assert attempts.decide(Answer.NONCE, True) is Action.RETRY
    assert attempts.decide(Answer.INVALID_TOKEN, True) is Action.RETRY
    assert attempts.decide(Answer.NONCE, True) is Action.RETURN
    assert attempts.decide(Answer.INVALID_TOKEN, True) is Action.RETURN
    assert Attempts().decide(Answer.NONCE, False) is Action.REFUSE_BODY
    assert Attempts().decide(Answer.INVALID_TOKEN, False) is Action.REFUSE_BODY
    assert Attempts().decide(Answer.REDIRECT, True) is Action.REFUSE_REDIRECT
    assert Attempts().decide(Answer.NONE, False) is Action.RETURN
