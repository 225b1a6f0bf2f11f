"""Byte-compile what the project imports, nothing else (scripts/setup.sh runs it after `pip install --no-compile`).

pip byte-compiles every file of every package it installs: about 45 s on 2 cores for torch, transformers and
diffusers, most of it for modules the project never imports. Importing the project's modules once, with bytecode
writing on, compiles just those (about 20 s); a module imported later that is not listed here is compiled when it is
first imported, as Python does."""

from __future__ import annotations

import importlib
import pkgutil

SCRIPTS = ["train_clif", "train_ti", "train_lora", "inference", "evaluate"]
LIBRARIES = [
    "torch._dynamo",
    "torch._inductor.compile_fx",
    "open_clip",
    "matplotlib.pyplot",
    "skimage",
    "torchvision.ops",
    "scipy.optimize",
    "peft",
    "accelerate",
]
CLASSES = {  # the classes the scripts load (both packages import them lazily)
    "diffusers": [
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "UNet2DConditionModel",
        "AutoencoderKL",
        "DDPMScheduler",
        "DDIMScheduler",
    ],
    "transformers": [
        "CLIPModel",
        "CLIPTextModel",
        "CLIPTextModelWithProjection",
        "CLIPTokenizer",
        "CLIPSegForImageSegmentation",
        "Owlv2ForObjectDetection",
        "Owlv2Processor",
        "AutoModel",
    ],
}


def main() -> None:
    import clif

    for name in (*SCRIPTS, *LIBRARIES):
        importlib.import_module(name)
    for info in pkgutil.walk_packages(clif.__path__, "clif."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for package, names in CLASSES.items():
        module = importlib.import_module(package)
        for name in names:
            getattr(module, name)


if __name__ == "__main__":
    main()
