"""The frameworks stay optional: ``import distnorm`` (and the adapters that do not need
their framework at import) import none of them, and an adapter whose framework is
missing says which extra to install.

Run in a fresh interpreter: the test session itself has imported the frameworks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("lightning", "pytorch_lightning", "mmengine", "mmcv", "accelerate", "timm",
              "detectron2", "deepspeed")

_PROBE = f"""
import json, sys
import distnorm, distnorm.integrations
import distnorm.integrations.accelerate, distnorm.integrations.detectron2
import distnorm.integrations.openmmlab, distnorm.integrations.timm_train
loaded = sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)

# Now hide the frameworks, as on a machine without them.
for name in ("lightning", "lightning.pytorch", "lightning.pytorch.plugins", "pytorch_lightning",
             "pytorch_lightning.plugins", "mmengine", "mmengine.registry"):
    sys.modules[name] = None
errors = {{}}
try:
    import distnorm.integrations.lightning
except ImportError as error:
    errors["lightning"] = str(error)
try:
    distnorm.integrations.openmmlab.register()
except ImportError as error:
    errors["openmmlab"] = str(error)
print(json.dumps({{"loaded": loaded, "errors": errors}}))
"""


def test_frameworks_are_imported_only_when_needed() -> None:
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert "pip install 'distnorm[lightning]'" in result["errors"]["lightning"]
    assert "pip install 'distnorm[openmmlab]'" in result["errors"]["openmmlab"]
