"""Reproduction studies of the SingLoRA paper's claims (see studies/README.md)."""
