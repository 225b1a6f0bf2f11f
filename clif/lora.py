"""LoRA adapters (peft) on the UNet / text encoders: adding, validating targets, saving for diffusers and kohya."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from clif.concepts import Concept
from clif.errors import UserError
from clif.outputs import artifacts

DEFAULT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_FILE = "pytorch_lora_weights.safetensors"


def check_targets(module: torch.nn.Module, targets: list[str], what: str) -> None:
    """UserError when a target names no Linear/Conv layer of `module` (peft would fail later, less clearly)."""
    names = [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise UserError(
            f"--lora_targets: {', '.join(unknown)} match no layer of the {what} "
            f"(e.g. {', '.join(DEFAULT_UNET_TARGETS + ['proj_in', 'ff.net.2'])})"
        )


def add_lora(
    module: torch.nn.Module, *, rank: int, alpha: float, dropout: float, targets: list[str], seed: int
) -> list[torch.nn.Parameter]:
    """Add a peft LoRA adapter, cast its weights to fp32 (frozen base stays half); returns the trainable params.

    The random init of the down-weights comes from `seed` (the run's `lora_init` stream, clif/seeds.py), not the
    global RNG: every process of a multi-process run starts from the same adapter, and two runs with the same
    arguments are equal.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets
    )
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if hasattr(module, "add_adapter") and hasattr(module, "set_adapters"):  # diffusers models
            module.add_adapter(config)
        else:  # transformers 5.24's add_adapter demands peft >= 0.22, unreleased: inject with peft directly
            inject_adapter_in_model(config, module)
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def named_lora_params(module: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Parameter]:
    return {f"{prefix}.{n}": p for n, p in module.named_parameters() if p.requires_grad and "lora_" in n}


def text_targets(enc: torch.nn.Module, last_layer_read: bool) -> list[str]:
    """The attention projections (TEXT_TARGETS) of a text encoder, by full module name; without those of its last
    layer when generation never reads that layer's output (a LoRA there would receive no gradient)."""
    last = f"layers.{enc.config.num_hidden_layers - 1}."
    return [
        n
        for n, m in enc.named_modules()
        if isinstance(m, torch.nn.Linear)
        and n.rsplit(".", 1)[-1] in TEXT_TARGETS
        and (last_layer_read or f".{last}" not in f".{n}")
    ]


def add_text_loras(model, *, rank: int, alpha: float, dropout: float, seed: int) -> list[torch.nn.Parameter]:
    """A new LoRA on the attention (TEXT_TARGETS) of every text encoder of `model`, except layers whose output
    generation never reads (model.text_last_layer_read); returns the trainable params."""
    return [
        p
        for enc, read in zip(model.text_encoders, model.text_last_layer_read)
        for p in add_lora(enc, rank=rank, alpha=alpha, dropout=dropout, targets=text_targets(enc, read), seed=seed)
    ]


def text_lora_trainables(text_encoders: list[torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """The trainable text-encoder LoRA tensors under their checkpoint names (text_encoder.<i>.<name>)."""
    return {k: p for i, enc in enumerate(text_encoders) for k, p in named_lora_params(enc, f"text_encoder.{i}").items()}


def text_state_dict(enc: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft LoRA state of a text encoder, keys under `text_model.` as in files in the wild and in the tools.

    transformers 5's CLIPTextModel has no `text_model` submodule (CLIPTextModelWithProjection has one);
    diffusers' loader strips the prefix again where the module lacks it.
    """
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(enc)
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def _diffusers_layers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers

    return convert_state_dict_to_diffusers(state)


def save_lora(out: Path, model, text_lora: bool, unet: bool = True) -> None:
    """pytorch_lora_weights.safetensors via the pipeline's save_lora_weights, rank/alpha in the header; atomic."""
    from peft.utils import get_peft_model_state_dict

    kwargs = {}
    if unet:
        kwargs = {
            "unet_lora_layers": _diffusers_layers(get_peft_model_state_dict(model.unet)),
            "unet_lora_adapter_metadata": model.unet.peft_config["default"].to_dict(),
        }
    if text_lora:
        for name, enc in zip(model.text_encoder_names, model.text_encoders):
            kwargs[f"{name}_lora_layers"] = _diffusers_layers(text_state_dict(enc))
            kwargs[f"{name}_lora_adapter_metadata"] = enc.peft_config["default"].to_dict()
    with tempfile.TemporaryDirectory(dir=out, prefix=".lora-") as tmp:
        model.pipeline_class.save_lora_weights(tmp, safe_serialization=True, **kwargs)
        shutil.move(str(Path(tmp) / LORA_FILE), str(out / LORA_FILE))


def load_text_lora(stage_dir: str | Path, model) -> bool:
    """Load the text-encoder LoRA of an earlier stage's output (frozen) into the model's text encoders.

    Returns False when the stage dir has no LoRA file or it holds no text-encoder layers.
    """
    path = Path(stage_dir) / LORA_FILE
    if not path.exists():
        return False
    artifacts.check_safetensors(path)
    state, alphas, metadata = model.pipeline_class.lora_state_dict(str(path), return_lora_metadata=True)
    found = False
    for name, enc in zip(model.text_encoder_names, model.text_encoders):
        if any(k.startswith(f"{name}.") for k in state):
            model.pipeline_class.load_lora_into_text_encoder(
                state, alphas, text_encoder=enc, prefix=name, adapter_name="default", metadata=metadata
            )
            enc.requires_grad_(False)
            found = True
    return found


def make_trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Unfreeze (and cast to fp32) the LoRA weights already in `module`."""
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def kohya_keys(state: dict[str, torch.Tensor], prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """peft `<module path>.lora_A/B.weight` -> kohya `<prefix>_<path with _>.lora_down/up.weight` + `.alpha`.

    The naming rule of kohya's networks/lora.py, which A1111 and ComfyUI read back.
    """
    out = {}
    for key, value in state.items():
        path, kind = key.rsplit(".lora_", 1)
        name = f"{prefix}_{path.replace('.', '_')}"
        out[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))  # diffusers would write alpha = rank: the scale needs ours
    return out


def export_kohya(
    path: Path, model, alpha: float, text_lora: bool, concepts: list[Concept], rows: list[list[torch.Tensor]]
) -> None:
    """One A1111/ComfyUI file: kohya keys with the real alpha and metadata, embeddings bundled as bundle_emb.<name>.*"""
    from peft.utils import get_peft_model_state_dict

    kohya = kohya_keys(get_peft_model_state_dict(model.unet), "lora_unet", alpha)
    if text_lora:
        for prefix, enc in zip(model.kohya_text_prefixes, model.text_encoders):
            kohya.update(kohya_keys(text_state_dict(enc), prefix, enc.peft_config["default"].lora_alpha))
    # A1111's bundle: SD `string_to_param.*` (its .pt layout), SDXL one key per text encoder (clip_l, clip_g)
    emb_keys = artifacts.ENCODER_KEYS[model.family] or ["string_to_param.*"]
    for c, r in zip(concepts, rows):
        kohya.update({f"bundle_emb.{c.name}.{k}": t for k, t in zip(emb_keys, r)})
    kohya = {k: v.float() if v.is_floating_point() else v for k, v in kohya.items()}
    rank = model.unet.peft_config["default"].r
    metadata = {
        **model.kohya_metadata(),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "clif.family": model.family,
    }
    artifacts.atomic_save_safetensors(kohya, path, metadata)
