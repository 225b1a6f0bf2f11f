"""Loading a base pipeline and the one seam between SD 1.x/2.x and SDXL."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clif.errors import UserError, loading
from clif.validate import read_json


def _read_model_index(path: str, revision: str | None) -> dict:
    """model_index.json of a local folder or a hub id (offline cache allowed); UserError when absent."""
    local = Path(path)
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise UserError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return read_json(local / "model_index.json")
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise UserError(f"model folder {path} does not exist")
    from diffusers import DiffusionPipeline

    with loading("model", path, errors=(Exception,)):  # hub / network errors come in many types
        return dict(DiffusionPipeline.load_config(path, revision=revision))


def detect_family(path: str, revision: str | None = None) -> str:
    """'sdxl' when the pipeline has a second text encoder, else 'sd'."""
    index = _read_model_index(path, revision)
    if "unet" not in index or "text_encoder" not in index:
        raise UserError(f"{path} is not a Stable Diffusion pipeline (class {index.get('_class_name')})")
    return "sdxl" if index.get("text_encoder_2") and index["text_encoder_2"][0] else "sd"


def read_text_side(path: str, family: str, revision: str | None = None) -> tuple[list, list[int]]:
    """The tokenizers and the text encoders' embedding widths, from the tokenizer and config files only: what
    can be checked (tokens, names, embedding shapes) is checked before any weights load."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    names = _encoder_names(2 if family == "sdxl" else 1)
    with loading("model", path):
        tokenizers = [
            CLIPTokenizer.from_pretrained(path, subfolder=n.replace("text_encoder", "tokenizer"), revision=revision)
            for n in names
        ]
        widths = [CLIPTextConfig.from_pretrained(path, subfolder=n, revision=revision).hidden_size for n in names]
    return tokenizers, widths


@dataclass
class DiffusionModel:
    """Tokenizers, text encoders, UNet, VAE and noise scheduler of one base model, family hidden behind methods."""

    family: str
    base: str
    tokenizers: list
    text_encoders: list
    unet: torch.nn.Module | None  # None when loaded text_only
    vae: torch.nn.Module | None
    noise_scheduler: object
    _ids: dict = field(default_factory=dict, repr=False)  # caption -> token ids: captions repeat every epoch

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def text_encoder_names(self) -> list[str]:
        """The pipeline's component names of the text encoders ('text_encoder', 'text_encoder_2')."""
        return _encoder_names(len(self.text_encoders))

    @property
    def kohya_text_prefixes(self) -> list[str]:
        """kohya/A1111/ComfyUI key prefix of each text encoder: SD 1.x/2.x 'lora_te', SDXL 'lora_te1'/'lora_te2'."""
        if len(self.text_encoders) == 1:
            return ["lora_te"]
        return [f"lora_te{i + 1}" for i in range(len(self.text_encoders))]

    def kohya_metadata(self) -> dict[str, str]:
        """The kohya header fields by which A1111 and others tell the base model (sd_v1, sd_v2[_v], sdxl_base_v1-0)."""
        if self.family == "sdxl":
            return {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}
        # SD 2.x uses the OpenCLIP ViT-H text tower (width 1024); SD 1.x CLIP ViT-L (768)
        v2 = self.text_encoders[0].config.hidden_size == 1024
        version = ("sd_v2" if v2 else "sd_v1") + ("_v" if self.prediction_type == "v_prediction" else "")
        return {"ss_base_model_version": version, "ss_v2": str(v2)}

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline if self.family == "sdxl" else StableDiffusionPipeline

    @property
    def text_last_layer_read(self) -> list[bool]:
        """Per text encoder: whether generation reads its last layer's output. SDXL conditions on the penultimate
        hidden states of both encoders and on text encoder 2's pooled projection (its last layer): text encoder 1's
        last layer is never read, so nothing trainable (LoRA) goes there."""
        return [not (self.family == "sdxl" and i == 0) for i in range(len(self.text_encoders))]

    def text_components(self) -> dict:
        """The tokenizer/text-encoder arguments of the family's pipeline class (SD: no safety checker)."""
        comps = {}
        for i, name in enumerate(self.text_encoder_names):
            comps[name] = self.text_encoders[i]
            comps[name.replace("text_encoder", "tokenizer")] = self.tokenizers[i]
        return {**comps, **pipeline_extras(self.family)}

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids of `prompts` for each tokenizer, padded to 77 (memoised per caption)."""
        for p in prompts:
            if p not in self._ids:
                self._ids[p] = [
                    tok(
                        p, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
                    ).input_ids[0]
                    for tok in self.tokenizers
                ]
        return [torch.stack([self._ids[p][i] for p in prompts]) for i in range(len(self.tokenizers))]

    def encode_prompt(
        self, input_ids: list[torch.Tensor], attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the UNet is conditioned on: (hidden states, pooled embedding or None), as the pipelines compute it.
        `attention_mask` ([N, T], 0 = hidden) hides tokens from every encoder (isolated concept encoding)."""
        kw = {} if attention_mask is None else {"attention_mask": attention_mask.to(self.text_encoders[0].device)}
        if self.family == "sd":
            enc = self.text_encoders[0]
            return enc(input_ids[0].to(enc.device), **kw)[0], None
        hidden, pooled = [], None
        for enc, ids in zip(self.text_encoders, input_ids):
            out = enc(ids.to(enc.device), output_hidden_states=True, **kw)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection encoder (the last one)
        return torch.cat(hidden, dim=-1), pooled

    def pipeline_embeds(self, hidden: torch.Tensor, pooled: torch.Tensor | None, n: int) -> dict:
        """The stock pipeline's arguments for `n` images of one encoded prompt (SDXL: with its pooled embedding)."""
        call = {"prompt_embeds": hidden.repeat(n, 1, 1)}
        if self.family == "sdxl":
            call["pooled_prompt_embeds"] = pooled.repeat(n, 1)
        return call

    def unet_kwargs(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict:
        """Extra UNet inputs: SDXL's pooled text embedding and size/crop time ids."""
        if self.family == "sd":
            return {}
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}}

    def fingerprint(self) -> str:
        """A short hash of the text encoders' vocabulary rows: identifies the base model wherever it is stored."""
        return fingerprint(self.text_encoders)


def _encoder_names(n: int) -> list[str]:
    return ["text_encoder" + (f"_{i + 1}" if i else "") for i in range(n)]


def pipeline_extras(family: str) -> dict:
    """Extra pipeline arguments of a family: SD 1.x/2.x pipelines are built without the safety checker."""
    return (
        {}
        if family == "sdxl"
        else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )


def from_pipeline(pipe, family: str, base: str) -> DiffusionModel:
    """The components of a loaded diffusers pipeline, seen through the family seam (inference uses stock pipelines)."""
    names = _encoder_names(2 if family == "sdxl" else 1)
    return DiffusionModel(
        family,
        base,
        [getattr(pipe, n.replace("text_encoder", "tokenizer")) for n in names],
        [getattr(pipe, n) for n in names],
        pipe.unet,
        pipe.vae,
        pipe.scheduler,
    )


def fingerprint(text_encoders: list) -> str:
    """Hash of the first vocabulary rows of each text encoder."""
    h = hashlib.sha256()
    for enc in text_encoders:
        # hashed at fp16 so that a pipeline loaded in half precision has the same fingerprint
        w = enc.get_input_embeddings().weight[:2048].detach().cpu().to(torch.float16).contiguous()
        h.update(w.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def quiet_loading() -> None:
    """No per-file loading bars: our own progress bars and one-line errors stay readable."""
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def load_model(
    path: str, *, revision: str | None = None, variant: str | None = None, text_only: bool = False
) -> DiffusionModel:
    """Load the components of a SD 1.x/2.x or SDXL pipeline (hub id or local folder) for training, on CPU, fp32.

    `text_only` skips the UNet and VAE (stage 1 needs only tokenizers and text encoders).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    quiet_loading()
    family = detect_family(path, revision)
    kw = {"revision": revision}
    # fp32 whatever the files hold: transformers would keep a text encoder stored in fp16 in fp16 (diffusers casts
    # to fp32); the stages cast the frozen weights themselves and train in fp32
    weights = {**kw, "variant": variant, "dtype": torch.float32}
    with loading("model", path):
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)]
        encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights)]
        if family == "sdxl":
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **weights))
        unet = vae = None
        if not text_only:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    for m in (*encoders, unet, vae):
        if m is None:
            continue
        m.requires_grad_(False)
        m.eval()
    return DiffusionModel(family, path, tokenizers, encoders, unet, vae, scheduler)
