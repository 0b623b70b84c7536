"""Tied weights and merging: an adapted module whose weight another module shares (``lm_head`` and
``embed_tokens`` with ``tie_word_embeddings``) must not change that other module when an adapter is merged.

Merging adds ``dW`` to the weight in place. For a tied ``lm_head`` that would add it to the input embeddings too,
and the merged model would differ from the adapted one (PEFT 0.21 does this, and warns). Here the layer first gets
its own copy of the weight (``SingLoRALayer.untie_weight``, found by tensor identity, not by module names), the
model's ``config.tie_word_embeddings`` becomes ``False`` (so ``save_pretrained`` / ``from_pretrained`` keep them
apart), and a ``UserWarning`` says so; ``unmerge()`` puts the shared weight back and the flag with it.
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict

from torch import nn

from .layers import SingLoRALayer


def shared_weights(root: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): its names}`` for each parameter of ``root`` held under several names (tied weights, found
    by identity, not by module names)."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, parameter in root.named_parameters(remove_duplicate=False):
        names[id(parameter)].append(name)
    return {key: found for key, found in names.items() if len(found) > 1}


def untie_before_merge(root: nn.Module, layers: list[tuple[str, SingLoRALayer]]) -> bool:
    """Untie each of ``layers`` (about to merge something) whose base weight another parameter of ``root`` shares;
    set ``root.config.tie_word_embeddings = False`` if any was untied (returns whether the flag was changed)."""
    owners = Counter(id(p) for _, p in root.named_parameters(remove_duplicate=False))
    untied = []
    for name, layer in layers:
        weight = layer.base_layer.weight
        if owners[id(weight)] > 1:
            owners[id(weight)] -= 1
            sharing = [n for n, p in root.named_parameters(remove_duplicate=False)
                       if p is weight and not n.startswith(name + ".")]
            layer.untie_weight()
            untied.append(f"{name!r} (tied to {', '.join(sharing)}; {weight.numel():,} parameters copied)")
    if not untied:
        return False
    config = getattr(root, "config", None)
    changed = getattr(config, "tie_word_embeddings", None) is True
    if changed:
        config.tie_word_embeddings = False
    warnings.warn(
        f"merging into {'; '.join(untied)}: each gets a weight of its own so that the modules tied to it keep "
        f"theirs and the merged model computes what the adapted one did"
        + ("; config.tie_word_embeddings is now False" if changed else "") + " (unmerge() ties them again)",
        UserWarning, stacklevel=3,
    )
    return changed


def retie_config(root: nn.Module, layers: list[SingLoRALayer]) -> bool:
    """After an unmerge: ``config.tie_word_embeddings = True`` again once no layer holds an untied copy. Returns
    whether the flag must still be restored later (some layer is still untied)."""
    if any(layer.untied for layer in layers):
        return True
    config = getattr(root, "config", None)
    if config is not None:
        config.tie_word_embeddings = True
    return False
