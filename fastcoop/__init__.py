"""fastcoop: prompt learning and few-shot CLIP methods on cached CLIP features, exact and fast.

    cache = fastcoop.open_cache("caltech101.h5")
    run = fastcoop.train(cache, method="coop", shots=16, seed=1)
    run.evaluate(cache), run.save("runs/coop")

The public names load on first use (PEP 562), so that the command line answers `--help` and argument errors
without importing torch or open_clip.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "open_cache": "fastcoop.api", "train": "fastcoop.api", "TrainedRun": "fastcoop.api",
    "Method": "fastcoop.methods", "Option": "fastcoop.methods", "FastCoopError": "fastcoop.errors",
    "FastTextEncoder": "fastcoop.text_encoder",
    "LabelledImages": "fastcoop.data", "LoadedModel": "fastcoop.models", "PromptLearner": "fastcoop.prompts",
    "Recipe": "fastcoop.config", "Runtime": "fastcoop.config",  # the loop itself: fastcoop.training
    "encode_prompts": "fastcoop.text_encoder", "load_model": "fastcoop.models", "read_coop_split": "fastcoop.data",
    "read_csv": "fastcoop.data", "read_dataset": "fastcoop.datasets", "read_imagefolder": "fastcoop.data",
    "sample_few_shot": "fastcoop.fewshot",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fastcoop' has no attribute '{name}'")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
