"""LoRA adapters (peft) on the UNet / text encoders: adding, validating targets, saving for diffusers and kohya."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from . import artifacts
from .cli import UserError
from .concepts import Concept

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
    module: torch.nn.Module, *, rank: int, alpha: float, dropout: float, targets: list[str]
) -> list[torch.nn.Parameter]:
    """Add a peft LoRA adapter, cast its weights to fp32 (frozen base stays half); returns the trainable params."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets
    )
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


def _diffusers_layers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(module))


TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")


def save_lora(out: Path, model, text_lora: bool, unet: bool = True) -> None:
    """pytorch_lora_weights.safetensors via the pipeline's save_lora_weights, rank/alpha in the header; atomic."""
    kwargs = {}
    if unet:
        kwargs = {
            "unet_lora_layers": _diffusers_layers(model.unet),
            "unet_lora_adapter_metadata": model.unet.peft_config["default"].to_dict(),
        }
    if text_lora:
        names = ["text_encoder", "text_encoder_2"][: len(model.text_encoders)]
        for name, enc in zip(names, model.text_encoders):
            kwargs[f"{name}_lora_layers"] = _diffusers_layers(enc)
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
    for name, enc in zip(TEXT_ENCODER_NAMES, model.text_encoders):
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


def export_kohya(
    path: Path, model, alpha: float, text_lora: bool, concepts: list[Concept], rows: list[list[torch.Tensor]]
) -> None:
    """One A1111/ComfyUI file: kohya keys with the real alpha, embeddings bundled as bundle_emb.<name>.<key>."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft_sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(model.unet).items()}
    if text_lora:
        for name, enc in zip(["text_encoder", "text_encoder_2"], model.text_encoders):
            peft_sd.update({f"{name}.{k}": v for k, v in get_peft_model_state_dict(enc).items()})
    kohya = convert_state_dict_to_kohya(peft_sd)
    for k in [k for k in kohya if k.endswith(".alpha")]:
        kohya[k] = torch.tensor(float(alpha))  # diffusers writes alpha = rank; the scale needs the real one
    for c, r in zip(concepts, rows):
        if model.family == "sdxl":
            kohya[f"bundle_emb.{c.name}.clip_l"] = r[0]
            kohya[f"bundle_emb.{c.name}.clip_g"] = r[1]
        else:
            kohya[f"bundle_emb.{c.name}.string_to_param.*"] = r[0]
    kohya = {k: v.float() if v.is_floating_point() else v for k, v in kohya.items()}
    artifacts.atomic_save_safetensors(
        kohya,
        path,
        {
            "ss_network_dim": str(model.unet.peft_config["default"].r),
            "ss_network_alpha": str(alpha),
            "clif.family": model.family,
        },
    )
