"""Integrations with other libraries. Each submodule imports its library itself; importing ``singlora`` or this
package imports none of them.

- ``torch_singlora.integrations.trainer``: ``SingLoRACallback`` and ``SingLoRATrainer`` for ``transformers.Trainer``.
- ``torch_singlora.integrations.quantized``: bitsandbytes 4-bit / 8-bit base layers (adapter on top, explicit dequantized
  merge).
"""
