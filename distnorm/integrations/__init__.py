"""Adapters for training frameworks: Lightning, OpenMMLab, detectron2, timm.

Each adapter is its own module and imports its framework only when that module is
imported, so ``import distnorm`` never pulls in an optional framework::

    from distnorm.integrations.lightning import DistnormSync      # Lightning LayerSync plugin
    from distnorm.integrations import openmmlab; openmmlab.register()   # norm_cfg types
    from distnorm.integrations.detectron2 import norm              # get_norm-compatible callable
    from distnorm.integrations.accelerate import check_accelerator  # a guard, no adapter
    python -m distnorm.integrations.timm_train train.py --sync-bn ...   # timm's train.py

accelerate needs no adapter: convert the model before ``accelerator.prepare``;
``check_accelerator`` refuses the one setting where that silently goes wrong. See
docs/integrations.md for a snippet per framework and what each test covers.
"""
