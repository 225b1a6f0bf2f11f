"""Composition: prompts that name two or more concepts.

Which tokens belong to which concept (`prompt`), the regions of each concept and their masks at every attention
resolution (`regions`), the cross-attention processor that lets each region read its own prompt and records the
concepts' attention maps (`attention`), isolated concept encodings spliced into `prompt_embeds` (`isolate`), and the
per-prompt plan that `generate.py` follows (`plan`). It depends on the family seam (`clif.models`) and nothing in it
knows the toy world.
"""
