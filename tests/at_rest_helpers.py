"""Shared by the at-rest tests: find plaintext a site's state directory must not hold."""

from __future__ import annotations

from pathlib import Path

# What would betray each part of the state in plaintext: audit records, manifest fields,
# the safetensors header (its JSON names every tensor's dtype and offsets), ledger fields.
PLAINTEXT_MARKERS = (
    b'"principal"',
    b'"latency_ms"',
    b"weights_sha256",
    b'"server_round"',
    b'"data_offsets"',
    b'"dtype"',
    b'"noise_multiplier"',
    b'"entries"',
    b'"switched_at"',
)


def plaintext_hits(root: Path, *, skip: tuple[str, ...] = ()) -> list[tuple[str, bytes]]:
    """Every (file, marker) pair found under ``root``, top-level entries in ``skip`` excepted."""
    hits = []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if relative.parts[0] in skip:
            continue
        data = path.read_bytes()
        hits += [(str(relative), m) for m in PLAINTEXT_MARKERS if m in data]
    return hits
