"""Importing this module runs :func:`distnorm.integrations.openmmlab.register`.

For configs run by a stock ``tools/train.py`` (mmdet, mmseg, mmpretrain), which
cannot call ``register()`` themselves: mmengine imports the modules a config lists
in ``custom_imports`` when it loads the config, before the model is built::

    custom_imports = dict(imports=["distnorm.integrations.openmmlab_register"],
                          allow_failed_imports=False)
    norm_cfg = dict(type="DistSyncBN", requires_grad=True)
"""

from .openmmlab import register

register()
