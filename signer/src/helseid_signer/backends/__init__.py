"""Key backends behind one interface: PKCS#11 (``pkcs11:``), AWS KMS (``awskms:``),
Azure Key Vault (``azurekv:``). See :mod:`.base`."""
