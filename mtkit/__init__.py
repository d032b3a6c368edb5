"""mtkit: a small, readable machine-translation toolkit.

From Python: `from mtkit import Translator` to translate with a trained model, and `mtkit.api`
for the stages (load_config, train_tokenizer, prepare, train, evaluate, run). They are imported on
first use, so that `import mtkit` (and the CLI's start-up) does not pay for torch.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {"Translator": "mtkit.translate", "AttentionMap": "mtkit.translate", "MtkitError": "mtkit.errors",
         "Config": "mtkit.config", "load_config": "mtkit.config"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "api":
        return importlib.import_module("mtkit.api")
    raise AttributeError(f"module 'mtkit' has no attribute {name!r}")


__all__ = [*_LAZY, "api"]
