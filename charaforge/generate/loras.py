"""LoRA files as the engine loads them: adapter names, A1111's short hash, file lookup."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charaforge.core.files import sha256_file
from charaforge.core.layout import LORA_WEIGHTS
from charaforge.models.sgm_names import TEXT_MODEL_LEVEL

# peft adapter types that diffusers' LoRA loader cannot read; the engine loads them through peft.
PEFT_ONLY_TYPES = ("LOHA", "LOKR")
LYCORIS_KEYS = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a")


def adapter_name(text: str) -> str:
    """A peft-safe adapter name (peft keeps adapters in module dicts: no dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def lora_short_hash(path: str | Path) -> str:
    """A1111's LoRA hash: SHA-256 of the safetensors data after its header, first 12 digits.

    A1111's Lora extension hashes `.safetensors` files with kohya's "addnet" hash (header
    skipped, so metadata edits keep the hash) and shows the first 12 hex digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header_length)
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class LoadedLora:
    """A loaded LoRA: the engine's adapter `name`, the `file` it was loaded from (its `sha256`),
    and how A1111 knows the same LoRA: `a1111_name` (the stem A1111 lists) and `short_hash`
    (A1111's hash of that file), which the PNG `parameters` carry."""

    name: str
    file: Path
    sha256: str
    short_hash: str
    trigger_words: tuple[str, ...] = ()
    a1111_name: str = ""


def a1111_lora_file(file: str | Path) -> Path:
    """The file A1111 and ComfyUI users load for this LoRA.

    A checkpoint folder holds diffusers' `pytorch_lora_weights.safetensors` and the kohya file
    beside it; A1111 reads the kohya one, so a PNG rendered from the diffusers file must name
    (and hash) its kohya sibling. Any other file is its own.
    """
    file = Path(file)
    if file.name == LORA_WEIGHTS:
        siblings = sorted(
            path for path in file.parent.glob("*.safetensors") if path.name != LORA_WEIGHTS
        )
        if len(siblings) == 1:
            return siblings[0]
    return file


def describe_lora(name: str, file: str | Path, trigger_words: tuple[str, ...] = ()) -> LoadedLora:
    """The record of a LoRA file loaded as adapter `name`, with its A1111 name and hash."""
    file = Path(file)
    a1111_file = a1111_lora_file(file)
    return LoadedLora(
        name=name,
        file=file,
        sha256=sha256_file(file),
        short_hash=lora_short_hash(a1111_file),
        trigger_words=tuple(trigger_words),
        a1111_name=a1111_file.stem,
    )


def peft_only_configs(file: str | Path) -> dict[str, dict[str, Any]] | None:
    """Per component, the peft config a diffusers-layout file stores (as our exporter and
    diffusers' `save_lora_weights` write it) when its adapter is LoHa or LoKr; None otherwise.

    A LyCORIS kohya file (`hada_*` / `lokr_*` keys) is refused: it is for A1111 and ComfyUI,
    and its checkpoint folder holds the peft file the engine loads.
    """
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata() or {}
        names = handle.keys()  # a safetensors handle is not iterable
    lycoris = any(key.endswith(LYCORIS_KEYS) for key in names)
    configs: dict[str, dict[str, Any]] = {}
    for key, value in json.loads(metadata.get(LORA_ADAPTER_METADATA_KEY, "{}")).items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    if any(config.get("peft_type") in PEFT_ONLY_TYPES for config in configs.values()):
        return configs
    if lycoris:
        raise ValueError(
            f"{Path(file).name}: a LyCORIS (LoHa/LoKr) file in kohya naming; load its checkpoint "
            f"folder (or its {LORA_WEIGHTS}) instead"
        )
    return None


def load_peft_only_adapter(pipeline: Any, name: str, file: str | Path) -> bool:
    """Load a LoHa/LoKr file as adapter `name` through peft (False: not such a file).

    Each component gets peft's own config from the file and the saved weights, so diffusers'
    `set_adapters`, `disable_lora`, `delete_adapters` and `fuse_lora` treat it as any LoRA.
    """
    from peft import PeftConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    configs = peft_only_configs(file)
    if configs is None:
        return False
    tensors = load_file(str(file))
    for component, fields in configs.items():
        model = getattr(pipeline, component)
        model.add_adapter(PeftConfig.from_peft_type(**fields), adapter_name=name)
        # Text-encoder keys carry CLIP's `text_model` level (the standard layout); a flattened
        # transformers CLIPTextModel has none.
        level = f"{TEXT_MODEL_LEVEL}." if not hasattr(model, TEXT_MODEL_LEVEL) else None
        state = {}
        for key, tensor in tensors.items():
            owner, _, module_key = key.partition(".")
            if owner == component:
                if level and module_key.startswith(level):
                    module_key = module_key[len(level) :]
                state[module_key] = tensor
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        if result.unexpected_keys:
            raise ValueError(f"{Path(file).name}: {component} has no module for "
                             f"{result.unexpected_keys[0]}")  # fmt: skip
    return True


_PLAIN_LORA = (".lora_A.weight", ".lora_B.weight")


def hotswappable(loaded: str | Path, new: str | Path) -> bool:
    """Whether the LoRA file `new` can take over the peft layers that `loaded` built (diffusers'
    hotswap: its tensors copied into them, nothing re-injected): the same tensor names, shapes and
    dtypes, the same metadata and alphas (so the same config and scaling), UNet keys only
    with plain LoRA keys (`unet.<module>.lora_A.weight`, `.lora_B.weight`: no DoRA, LoHa, LoKr)."""
    from safetensors import safe_open

    def layout(file: str | Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        with safe_open(str(file), "pt") as handle:
            names = handle.keys()  # a safetensors handle is not iterable
            shapes = {key: handle.get_slice(key) for key in names}
            described = {key: (tuple(s.get_shape()), s.get_dtype()) for key, s in shapes.items()}
            alphas = {key: handle.get_tensor(key) for key in described if key.endswith("alpha")}
            return handle.metadata() or {}, described, alphas

    old_metadata, old_tensors, old_alphas = layout(loaded)
    new_metadata, new_tensors, new_alphas = layout(new)
    return (
        old_metadata == new_metadata
        and old_tensors == new_tensors
        and all(key.startswith("unet.") and key.endswith(_PLAIN_LORA) for key in new_tensors)
        and old_alphas.keys() == new_alphas.keys()
        and all(bool((old_alphas[k] == new_alphas[k]).all()) for k in old_alphas)
        and peft_only_configs(new) is None
    )


def copy_lora_weights(unet: Any, adapter: str, file: str | Path) -> None:
    """Copy a `hotswappable` file's tensors into the UNet's peft adapter `adapter` (in place, so
    the layers, their scaling and everything holding them stay as they are)."""
    import torch
    from safetensors.torch import load_file

    with torch.no_grad():
        for key, tensor in load_file(str(file)).items():
            module, _, leaf = key.removeprefix("unet.").rpartition(".")  # ...to_q.lora_A, weight
            getattr(unet.get_submodule(f"{module}.{adapter}"), leaf).copy_(tensor)


def text_encoders_patched(pipeline: Any) -> bool:
    """Whether a loaded LoRA reaches into a text encoder (then prompt embeddings depend on it)."""
    encoders = (
        getattr(pipeline, "text_encoder", None),
        getattr(pipeline, "text_encoder_2", None),
    )
    return any(getattr(encoder, "peft_config", None) for encoder in encoders)


def lora_file(path: str | Path) -> Path:
    """A LoRA file given as a .safetensors file or a checkpoint folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights not found: {path}")
    return path


# A1111's prompt syntax: `<lora:NAME>` or `<lora:NAME:WEIGHT>` (a third `:...` field, A1111's
# separate UNet weight, is refused rather than silently read as something else).
_LORA_TAG = re.compile(r"<lora:([^<>:]*)((?::[^<>:]*)*)>", re.IGNORECASE)
_MAX_PROMPT_LORAS = 8


def parse_prompt_loras(prompt: str) -> tuple[str, dict[str, float | None]]:
    """Split `<lora:name:weight>` tags out of a prompt: (the prompt without them, {name: weight}).

    A tag without a weight maps to None (the LoRA's default scale). A malformed tag, a weight
    that is not a finite number, or a name given twice is a ValueError naming the tag: a tag is
    never silently ignored.
    """
    import math

    loras: dict[str, float | None] = {}
    for match in _LORA_TAG.finditer(prompt):
        tag, name, rest = match.group(0), match.group(1).strip(), match.group(2)
        fields = [part.strip() for part in rest.split(":")[1:]] if rest else []
        if not name or len(fields) > 1:
            raise ValueError(
                f"prompt LoRA tag {tag[:80]!r}: write <lora:NAME> or <lora:NAME:WEIGHT>"
            )
        try:
            weight = float(fields[0]) if fields else None
        except ValueError:
            raise ValueError(f"prompt LoRA tag {tag[:80]!r}: the weight is not a number") from None
        if weight is not None and not math.isfinite(weight):
            raise ValueError(f"prompt LoRA tag {tag[:80]!r}: the weight must be finite")
        if name in loras:
            raise ValueError(f"prompt names LoRA {name!r} twice")
        loras[name] = weight
    if len(loras) > _MAX_PROMPT_LORAS:
        raise ValueError(f"prompt names {len(loras)} LoRAs; at most {_MAX_PROMPT_LORAS}")
    if not loras:
        return prompt, {}
    # Remove the tags and the separators they leave behind ("a, <lora:x:1>, b" -> "a, b").
    parts = [part.strip() for part in _LORA_TAG.sub(",", prompt).split(",")]
    return ", ".join(part for part in parts if part), loras


def compose_loras(
    requested: Mapping[str, float | None], from_prompt: Mapping[str, float | None]
) -> dict[str, float | None]:
    """The LoRAs of one request: those given as a field and those tagged in its prompt. A LoRA
    given both ways with different weights is ambiguous (ValueError); equal weights are one."""
    composed = dict(requested)
    for name, weight in from_prompt.items():
        if weight is None and name in composed:
            continue
        if composed.get(name) is not None and composed[name] != weight:
            raise ValueError(
                f"LoRA {name!r} is given as {composed[name]} and as <lora:{name}:{weight}>"
            )
        composed[name] = weight
    return composed
