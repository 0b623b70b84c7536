"""``modules_to_save``: a module trained fully per adapter (``TrainableCopy``: the frozen original plus one
trainable copy per adapter), as PEFT's ``ModulesToSaveWrapper``. Saved under the module's own keys."""

from __future__ import annotations

import copy

from torch import nn

from .mixed import Selection


class TrainableCopy(nn.Module):
    """A module of ``modules_to_save``: the frozen original plus one fully trainable copy per adapter.

    The copy of the first active adapter that has one runs; with none (or adapters disabled) the original runs.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.selection: Selection | None = None  # the owner's mixed-batch selection (attached once)

    def add_adapter(self, name: str) -> None:
        replica = copy.deepcopy(self.original_module)
        for parameter in replica.parameters():
            parameter.requires_grad_(True)
        self.copies[name] = replica

    def delete_adapter(self, name: str) -> None:
        del self.copies[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def active_module(self) -> nn.Module:
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.copies:
                    return self.copies[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        if self.selection is not None and self.selection.active and not self.disabled:  # torch_singlora.mixed
            return self.selection.run_copies(self, *args, **kwargs)
        return self.active_module()(*args, **kwargs)
