"""The demo (README command one) and the DPoP-protected stand-in for DEFT it calls."""
