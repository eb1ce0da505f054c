"""Exporters to other tools' formats, one module per format.

``EXPORTERS`` maps a format name to its writer ``(checkpoints, out, ExportOptions) -> Path``;
a method's spec lists the formats it supports (``MethodSpec.exports``), so
``nnd export`` refuses a format a method cannot be written in with one line.
"""

from __future__ import annotations

from pipeline.export.circuit_tracer import export_circuit_tracer
from pipeline.export.options import ExportOptions
from pipeline.export.saelens import export_saelens

EXPORTERS = {"circuit-tracer": export_circuit_tracer, "saelens": export_saelens}

__all__ = ["EXPORTERS", "ExportOptions"]
