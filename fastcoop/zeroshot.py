"""Zero-shot baselines: one hand-written prompt, CLIP's template ensemble, or CuPL's class descriptions."""

import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from fastcoop.classnames import spoken
from fastcoop.errors import FastCoopError
from fastcoop.classifiers import normalized_mean
from fastcoop.models import LoadedModel
from fastcoop.text_tower import TextTower


def builtin_templates(name: str) -> list[str]:
    """CLIP's hand-written templates for a dataset (e.g. 'imagenet', the 80-template ensemble)."""
    table = json.loads(resources.files("fastcoop").joinpath("presets/templates.json").read_text())
    if name not in table:
        raise FastCoopError(f"no built-in templates '{name}' (have: {', '.join(sorted(table))}); or pass a file")
    return [t.replace("{c}", "{}") for t in table[name]]


def read_templates(value: str) -> list[str]:
    """A built-in set by name, a JSON list file, or a text file with one template per line."""
    path = Path(value)
    if not path.is_file():
        return builtin_templates(value)
    text = path.read_text()
    templates = json.loads(text) if path.suffix == ".json" else [t for t in text.splitlines() if t.strip()]
    return [t.replace("{c}", "{}") for t in templates]


def check_templates(templates: list[str]) -> list[str]:
    if not templates:
        raise FastCoopError("no templates given")
    for template in templates:
        if template.count("{}") != 1:
            raise FastCoopError(f"template '{template}' must contain '{{}}' exactly once, where the class name goes")
    return templates


def read_cupl(path: str | Path, classnames: list[str]) -> list[list[str]]:
    """CuPL descriptions per class, matched to class names case-insensitively with '_' as space."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FastCoopError(f"cannot read CuPL file {path}: {exc}") from exc
    key = {spoken(name).lower(): texts for name, texts in table.items()}
    missing = [name for name in classnames if spoken(name).lower() not in key]
    if missing:
        raise FastCoopError(f"{path} has no descriptions for {len(missing)} class(es), e.g. {missing[:3]}")
    return [key[spoken(name).lower()] for name in classnames]


def class_text_features(loaded: LoadedModel, texts_per_class: list[list[str]], device: str = "cpu",
                        batch: int = 256) -> torch.Tensor:
    """K × D: each class's texts encoded by the frozen text encoder and averaged after L2 normalisation."""
    return ensemble_features(loaded.model, loaded.tokenizer, texts_per_class, device, batch)


def ensemble_features(model, tokenizer, texts_per_class: list[list[str]], device: str = "cpu",
                      batch: int = 256) -> torch.Tensor:
    """class_text_features of a model and its tokenizer."""
    flat = [t for texts in texts_per_class for t in texts]
    with torch.no_grad():
        encoded = torch.cat([model.encode_text(tokenizer(flat[i:i + batch]).to(device)).float()
                             for i in range(0, len(flat), batch)])
    out, start = [], 0
    for texts in texts_per_class:
        out.append(normalized_mean(encoded[start:start + len(texts)]))
        start += len(texts)
    return torch.stack(out)


def zeroshot_classifier(loaded: LoadedModel, classnames: list[str], templates: list[str] | None = None,
                        cupl: str | Path | None = None, device: str = "cpu") -> torch.Tensor:
    if cupl:
        return class_text_features(loaded, read_cupl(cupl, classnames), device)
    templates = check_templates(templates or ["a photo of a {}."])
    return class_text_features(loaded, [[t.format(name) for t in templates] for name in classnames], device)


def adapter_templates(key: str | None = None) -> list[str] | dict[str, list[str]]:
    """The prompts whose text features, averaged, make TaskRes's and CLAP's zero-shot classifier for a dataset
    (by fastcoop's dataset name; 'default' for another); without a key, the whole table."""
    table = json.loads(resources.files("fastcoop").joinpath("presets/adapter_templates.json").read_text())
    if key is None:
        return table
    if key not in table:
        raise FastCoopError(f"-o zs_templates takes a dataset's name ({', '.join(table)}), not '{key}'")
    return table[key]


def zero_shot_prototypes(model, tokenizer, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """K × D: each class's prompts through the frozen text encoder, averaged, not normalised (fp32; computed
    where the text tower is)."""
    where = TextTower.of(model).positional_embedding.device
    with torch.no_grad():
        return torch.stack([model.encode_text(tokenizer([t.format(name) for t in templates]).to(where)).float()
                            .mean(0) for name in classnames])


class OnZeroShot(nn.Module):
    """A learner built on the zero-shot classifier (`base`, K × D: zero_shot_prototypes of `templates`); a
    subclass adds what it learns and names it in trainable()."""

    def __init__(self, model, tokenizer, classnames: list[str], templates: list[str]):
        super().__init__()
        self.classnames = list(classnames)
        self.register_buffer("base", zero_shot_prototypes(model, tokenizer, classnames, templates))

    def trainable(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in self.trainable().items():
                tensor.copy_(tensors[name])
