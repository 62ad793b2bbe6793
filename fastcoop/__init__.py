"""fastcoop: CoOp prompt learning on cached CLIP features, exact and fast."""

__version__ = "0.1.0"

from fastcoop.data import LabelledImages, read_coop_split, read_csv, read_dataset, read_imagefolder  # noqa: E402
from fastcoop.errors import FastCoopError  # noqa: E402
from fastcoop.fewshot import sample_few_shot  # noqa: E402
from fastcoop.models import LoadedModel, load_model  # noqa: E402
from fastcoop.prompts import PromptLearner  # noqa: E402
from fastcoop.text_encoder import FastTextEncoder, encode_prompts  # noqa: E402
from fastcoop.train import TrainConfig  # noqa: E402  (the loop itself: fastcoop.train.train)

__all__ = ["FastCoopError", "FastTextEncoder", "LabelledImages", "LoadedModel", "PromptLearner", "TrainConfig",
           "encode_prompts", "load_model", "read_coop_split", "read_csv", "read_dataset", "read_imagefolder",
           "sample_few_shot"]
