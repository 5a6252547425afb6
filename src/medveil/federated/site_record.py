"""What a Flower site keeps of its own releases, so that it can audit them itself
(``medveil site audit``, :func:`medveil.evaluate.audit.audit_site_state`) without asking the
server for anything but the final universal model.

In the site's state folder (``medveil site start --state DIR``: ``DIR/privacy/<name>/audit/``):

- ``site.json``: the server's data options for this site (size, channels, seed, split caps),
  the recipe of the attacker's reference model, and the resolved path of the site's data, so
  the audit rebuilds exactly the train split that was used;
- ``reference_start.pt``: the first backbone the site received for training in the run, with
  its stage: the start of the reference model. With the parallel schedule and a site that trained
  from stage 1 it is the server's MIM-only backbone, as in ``medveil audit``; otherwise (relay's
  sequential schedule, a site that joined later) it already holds other sites' training, and the
  audit says which stage it is;
- ``last_update.pt``: the last fine-tuned model the site sent (backbone + head, with its stage),
  the ``update`` target of the audit. Written after the update is made, before it leaves.

Nothing here leaves the site; the files hold weights the site itself made or received.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medveil.federated.messages import ClientUpdate, FitInstructions
from medveil.io import save_torch_atomic, write_json_atomic

SITE, REFERENCE_START, LAST_UPDATE = "site.json", "reference_start.pt", "last_update.pt"


def audit_folder(state_dir: str | Path, name: str) -> Path:
    return Path(state_dir) / name / "audit"


def keep_release(folder: Path, site: dict[str, Any], name: str, source: str, ins: FitInstructions,
                 update: ClientUpdate) -> None:
    """Record one fine-tuning release of the site (see the module docstring). ``source``: the
    resolved path of the site's dataset. Stages only grow within a run, so a release at a stage no
    later than the recorded start begins a new run (or repeats that stage on resume): the records
    then start again from it, and hold the last run in which the site trained."""
    folder.mkdir(parents=True, exist_ok=True)
    kept = read_site(folder) if (folder / SITE).is_file() else {}
    start_stage = kept.get("start_stage")
    new_run = start_stage is None or ins.stage <= start_stage or ins.stage < kept.get("last_stage", ins.stage)
    if new_run:
        start_stage = ins.stage
        save_torch_atomic(folder / REFERENCE_START,
                          {"stage": ins.stage, "model_config": ins.model_config, "backbone": ins.backbone})
    save_torch_atomic(folder / LAST_UPDATE, {"stage": update.stage, "backbone": update.backbone, "head": update.head})
    write_json_atomic(folder / SITE, {"site": site, "name": name, "data": str(Path(source).resolve()),
                                      "start_stage": start_stage, "last_stage": ins.stage})


def read_site(folder: Path) -> dict[str, Any]:
    return json.loads((folder / SITE).read_text())
