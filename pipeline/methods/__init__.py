"""Methods, and the one registry of them.

Every method is described by one ``MethodSpec`` (``pipeline.methods.base``)
and registered here, explicitly, once. To add a method: write
``pipeline/methods/<name>.py`` (its config, module and spec) and add one
``REGISTRY.register(...)`` line below. Training, evaluation and the report
find it through the registry; nothing else changes.
"""

from __future__ import annotations

from pipeline.core.errors import UserError
from pipeline.methods.base import MethodSpec
from pipeline.methods.clt import CLTSpec
from pipeline.methods.matryoshka import MatryoshkaCLTSpec, MatryoshkaSpec
from pipeline.methods.neurons import NeuronsSpec
from pipeline.methods.skip import SkipTranscoderSpec
from pipeline.methods.spd import SPDSpec
from pipeline.methods.transcoder import TranscoderSpec


class Registry:
    def __init__(self):
        self._specs: dict[str, MethodSpec] = {}
        self._aliases: dict[str, str] = {}

    def register(self, spec: MethodSpec, *aliases: str) -> None:
        """Add ``spec``; ``aliases`` are older family names its checkpoints may carry."""
        taken = set(self._specs) | set(self._aliases)
        clash = [n for n in (spec.name, *aliases, *spec.models) if n in taken or n in self.models()]
        if clash:
            raise ValueError(f"method {spec.name}: names {clash} are registered already")
        self._specs[spec.name] = spec
        self._aliases |= {a: spec.name for a in aliases}

    def get(self, family: str) -> MethodSpec:
        name = self._aliases.get(family, family)
        if name not in self._specs:
            raise UserError(f"unknown method family {family!r}; known: {', '.join(self._specs)}")
        return self._specs[name]

    def specs(self) -> list[MethodSpec]:
        return sorted(self._specs.values(), key=lambda s: s.order)

    def models(self) -> dict[str, MethodSpec]:
        """Every MODEL name the train stage accepts, with the spec that owns it."""
        return {model: spec for spec in self._specs.values() for model in spec.models}

    def for_models(self, models: list[str]) -> dict[MethodSpec, list[str]]:
        """Group MODEL names by their spec (in the order given); unknown names are refused."""
        known = self.models()
        unknown = [m for m in models if m not in known]
        if unknown:
            raise UserError(f"unknown MODEL {unknown}; choose from {', '.join(known)}")
        grouped: dict[MethodSpec, list[str]] = {}
        for m in dict.fromkeys(models):
            grouped.setdefault(known[m], []).append(m)
        return grouped


REGISTRY = Registry()
REGISTRY.register(NeuronsSpec())
REGISTRY.register(TranscoderSpec(), "dictionary")
REGISTRY.register(SkipTranscoderSpec())
REGISTRY.register(CLTSpec())
REGISTRY.register(MatryoshkaSpec())
REGISTRY.register(MatryoshkaCLTSpec())
REGISTRY.register(SPDSpec())
