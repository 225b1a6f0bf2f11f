"""The composition options of inference.py, checked against the prompts before anything loads, and the per-prompt
plan that generation follows: what the pipeline is called with, what the processors read, what the sidecar says."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from clif.errors import UserError

from . import isolate
from . import prompt as words
from .attention import ComposeState, install
from .regions import Box, parse_boxes

REGIONS = ("none", "auto", "attention")
ATTENTION_WARMUP = 0.2  # --regions attention: the share of steps that read the maps when --region_steps starts at 0
REGION_PROMPTS = ("same", "class", "alone")


@dataclass(frozen=True)
class Options:
    """Composition options; the defaults are inference.py's (chosen by the toy-world evidence, docs/toyworld.md)."""

    regions: str = "auto"  # 'auto': boxes from the layout words, else reading order; 'none': no regions
    boxes: dict[str, Box] = field(default_factory=dict)  # user boxes (they turn regions on)
    region_prompt: str = "class"
    region_mode: str = "prompt"  # 'prompt': region prompts; 'bias': other concepts' tokens hidden in a region
    region_steps: tuple[float, float] = (0.0, 1.0)
    region_strength: float = 1.0
    region_overlap: str = "mean"
    isolate: str = "none"
    isolate_weight: float = 1.0
    isolate_end: str = "keep"
    save_prompt_embeds: bool = False
    save_attention_maps: bool = False

    @property
    def regional(self) -> bool:
        return self.regions != "none" or bool(self.boxes)

    def default_flags(self) -> str:
        """The flags that name what these options do to a multi-concept prompt ('' when nothing)."""
        flags = [f"--regions {self.regions} --region_prompt {self.region_prompt}"] if self.regional else []
        flags += [f"--isolate {self.isolate}"] if self.isolate != "none" else []
        return " ".join(flags)

    @classmethod
    def from_sidecar(cls, comp: dict) -> Options:
        """The options an image's sidecar "composition" records (its regions as boxes): what re-makes it."""
        r, i = comp.get("regions") or {}, comp.get("isolation") or {}
        return cls(
            regions="attention" if r.get("source") == "attention maps" else "none",
            boxes={t: tuple(b) for t, b in (r.get("boxes") or {}).items()},
            region_prompt=r.get("region_prompt", "same"),
            region_mode=r.get("mode", "prompt"),
            region_steps=tuple(r.get("steps", (0.0, 1.0))),
            region_strength=r.get("strength", 1.0),
            region_overlap=r.get("overlap", "mean"),
            isolate=i.get("by", "none"),
            isolate_weight=i.get("weight", 1.0),
            isolate_end=i.get("end", "keep"),
        )


def _steps(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not START:END (fractions of the steps, e.g. 0:0.5)") from None
    if not 0 <= a < b <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= START < END <= 1 (fractions of the steps)")
    return a, b


def add_args(p: argparse.ArgumentParser) -> None:
    """The composition flags (prompts that name two or more concepts; single-concept prompts run as before)."""
    from clif.cli import number

    unit, d = number(float, 0.0, 1.0), Options()
    g = p.add_argument_group("prompts with two or more concepts")
    g.add_argument(
        "--regions",
        choices=REGIONS,
        default=d.regions,
        help="Regional prompts: 'auto' places each concept by the prompt's layout words (left/right/above/below), "
        "else in reading order left to right; 'attention' where its own tokens are attended to in the first steps "
        "(no boxes, no layout words).",
    )
    g.add_argument(
        "--region_box",
        action="append",
        default=[],
        metavar="TOKEN=x0,y0,x1,y1",
        help="A concept's region in fractions of the image (repeatable; turns regions on).",
    )
    g.add_argument(
        "--region_prompt",
        choices=REGION_PROMPTS,
        default=d.region_prompt,
        help="What a region reads: 'same' = "
        "the prompt with every concept set to the region's; 'class' = the others as their class words; "
        "'alone' = 'a photo of a <concept>'.",
    )
    g.add_argument(
        "--region_mode",
        choices=["prompt", "bias"],
        default=d.region_mode,
        help="'prompt': region prompts; 'bias': the global prompt, each concept's tokens hidden outside its region.",
    )
    g.add_argument(
        "--region_steps",
        type=_steps,
        default=d.region_steps,
        metavar="START:END",
        help="The denoising steps (fractions) on which regions act.",
    )
    g.add_argument(
        "--region_strength",
        type=unit,
        default=d.region_strength,
        help="Blend of region and global outputs in a region.",
    )
    g.add_argument(
        "--region_overlap",
        choices=["mean", "global"],
        default=d.region_overlap,
        help="Pixels in two regions: their mean, or the global prompt.",
    )
    g.add_argument(
        "--isolate",
        choices=("none", *isolate.BY),
        default=d.isolate,
        help="Encode each concept without "
        "the others (mask: hidden by attention; pad: replaced by padding; alone: 'a <c>') and splice.",
    )
    g.add_argument(
        "--isolate_weight", type=unit, default=d.isolate_weight, help="Weight of the isolated states in the splice."
    )
    g.add_argument(
        "--isolate_end",
        choices=isolate.END,
        default=d.isolate_end,
        help="End/padding states: keep, or take from the prompt with the concept tokens hidden ('clean').",
    )
    g.add_argument(
        "--save_prompt_embeds",
        action="store_true",
        help="Write <stem>.embeds.safetensors: what stock diffusers re-makes the image from.",
    )
    g.add_argument(
        "--save_attention_maps",
        action="store_true",
        help="Write <stem>.attention.png: each concept's cross-attention, mean over layers and steps.",
    )


def options_from_args(args) -> Options:
    """inference.py's flags: one per field, named as the field, except --region_box (parsed into `boxes`)."""
    flags = {f.name: getattr(args, f.name) for f in fields(Options) if f.name != "boxes"}
    return Options(**{**flags, "boxes": parse_boxes(args.region_box), "region_steps": tuple(args.region_steps)})


@dataclass
class PromptPlan:
    prompt: str
    named: list[str]  # the concept tokens it names, in reading order
    boxes: dict[str, Box] | None = None
    source: str | None = None
    region_prompts: dict[str, str] | None = None
    from_maps: bool = False  # regions found from the attention maps of the first steps

    @property
    def multi(self) -> bool:
        return len(self.named) >= 2


def plan_prompts(prompts: list[str], concepts: list[dict], opts: Options) -> list[PromptPlan]:
    """Every prompt's concepts, regions and region prompts, with every option checked (UserError) before anything
    loads or is written."""
    tokens = [c["token"] for c in concepts]
    classes = {c["token"]: c.get("class") or c.get("initializer") or "object" for c in concepts}
    for t in opts.boxes:
        if t not in tokens:
            raise UserError(
                f"--region_box: {t} is not a concept of --stage_dir (it has: {', '.join(tokens) or 'none'})"
            )
    plans = [PromptPlan(p, words.named_concepts(p, tokens)) for p in prompts]
    for t in opts.boxes:
        if not any(t in pl.named for pl in plans):
            raise UserError(f"--region_box: no prompt names {t}")
    for pl in plans:
        if not (pl.multi and opts.regional):
            continue
        given = [t for t in pl.named if t in opts.boxes]
        if given and len(given) < len(pl.named):
            missing = [t for t in pl.named if t not in opts.boxes]
            raise UserError(
                f"--region_box: prompt {pl.prompt!r} names {', '.join(pl.named)} but only {', '.join(given)} has a "
                f"box; give {', '.join(missing)} a box too (or none, and use --regions auto)"
            )
        if given:
            pl.boxes, pl.source = {t: opts.boxes[t] for t in pl.named}, "user boxes"
        elif opts.regions == "attention":
            if opts.region_mode != "prompt":
                raise UserError("--regions attention needs --region_mode prompt")
            pl.from_maps, pl.source = True, "attention maps"
        else:
            pl.boxes, pl.source = words.auto_boxes(pl.prompt, pl.named)
        pl.region_prompts = {
            t: words.region_prompt(pl.prompt, t, pl.named, opts.region_prompt, classes) for t in pl.named
        }
    return plans


class Composer:
    """Runs the plans on a loaded pipeline: the composed call's inputs, the processors' state, the extra files."""

    def __init__(self, pipe, model, opts: Options, *, lora_scale: float | None, latent_hw: tuple[int, int]):
        self.pipe, self.model, self.opts = pipe, model, opts
        self.enc = isolate.Encoder(pipe, model, lora_scale)
        self.state = ComposeState(latent_hw=latent_hw)
        if opts.regional or opts.save_attention_maps:
            install(pipe.unet, self.state)
        self._embeds: dict[str, tuple] = {}
        self._regions: dict[str, torch.Tensor] = {}  # prompt -> its region prompts' states

    def embeds(self, plan: PromptPlan):
        """(prompt_embeds, pooled) this plan is generated from, or None when the pipeline encodes the prompt."""
        o = self.opts
        if plan.prompt not in self._embeds:
            if o.isolate != "none" and plan.multi:
                e, pooled, _ = isolate.isolated(
                    self.enc, plan.prompt, plan.named, by=o.isolate, weight=o.isolate_weight, end=o.isolate_end
                )
                self._embeds[plan.prompt] = (e, pooled)
            elif o.save_prompt_embeds:
                self._embeds[plan.prompt] = self.enc.encode(self.enc.ids([plan.prompt]))
            else:
                self._embeds[plan.prompt] = None
        return self._embeds[plan.prompt]

    def inputs(self, plan: PromptPlan, n: int, steps: int) -> dict:
        """The pipeline call's prompt inputs for `n` images, with the processors set up for this call."""
        st, o = self.state, self.opts
        st.n_images, st.step, st.maps, st.calls, st._weights = n, 0, None, 0, {}
        st.boxes, st.region_states, st.hidden, st.record = [], None, [], None
        emb = self.embeds(plan)
        call = {"prompt": [plan.prompt] * n} if emb is None else self.model.pipeline_embeds(*emb, n)
        ids = self.enc.ids([plan.prompt])[0][0]
        glob = {t: self.enc.positions(ids, t) for t in plan.named}
        st.masks, start = None, o.region_steps[0]
        if plan.boxes or plan.from_maps:
            st.boxes = [plan.boxes[t] for t in plan.named] if plan.boxes else []
            st.mode, st.overlap, st.strength = o.region_mode, o.region_overlap, o.region_strength
            start = start or (ATTENTION_WARMUP if plan.from_maps else 0.0)
            st.window = (max(round(start * steps), int(plan.from_maps)), round(o.region_steps[1] * steps))
            rp = [plan.region_prompts[t] for t in plan.named]
            if o.region_mode == "prompt":  # encoded once per prompt, not once per batch
                if plan.prompt not in self._regions:
                    self._regions[plan.prompt] = self.enc.encode(self.enc.ids(rp))[0]
                st.region_states = self._regions[plan.prompt]
            st.hidden = [[q for u in plan.named if u != t for q in glob[u]] for t in plan.named]
        if (o.save_attention_maps or plan.from_maps) and plan.named:
            rp_ids = self.enc.ids([plan.region_prompts[t] for t in plan.named])[0] if plan.region_prompts else []
            st.record = [(glob[c], [self.enc.positions(r, c) for r in rp_ids]) for c in plan.named]
        keep_recording = o.save_attention_maps

        def step_done(pipe, i, t, kw):
            st.step = i + 1
            if plan.from_maps and st.step == st.window[0]:  # the first steps' maps place the concepts
                st.regions_from_maps()
                st.record = st.record if keep_recording else None
            return kw

        return {**call, "callback_on_step_end": step_done}

    def sidecar(self, plan: PromptPlan) -> dict:
        o = self.opts
        regions = None
        if plan.boxes or plan.from_maps:
            regions = {
                "boxes": {t: list(b) for t, b in plan.boxes.items()} if plan.boxes else None,
                "source": plan.source,
                "prompts": plan.region_prompts,
                "region_prompt": o.region_prompt,
                "mode": o.region_mode,
                "steps": list(o.region_steps),
                "strength": o.region_strength,
                "overlap": o.region_overlap,
            }
        iso = None
        if o.isolate != "none" and plan.multi:
            iso = {"by": o.isolate, "weight": o.isolate_weight, "end": o.isolate_end}
        return {"concepts": plan.named, "multi_concept": plan.multi, "regions": regions, "isolation": iso}

    def save_extras(self, plan: PromptPlan, k: int, stem: Path, image) -> dict:
        """The files beside image k of the last call (embeddings, attention maps); their names for the sidecar."""
        from clif.outputs.artifacts import atomic_save_safetensors

        files = {}
        emb = self.embeds(plan) if self.opts.save_prompt_embeds else None
        if emb is not None:
            tensors = {"prompt_embeds": emb[0][0].contiguous()}
            if emb[1] is not None:
                tensors["pooled_prompt_embeds"] = emb[1][0].contiguous()
            atomic_save_safetensors(tensors, stem.with_suffix(".embeds.safetensors"))
            files["prompt_embeds"] = stem.name + ".embeds.safetensors"
        st = self.state
        if self.opts.save_attention_maps and st.maps is not None:
            from .maps import save_maps

            maps = st.maps[k] / max(st.calls, 1)
            save_maps(image, maps, plan.named, stem.with_suffix(".attention.png"))
            atomic_save_safetensors({"maps": maps.contiguous()}, stem.with_suffix(".attention.safetensors"))
            files["attention_maps"] = stem.name + ".attention.png"
        return files
