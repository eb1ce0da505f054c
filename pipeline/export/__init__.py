"""Exporters to other tools' formats, one module per format.

``EXPORTERS`` maps a format name to its writer ``(checkpoint, out, overwrite) -> Path``;
a method's spec lists the formats it supports (``MethodSpec.exports``), so
``nnd export`` refuses a format a method cannot be written in with one line.
"""

from __future__ import annotations

from pipeline.export.circuit_tracer import export_circuit_tracer

EXPORTERS = {"circuit-tracer": export_circuit_tracer}
