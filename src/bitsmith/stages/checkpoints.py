"""Training checkpoints: every ``checkpoint_every`` steps the model, the optimizer and the batch order are
written (safetensors for tensors, JSON for the rest: never pickle), so that ``--resume`` continues a killed run
to the same final weights as an uninterrupted one with the same seed.

    <checkpoints>/<stage index>-<stage>/model.safetensors      every tensor of the model's state dict
                                       /optimizer.safetensors  AdamW moments and steps, the order generator's
                                       |                       and torch's RNG states
                                       /state.json             step, losses, batch order left, lr schedule, settings

A checkpoint is written to a fresh directory, then renamed over the last one: a kill while writing leaves the
previous one whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.pipeline.distributed import barrier, is_main

__all__ = ["Checkpoints"]


class Checkpoints:
    """Where one training stage keeps its checkpoints, how often, and whether to start from the last one."""

    def __init__(self, folder: Path | None, every: int, resume: bool, settings: dict):
        self.folder, self.every, self.resume = folder, every, resume
        self.settings = settings  # what must match for a checkpoint to continue this run

    @property
    def active(self) -> bool:
        return self.folder is not None and self.every > 0

    def due(self, step: int) -> bool:
        return self.active and step % self.every == 0

    def write(self, step: int, model: nn.Module, optimizer, schedule, generator: torch.Generator, order: list[int],
              losses: list[float]) -> None:
        if not is_main():  # data parallel: every process holds the same state; rank 0 writes it
            barrier()
            return
        self._write(step, model, optimizer, schedule, generator, order, losses)
        barrier()

    def _write(self, step: int, model: nn.Module, optimizer, schedule, generator: torch.Generator, order: list[int],
               losses: list[float]) -> None:
        fresh = self.folder.with_name(self.folder.name + ".writing")
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        # clones: tied parameters are one tensor under two names, which safetensors will not write as such
        save_file({name: t.detach().clone().contiguous() for name, t in model.state_dict().items()},
                  str(fresh / "model.safetensors"))
        state = optimizer.state_dict()
        tensors = {f"{index}.{key}": value.detach().clone().contiguous()
                   for index, slots in state["state"].items() for key, value in slots.items()}
        tensors["generator"] = generator.get_state()
        tensors["torch_rng"] = torch.get_rng_state()  # dropout (LoRA's): the same masks after a resume
        save_file(tensors, str(fresh / "optimizer.safetensors"))
        (fresh / "state.json").write_text(json.dumps({
            "settings": self.settings, "step": step, "losses": losses, "order": order,
            "param_groups": state["param_groups"], "schedule": schedule.state_dict()}))
        if self.folder.exists():
            shutil.rmtree(self.folder)
        fresh.rename(self.folder)

    def read(self, model: nn.Module, optimizer, schedule, generator: torch.Generator) -> tuple[int, list, list]:
        """Restore the last checkpoint into the given objects: (its step, its losses, the batch order left);
        (0, [], []) when there is none or ``resume`` is off."""
        if not (self.active and self.resume and (self.folder / "state.json").exists()):
            return 0, [], []
        try:
            state = json.loads((self.folder / "state.json").read_text())
            weights = load_file(str(self.folder / "model.safetensors"))
            tensors = load_file(str(self.folder / "optimizer.safetensors"))
        except (OSError, ValueError, SafetensorError) as err:
            raise BitsmithError(f"checkpoint {self.folder} cannot be read ({err}); delete it to start over") from None
        if state.get("settings") != self.settings:
            raise BitsmithError(f"checkpoint {self.folder} is of another run (other stage settings, model or data);"
                                " delete it or run without --resume")
        model.load_state_dict(weights)
        slots: dict[int, dict] = {}
        for key, value in tensors.items():
            if key not in ("generator", "torch_rng"):
                index, _, name = key.partition(".")
                slots.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
        schedule.load_state_dict(state["schedule"])
        generator.set_state(tensors["generator"])
        if "torch_rng" in tensors:
            torch.set_rng_state(tensors["torch_rng"])
        return state["step"], state["losses"], state["order"]
