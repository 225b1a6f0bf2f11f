"""--torch_compile (issue 18): the compiled UNet step of stages 2 and 3, on the tiny models, on CPU (inductor).

A compiled run's losses equal the eager run's within TOL; a resumed compiled run ends bit-identical to an
uninterrupted compiled run; what the compiled step cannot serve is refused in one line before anything is written.
The first compiled run in a fresh inductor cache compiles for about a minute per graph on two CPU cores, a cost per
distinct kernel: the compiled runs use tiny models whose UNet keeps only its cross-attention level (about half the
kernels of the two-level tiny UNet; `clif.fixtures.tiny.build(..., unet_levels=1)`), and scalar kernels (below).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import lora_args, run_cli, ti_args
from safetensors.torch import load_file

import train_lora
import train_ti
from bench.benchmark import compile_rows
from clif.errors import RunFailed, UserError
from clif.train import compiled

# inductor fuses and reorders float32 reductions: per-step losses agree to ~1e-7 relative on the tiny models; the
# tolerance leaves room for other CPUs' vector widths, and is far below the step-to-step change of the loss (~1e-1)
TOL = {"rtol": 1e-4, "atol": 1e-6}
# Adam turns gradients near rounding level into full-size steps of either sign, so a few trained LoRA weights differ
# by more: after the LoRA test's 4 steps at lr 5e-3 (at most 2e-2 of movement) the worst seen is 3.6e-5; the bound
# is 1 % of the possible movement
LORA_TOL = {"rtol": 0.0, "atol": 0.01 * 4 * 5e-3}


def losses(out) -> torch.Tensor:
    return torch.tensor(json.loads((out / "run_stats.json").read_text())["losses"])


def graphs_compiled(run) -> int:
    """Run `run()` and count the graphs dynamo captured meanwhile (0: nothing was compiled)."""
    from torch._dynamo.utils import counters

    counters.clear()
    run()
    return counters["stats"]["unique_graphs"]


def same_files(a, b, names) -> None:
    for f in names:
        x, y = load_file(str(a / f)), load_file(str(b / f))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f


def close_files(a, b, names, tol=TOL) -> None:
    for f in names:
        x, y = load_file(str(a / f)), load_file(str(b / f))
        assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], **tol) for k in x), f


EMBEDDINGS = ["embeddings/redball.safetensors", "embeddings/bluebox.safetensors"]


@pytest.fixture(autouse=True)
def scalar_kernels():
    """Inductor writes scalar C++ kernels here (`cpp.vec_isa_ok=False`): the same graphs, the same assertions, and 40 %
    less g++ time from a cold cache (the LoRA resume test: 65 s -> 40 s on 2 cores). What these tests check — the
    compiled step equals the eager one, resumes bit for bit, saves clean keys — does not depend on how inductor
    vectorizes a kernel, which is inductor's own business."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.vec_isa_ok": False}):
        yield


@pytest.fixture(scope="module")
def one_level(tmp_path_factory) -> dict:
    """Tiny sd15 and sdxl pipelines with a one-level UNet (what the compiled runs compile)."""
    from clif.fixtures.tiny import build

    root = tmp_path_factory.mktemp("one_level")
    return {family: build(family, root / family, unet_levels=1) for family in ("sd15", "sdxl")}


def test_one_level_unets_keep_the_cross_attention_and_the_conditioning(one_level, tiny_models):
    """What the compiled runs compile: one cross-attention level, the family's conditioning, the same text side."""
    from diffusers import UNet2DConditionModel

    from clif.fixtures.tiny import build

    for family, folder in one_level.items():
        one = UNet2DConditionModel.load_config(folder / "unet")
        two = UNet2DConditionModel.load_config(tiny_models[family] / "unet")
        assert one["down_block_types"] == ["CrossAttnDownBlock2D"] and len(two["down_block_types"]) == 2
        assert one["addition_embed_type"] == two["addition_embed_type"]  # SDXL: text_time
        assert one["cross_attention_dim"] == two["cross_attention_dim"]
        same = (folder / "text_encoder" / "model.safetensors").read_bytes()
        assert same == (tiny_models[family] / "text_encoder" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="unet_levels"):
        build("sd15", "unused", unet_levels=3)


@pytest.mark.heavy(45)
def test_compiled_ti_on_sdxl_equals_eager_with_checkpointing_and_cached_latents(one_level, concept_set, tmp_path):
    eager, comp, sdxl = tmp_path / "eager", tmp_path / "compiled", one_level["sdxl"]
    assert graphs_compiled(lambda: train_ti.main(ti_args(sdxl, concept_set, eager, "--cache_latents"))) == 0
    argv = ti_args(sdxl, concept_set, comp, "--cache_latents", "--gradient_checkpointing", "--torch_compile")
    assert graphs_compiled(lambda: train_ti.main(argv)) >= 1
    a, b = losses(eager), losses(comp)
    assert len(a) == len(b) == 3 and torch.allclose(a, b, **TOL), (a, b)
    close_files(eager, comp, EMBEDDINGS)
    args = json.loads((comp / "clif_manifest.json").read_text())["args"]
    assert args["torch_compile"] is True and args["compile_mode"] == "default"


@pytest.fixture(scope="module")
def ti_stage(one_level, concept_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "ti"
    train_ti.main(ti_args(one_level["sd15"], concept_set, out, "--max_train_steps", "2"))
    return out


@pytest.mark.heavy(40)
def test_compiled_lora_resume_equals_uninterrupted_and_eager(one_level, concept_set, ti_stage, tmp_path):
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
             "--snr_gamma", "5", "--random_flip"]  # fmt: skip
    eager, full, part, sd15 = tmp_path / "eager", tmp_path / "full", tmp_path / "part", one_level["sd15"]
    train_lora.main(lora_args(sd15, concept_set, ti_stage, eager, *extra))
    assert graphs_compiled(
        lambda: train_lora.main(lora_args(sd15, concept_set, ti_stage, full, *extra, "--torch_compile"))
    ) >= 1
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    train_lora.main(lora_args(sd15, concept_set, ti_stage, part, *extra, "--torch_compile",
                              "--resume_from_checkpoint", "latest"))  # fmt: skip
    files = ["pytorch_lora_weights.safetensors", *EMBEDDINGS]
    same_files(full, part, files)  # resume = uninterrupted, bit for bit
    assert torch.equal(losses(part), losses(full)[2:])
    a, b = losses(eager), losses(full)
    assert len(a) == 4 and torch.allclose(a, b, **TOL), (a, b)
    close_files(eager, full, EMBEDDINGS)
    # same keys: the compiled wrapper leaves no '_orig_mod.' in the LoRA file
    close_files(eager, full, ["pytorch_lora_weights.safetensors"], LORA_TOL)
    # that a compiled run is resumed compiled (the flags are result-changing) is test_resume_flags' business


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.heavy(45)
def test_compiled_lora_v_prediction_bf16_caption_cache_dropout_resumes_bit_identical(concept_set, tmp_path):
    """The other combinations in one compiled run: an SD 2.x-style v-prediction model, bf16 autocast with bf16 frozen
    weights, frozen embeddings (the caption cache: no text encoder in the step) and LoRA dropout (inductor's own
    random numbers, drawn from torch's global generator, which checkpoints save)."""
    from clif.fixtures.tiny import build

    model = build("sd15", tmp_path / "v", prediction_type="v_prediction", unet_levels=1)
    ti = tmp_path / "ti"
    train_ti.main(ti_args(model, concept_set, ti, "--max_train_steps", "1", "--mixed_precision", "bf16"))
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--mixed_precision", "bf16",
             "--embedding_learning_rate", "0", "--lora_dropout", "0.1", "--torch_compile"]  # fmt: skip
    full, part = tmp_path / "full", tmp_path / "part"
    assert graphs_compiled(lambda: train_lora.main(lora_args(model, concept_set, ti, full, *extra))) >= 1
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    train_lora.main(lora_args(model, concept_set, ti, part, *extra, "--resume_from_checkpoint", "latest"))
    same_files(full, part, ["pytorch_lora_weights.safetensors"])
    assert torch.equal(losses(part), losses(full)[2:]) and torch.isfinite(losses(full)).all()
    state = load_file(str(full / "pytorch_lora_weights.safetensors"))
    assert all(v.dtype == torch.float32 for v in state.values())  # trained in fp32 on bf16 frozen weights
    same_files(ti, full, EMBEDDINGS)  # frozen rows: the caption cache served every step


def test_no_cpp_compiler_is_refused_before_anything_is_written(tiny_sd15, concept_set, tmp_path, capsys):
    import torch._inductor.config as inductor_config

    out = tmp_path / "out"
    with inductor_config.patch({"cpp.cxx": (None, "no-such-c++")}):  # what CXX=no-such-c++ at start-up gives
        code, err = run_cli(train_ti.main, ti_args(tiny_sd15, concept_set, out, "--torch_compile"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "C++ compiler" in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"torch_compile": False, "mode": "reduce-overhead", "cuda": True}, "needs --torch_compile"),
        ({"torch_compile": True, "mode": "reduce-overhead", "cuda": False}, "needs a CUDA device"),
        ({"torch_compile": True, "mode": "reduce-overhead", "cuda": True, "prior_preservation": True}, "prior"),
        ({"torch_compile": True, "mode": "default", "cuda": True}, "triton"),
    ],
)
def test_check_compile_refuses(kwargs, needle, monkeypatch):
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: False)
    with pytest.raises(UserError, match=needle):
        compiled.check_compile(**kwargs)


def test_check_compile_accepts_what_it_serves(monkeypatch):
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    compiled.check_compile(torch_compile=False, mode="default", cuda=False)
    compiled.check_compile(torch_compile=True, mode="max-autotune-no-cudagraphs", cuda=False)  # g++ is here
    compiled.check_compile(torch_compile=True, mode="reduce-overhead", cuda=True)
    compiled.check_compile(torch_compile=True, mode="default", cuda=True, prior_preservation=True)


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def test_a_compile_failure_is_one_line():
    def broken(gm, example_inputs):
        raise RuntimeError("no kernel for this\nsecond line")

    unet = compiled.CompiledUNet(_tiny_net(), mode="default", device=torch.device("cpu"), backend=broken)
    one_line = r"failed on the UNet \(RuntimeError: no kernel for this\); run without --torch_compile"
    with pytest.raises(RunFailed, match=one_line) as e:
        unet(torch.ones(1, 3))
    assert "\n" not in str(e.value)


def test_a_compile_failure_in_the_first_backward_ends_the_run_with_one_line(tiny_sd15, concept_set, tmp_path, capsys,
                                                                           monkeypatch):
    """AOTAutograd builds the compiled backward at the first backward, outside the UNet call: the step loop turns
    that failure (inductor raises an InductorError) into one line and exit 1 as well."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.exc import InductorError

    def backward_compiler(gm, example_inputs):
        raise InductorError(RuntimeError("C++ compile error\nsecond line"), None)

    backend = aot_autograd(fw_compiler=lambda gm, example_inputs: gm.forward, bw_compiler=backward_compiler)
    made = []

    def failing_unet(model, *, torch_compile, mode, device):
        made.append(compiled.CompiledUNet(model.unet, mode=mode, device=device, backend=backend))
        return made[-1]

    monkeypatch.setattr(train_ti, "training_unet", failing_unet)
    out = tmp_path / "out"
    code, err = run_cli(train_ti.main, ti_args(tiny_sd15, concept_set, out, "--torch_compile"), capsys)
    lines = [ln for ln in err.strip().splitlines() if "error:" in ln]
    assert made and code == 1 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and "torch.compile failed on the UNet (RuntimeError: C++ compile error)" in lines[0], err
    assert err.strip().splitlines()[-1] == lines[0] and not (out / "clif_manifest.json").exists()


def test_the_mode_reaches_torch_compile(monkeypatch):
    """--compile_mode is what torch.compile gets: the mode itself on CUDA (with a channels_last UNet), the same
    mode's inductor options on CPU without inductor's channels_last layout."""
    from torch._inductor import list_mode_options

    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: seen.append(kwargs) or module)
    model = type("M", (), {"unet": torch.nn.Conv2d(4, 4, 3)})()
    for mode in ("default", "max-autotune-no-cudagraphs"):
        assert compiled.training_unet(model, torch_compile=True, mode=mode, device=torch.device("cpu")).mode == mode
        assert seen[-1] == {"backend": "inductor", "options": {**list_mode_options(mode), "layout_optimization": False}}
        assert not model.unet.weight.is_contiguous(memory_format=torch.channels_last)
    compiled.training_unet(model, torch_compile=True, mode="reduce-overhead", device=torch.device("cuda"))
    assert seen[-1] == {"backend": "inductor", "mode": "reduce-overhead"}
    assert model.unet.weight.is_contiguous(memory_format=torch.channels_last)
    assert compiled.training_unet(model, torch_compile=False, mode="default", device=torch.device("cpu")) is model.unet
    assert len(seen) == 3


def test_cuda_graphs_with_prior_preservation_are_refused_before_anything_is_written(tiny_sd15, concept_set, tmp_path,
                                                                                   capsys, monkeypatch):
    """The refusal a CUDA machine gives (CUDA faked: the check runs before anything touches the device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    out, cls = tmp_path / "out", tmp_path / "class"
    argv = lora_args(tiny_sd15, concept_set, tmp_path / "stage", out, "--torch_compile", "--compile_mode",
                     "reduce-overhead", "--with_prior_preservation", "--class_prompt", "a ball", "--class_data_dir",
                     str(cls))  # fmt: skip
    code, err = run_cli(train_lora.main, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--with_prior_preservation" in err, err
    assert not out.exists() and not cls.exists()


@pytest.mark.parametrize("mode,marks", [("default", 0), ("reduce-overhead", 2)])
def test_cuda_graph_mode_starts_a_graph_step_per_call(mode, marks, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    net = _tiny_net()
    unet = compiled.CompiledUNet(net, mode=mode, device=torch.device("cpu"), backend="eager")
    x = torch.ones(1, 3)
    assert torch.equal(unet(x), net(x)) and torch.equal(unet(x), net(x))
    assert len(calls) == marks


def test_bench_compile_rows_compile_time_and_break_even(tmp_path):
    stats = {  # (first step, median step) in ms of each run, as run_stats.json gives them
        "eager": (100.0, 50.0),
        "default-cold": (10_100.0, 40.0),
        "default-warm": (1_100.0, 40.0),
        "slow-cold": (5_100.0, 60.0),
        "slow-warm": (200.0, 60.0),
    }

    def run(out, extra, env):
        key = "eager" if not extra else f"{extra[-1]}-{out.name.rsplit('-', 1)[-1]}"
        first, median = stats[key]
        return {"first_step_ms": first, "median_step_ms": median, "peak_rss_mb": 1.0, "device": "cpu"}

    rows = compile_rows("m", "ti", run, tmp_path, ["default", "slow"])
    by = {(r["mode"], r["inductor_cache"]): r for r in rows}
    assert by[("default", "cold")]["compile_s"] == 10.0 and by[("default", "cold")]["break_even_steps"] == 1000
    assert by[("default", "warm")]["compile_s"] == 1.0 and by[("default", "warm")]["break_even_steps"] == 100
    assert by[("default", "warm")]["speedup"] == 1.25
    assert by[("slow", "cold")]["break_even_steps"] is None  # slower per step: never pays
    assert "compile_s" not in by[("eager", "-")] and all(r["stage"] == "ti" for r in rows)
