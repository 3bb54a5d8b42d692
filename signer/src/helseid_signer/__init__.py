"""helseid-signer: a gRPC service that signs HelseID client assertions and DPoP proofs
with keys held in a PKCS#11 HSM, AWS KMS or Azure Key Vault."""

__version__ = "0.1.0"
