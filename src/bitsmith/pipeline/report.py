"""What each stage did, per layer: what was asked, what was done, and why they differ.

Every handler fills one ``StageReport``; ``Report`` holds them in recipe order and merges them into the
views the CLI table, ``bitsmith.json`` and ``inspect`` show: ``quantized`` (layer -> what it got),
``skipped`` (layer -> why it stayed in float), ``notes`` (layer -> how what was done differs from what was
asked, or what happened on the way) and ``prepared`` (what the rewrite stages did, by stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["StageReport", "Report"]


@dataclass
class StageReport:
    stage: str  # the stage's name in the recipe ("quantize", "smooth", ...)
    quantizes: bool = False  # what its layers got is what they are now stored as (the quantize phase)
    layers: dict[str, dict] = field(default_factory=dict)  # name -> {"asked", "done", "note", "skipped"}
    summary: dict = field(default_factory=dict)  # stage-level facts (pairs folded, mappings smoothed, ...)

    def _layer(self, name: str) -> dict:
        return self.layers.setdefault(name, {})

    def done(self, name: str, done: str, asked: str | None = None) -> None:
        entry = self._layer(name)
        entry["done"] = done
        if asked is not None and asked != done:
            entry["asked"] = asked

    def note(self, name: str, text: str) -> None:
        entry = self._layer(name)
        entry["note"] = f"{entry['note']}; {text}" if "note" in entry else text

    def skip(self, name: str, why: str) -> None:
        self._layer(name)["skipped"] = why

    def as_dict(self) -> dict:
        return {"stage": self.stage, "layers": self.layers, "summary": self.summary}


@dataclass
class Report:
    stages: list[StageReport] = field(default_factory=list)

    def _merged(self, key: str, quantizing_only: bool = False) -> dict[str, str]:
        merged: dict[str, str] = {}
        for stage in self.stages:
            if quantizing_only and not stage.quantizes:
                continue
            for name, entry in stage.layers.items():
                if key not in entry:
                    continue
                text = entry[key]
                merged[name] = f"{merged[name]}; {text}" if key == "note" and name in merged else text
        return merged

    @property
    def quantized(self) -> dict[str, str]:
        return self._merged("done", quantizing_only=True)

    @property
    def skipped(self) -> dict[str, str]:
        return self._merged("skipped")

    @property
    def notes(self) -> dict[str, str]:
        return self._merged("note")

    @property
    def prepared(self) -> dict:
        prepared = {}
        for stage in self.stages:
            prepared.update(stage.summary)
        return prepared

    def as_list(self) -> list[dict]:
        return [stage.as_dict() for stage in self.stages]
