"""The library's documented error types. Every error about user input is a ``SingLoRAError``."""

from __future__ import annotations


class SingLoRAError(ValueError):
    """Bad input to singlora: a config field, a target pattern, a module, a call made in the wrong state.

    The message names the field, module or file and the offending value.
    """


class AdapterFileError(SingLoRAError):
    """An adapter file (``adapter_config.json`` / ``adapter_model.safetensors``) that cannot be loaded as is."""
