"""What a Flower site keeps of its own releases, so that it can audit them itself
(``medveil site audit``, :func:`medveil.evaluate.audit.audit_site_state`) without asking the
server for anything but the final universal model.

In the site's state folder (``medveil site start --state DIR``: ``DIR/privacy/<name>/audit/``):

- ``site.json``: the server's data options for this site (size, channels, seed, split caps),
  the recipe of the attacker's reference model, and where the site's data is (its node config),
  so the audit rebuilds exactly the train split that was used;
- ``reference_start.pt``: the first backbone the site received for training (stage 1: the
  server's MIM-only backbone), the start of the reference model, with its stage;
- ``last_update.pt``: the last fine-tuned model the site sent (backbone + head, with its stage),
  the ``update`` target of the audit. Written after the update is made, before it leaves.

Nothing here leaves the site; the files hold weights the site itself made or received.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from medveil.federated.messages import ClientUpdate, FitInstructions
from medveil.io import save_torch_atomic, write_json_atomic

SITE, REFERENCE_START, LAST_UPDATE = "site.json", "reference_start.pt", "last_update.pt"


def audit_folder(state_dir: str | Path, name: str) -> Path:
    return Path(state_dir) / name / "audit"


def keep_release(folder: Path, site: dict[str, Any], node: dict[str, Any], ins: FitInstructions,
                 update: ClientUpdate) -> None:
    """Record one fine-tuning release of the site (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / SITE, {"site": site, "name": str(node.get("name", "")), "data": str(node.get("data", "")),
                                      "data_root": str(node.get("data-root", "") or "")})
    start = folder / REFERENCE_START
    if not start.is_file() or _stage(start) > ins.stage:
        save_torch_atomic(start, {"stage": ins.stage, "model_config": ins.model_config, "backbone": ins.backbone})
    save_torch_atomic(folder / LAST_UPDATE, {"stage": update.stage, "backbone": update.backbone, "head": update.head})


def _stage(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["stage"])


def read_site(folder: Path) -> dict[str, Any]:
    return json.loads((folder / SITE).read_text())
