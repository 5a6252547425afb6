"""Compare two federated run folders: are the universal models bit-identical, and the metrics
equal apart from timings? Used to check that a refactor keeps behaviour bit for bit:

    python scripts/federation_variants.py /tmp/before      # at the old commit
    python scripts/federation_variants.py /tmp/after       # at the new commit
    for r in demo relay median trimmed; do python scripts/compare_runs.py /tmp/before/$r /tmp/after/$r; done

Exit code 0 when identical, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

TIMING = ("seconds", "cpu_seconds", "phase_seconds")


def tensors(d: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(tensors(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[prefix + k] = v
    return out


def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if k not in TIMING}
    if isinstance(o, list):
        return [strip(v) for v in o]
    return o


def main(a: Path, b: Path) -> int:
    ta, tb = (tensors(torch.load(x / "model.pt", map_location="cpu", weights_only=True)) for x in (a, b))
    differ = sorted(k for k in ta.keys() & tb.keys() if not torch.equal(ta[k], tb[k]))
    missing = sorted(ta.keys() ^ tb.keys())
    ma, mb = (json.loads((x / "metrics.json").read_text()) for x in (a, b))
    same_stages = strip(ma["stages"]) == strip(mb["stages"])
    print(f"{a.name}: {len(ta)} tensors, {len(differ)} differ, {len(missing)} only on one side; "
          f"stage metrics (timings apart) equal: {same_stages}; final equal: {ma['final'] == mb['final']}")
    return 0 if not differ and not missing and same_stages and ma["final"] == mb["final"] else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
