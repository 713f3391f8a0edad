//! Tests of both syntaxes through the public entry points.
