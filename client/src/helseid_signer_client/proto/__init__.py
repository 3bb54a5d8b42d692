"""The generated protobuf and gRPC stubs of ``helseid.signer.v1`` (proto/helseid/signer/v1/signer.proto).

Public: the signer service serves from them and hosts may call them directly.
``signer_pb2`` holds the messages, ``signer_pb2_grpc`` the service stub and servicer base.
Regenerate with ``python scripts/gen_proto.py``; tests/unit/test_proto_stubs.py fails when
they are stale.
"""
