"""Server reflection is off unless configured (it tells anyone who connects what the
service offers), and lists the signer and health services when switched on."""

from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.signer_proc import running_signer
from tests.support.signerkit import keys_create, write_config
from tests.support.softhsm import create_token


def _list_services(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        return sorted(s.name for s in answer.list_services_response.service)


@pytest.mark.parametrize("reflection", [False, True])
def test_reflection_only_when_configured(tmp_path, reflection):
    token = create_token(tmp_path / "token", label="refl")
    keys_create(token, "k", "EC-P256", "ES256")
    config = write_config(
        tmp_path / "signer.toml", token, issuer="https://127.0.0.1:4443", client_id="c",
        keys={"k": "ES256"}, profiles={"p": ("k", "k")},
        server_lines=('listen = "127.0.0.1:0"', "insecure = true", f"reflection = {str(reflection).lower()}"),
    )  # fmt: skip
    with running_signer(config, env={"SOFTHSM2_CONF": str(token.conf)}) as address:
        if reflection:
            assert _list_services(address) == [
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
                "helseid.signer.v1.SignerService",
            ]
        else:
            with pytest.raises(grpc.RpcError) as caught:
                _list_services(address)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
