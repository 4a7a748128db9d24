"""Stage two: train the projectors and the LoRA adapter over the feature store (uses ``store`` only).

``config`` (typed TOML config), ``tiny`` (the random test-fixture LM and its tokenizer), ``prompt``
(one layout for training and inference), ``modalities`` (the token order, one table), ``model`` (frozen
LM + LoRA + projectors, ``build_model``), ``data`` (prompt encoder, feature batcher, examples,
length-grouped steps), ``loop`` (the recipe: ``train(cfg)``), ``checkpoint`` (atomic, safetensors /
weights-only), ``evaluate`` (closed-set scoring), ``params`` (counts on the meta device).
Modules import torch and transformers themselves: importing this package is cheap.
"""
