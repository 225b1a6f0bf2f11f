"""Small unit tests of formulas a one-line slip would break silently: each pins one behaviour exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clif.contrastive.losses import clip_loss
from clif.eval import metrics
from clif.retrieval import retrieval_matrix
from clif.tokens import ConceptEmbedding


def test_clip_loss_is_scale_invariant_and_matches_formula():
    """clip_loss normalises the features: scaling either side changes nothing; value = the InfoNCE formula."""
    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    caps = ["a", "b", "a", "c"]  # rows 0 and 2 share a caption: both are positives of each other
    scale = torch.tensor(10.0)
    loss = clip_loss(text, image, caps, scale)
    torch.testing.assert_close(clip_loss(text * 7.0, image * 0.01, caps, scale), loss)
    t, i = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    logits = 10.0 * t @ i.T
    target = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]])
    by_hand = -0.5 * ((target * logits.log_softmax(1)).sum(1).mean() + (target * logits.T.log_softmax(1)).sum(1).mean())
    torch.testing.assert_close(loss, by_hand)


def test_confusion_margin_decides_unclear_instances():
    """Distinct best matches are confused only when an instance's gap is below the margin."""
    clear = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    close = torch.tensor([[0.52, 0.48], [0.2, 0.8]])  # instance 0 prefers concept 0 by 0.04 only
    assert metrics.confusion_decision(clear, 0.05) == (True, False)
    assert metrics.confusion_decision(close, 0.05) == (True, True)
    assert metrics.confusion_decision(close, 0.03) == (True, False)
    assert metrics.confusion_decision(torch.tensor([[0.9, 0.1], [0.8, 0.2]]), 0.0) == (True, True)  # same concept
    assert metrics.confusion_decision(None, 0.05) == (False, False)


def test_retrieval_matrix_counts_each_concepts_share_of_the_top_k():
    """Row i = the shares of the concepts among text i's top-k images, k = concept i's view count; accuracy = the
    diagonal's mean."""
    owner = torch.tensor([0, 0, 1, 1, 1])  # 2 views of concept 0, 3 of concept 1
    sims = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.0], [0.0, 0.9, 0.7, 0.6, 0.1]])
    acc, matrix = retrieval_matrix(sims, owner, 2)
    # text 0's top 2: views 0 (c0) and 2 (c1); text 1's top 3: views 1 (c0), 2 and 3 (c1)
    assert matrix == [[0.5, 0.5], [pytest.approx(1 / 3), pytest.approx(2 / 3)]]
    assert acc == pytest.approx((0.5 + 2 / 3) / 2)


def test_concept_embedding_reads_new_rows_only_for_new_ids():
    """Every vocabulary id (EOS/pad = the last row included) reads the frozen table; only ids >= rows read new."""
    base = torch.nn.Embedding(50, 4)
    new = torch.full((3, 4), 100.0)
    module = ConceptEmbedding(base, new)
    ids = torch.arange(53)
    out = module(ids)
    assert torch.equal(out[:50], base.weight[:50]) and torch.equal(out[50:], new)


def test_no_vocabulary_token_reads_a_trainable_row(tiny_sd15):
    """Forward pass: after installing concept rows, any prompt without placeholders (padded to 77 with EOS/pad)
    encodes bit-identically, and the embedding of every vocabulary id, EOS 49407 included, is unchanged."""
    from clif.models import load_model
    from clif.tokens import install

    model = load_model(str(tiny_sd15), text_only=True)
    tok, enc = model.tokenizers[0], model.text_encoders[0]
    ids = model.tokenize(["a photo of a dog"])[0]
    assert tok.eos_token_id == 49407 and ids[0, -1] == tok.pad_token_id == 49407
    before = enc(ids)[0]
    table = enc.get_input_embeddings().weight.detach().clone()
    rows = table.shape[0]
    tok.add_tokens(["<x>", "<x>_1"])
    install([enc], [[torch.full((2, table.shape[1]), 3.0)]], rows)
    assert torch.equal(enc(ids)[0], before)
    assert torch.equal(enc.get_input_embeddings()(torch.arange(rows)), table)


class _FakeBackbone:
    """Records the texts it embeds; a text's feature says whether it still holds a placeholder ('<')."""

    def __init__(self):
        self.texts_seen: list[str] = []

    def images(self, images, batch_size):
        return torch.tensor([[1.0, 0.0]] * len(images), dtype=torch.float64)

    def texts(self, texts, batch_size):
        self.texts_seen += texts
        return torch.tensor([[0.0, 1.0] if "<" in t else [1.0, 0.0] for t in texts], dtype=torch.float64)


def test_text_alignment_scores_the_class_word_prompt(tmp_path):
    """score_folder's text alignment embeds the prompt with each token replaced by its class word."""
    from clif.concepts import Concept
    from clif.eval.evaluation import Item, score_folder

    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    concepts = [Concept(name="dog2", token="<dog2>", initializer="dog", class_word="dog", images=[], num_vectors=2)]
    backbone = _FakeBackbone()
    rows = score_folder([Item(tmp_path / "a.png", "a photo of <dog2> <dog2>_1 on grass")], concepts,
                        {"dog2": torch.tensor([[1.0, 0.0]])}, backbone, batch_size=4, margin=0.1)
    # the prompt with its tokens replaced, then the class words' own prompt (clif/eval/kinds.py reads it)
    assert backbone.texts_seen == ["a photo of dog on grass", "a photo of a dog"]
    assert rows[0]["text_alignment"] == 2.5 and rows[0]["text_cosine"] == 1.0


class _ZeroUNet(torch.nn.Module):
    def forward(self, x, t, hidden, **kw):
        return type("Out", (), {"sample": torch.zeros_like(x)})()


class _FixedVAE:
    config = type("C", (), {"scaling_factor": 0.5})()
    dtype = torch.float32

    def encode(self, pixels):
        dist = type("D", (), {"mean": torch.ones(pixels.shape[0], 4, 8, 8), "std": torch.full((1,), 0.1)})()
        return type("E", (), {"latent_dist": dist})()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_diffusion_loss_target_follows_prediction_type(prediction):
    """The loss regresses epsilon or the velocity alpha_t * eps - sigma_t * x0, per the scheduler config."""
    from diffusers import DDPMScheduler

    from clif.models import DiffusionModel
    from clif.train.data import Sample
    from clif.train.training import NoiseSource, diffusion_loss

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    model = DiffusionModel("sd", "x", [], [], _ZeroUNet(), _FixedVAE(), sched)
    sample = Sample(pixels=torch.zeros(2, 3, 64, 64), image_index=torch.arange(2), flip=torch.zeros(2, dtype=bool),
                    captions=["a", "b"], time_ids=torch.zeros(2, 6))
    loss = diffusion_loss(model, sample, None, NoiseSource(0, "cpu", 2, 0, 2), dtype=torch.float32,
                          text_cache=lambda caps: (torch.zeros(len(caps), 77, 8), None))
    replay = NoiseSource(0, "cpu", 2, 0, 2)
    x0 = (1.0 + 0.1 * replay.randn(4, 8, 8)) * 0.5
    eps = replay.randn(4, 8, 8)
    t = replay.randint(1000)
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    target = eps if prediction == "epsilon" else a * eps - s * x0
    torch.testing.assert_close(loss, (target**2).mean())
    assert not math.isclose(float((eps**2).mean()), float(((a * eps - s * x0) ** 2).mean()), rel_tol=1e-3)


def test_missing_real_photos_skip_locally_and_fail_under_ci(monkeypatch, tmp_path):
    """A needs_data test whose data set is absent: skipped with its reason, but a failure when CI=true."""
    import conftest

    (tmp_path / "there").mkdir()
    assert conftest.data_gate(["there"], tmp_path, ci=True) is None
    assert conftest.data_gate(["there", "gone"], tmp_path, ci=False) == ("skip", f"{tmp_path / 'gone'} absent")
    assert conftest.data_gate(["gone"], tmp_path, ci=True)[0] == "fail"

    item = type("Item", (), {"iter_markers": lambda self, name: [conftest.needs_data("no-such-set").mark]})()

    def outcome():
        try:
            conftest.pytest_runtest_setup(item)
        except (pytest.fail.Exception, pytest.skip.Exception) as err:  # caught: a skip here must not skip this test
            return type(err), str(err)
        return None

    monkeypatch.setenv("CI", "true")
    kind, msg = outcome()
    assert kind is pytest.fail.Exception and "no-such-set absent" in msg
    monkeypatch.delenv("CI")
    kind, msg = outcome()
    assert kind is pytest.skip.Exception and "no-such-set absent" in msg


def test_built_once_builds_once_per_session_for_every_worker(monkeypatch, tmp_path):
    """conftest.built_once: a second ask (another worker of the session) reuses the folder; under xdist the folder is
    in the session's common folder, beside the workers' own."""
    import conftest

    factory = type("F", (), {"getbasetemp": lambda self: tmp_path / "session" / "popen-gw1"})()
    (tmp_path / "session" / "popen-gw1").mkdir(parents=True)
    calls = []

    def build(out):
        calls.append(out)
        out.mkdir()
        (out / "x").write_text("built")

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    first = conftest.built_once(factory, "thing", build)
    assert conftest.built_once(factory, "thing", build) == first and len(calls) == 1
    assert first == tmp_path / "session" / "built-once" / "thing" and (first / "x").read_text() == "built"
    monkeypatch.delenv("PYTEST_XDIST_WORKER")  # one process: the session's own folder
    assert conftest.built_once(factory, "other", build).parent == tmp_path / "session" / "popen-gw1" / "built-once"
