"""DreamBooth fidelity metrics: the math on known inputs, the model code path on tiny random models saved locally."""

import math

import pytest
import torch

pytest.importorskip("transformers")

from torch_singlora.diffusion.metrics import fidelity_scores, paired_similarity, pairwise_similarity  # noqa: E402
from torch_singlora.errors import SingLoRAError  # noqa: E402


def test_pairwise_similarity_known_values():
    e = torch.eye(3)
    assert pairwise_similarity(e[:1], e[:1]) == pytest.approx(1.0)
    assert pairwise_similarity(e[:1], e[1:2]) == pytest.approx(0.0)
    assert pairwise_similarity(e[:1], -e[:1]) == pytest.approx(-1.0)
    # one generated image equal to one of two orthogonal references: (1 + 0) / 2; scale does not matter
    assert pairwise_similarity(5 * e[:1], e[:2]) == pytest.approx(0.5)
    # 45 degrees
    assert pairwise_similarity(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])) == pytest.approx(math.sqrt(0.5))


def test_pairwise_similarity_matches_float64_loop():
    torch.manual_seed(0)
    a, b = torch.randn(4, 7), torch.randn(3, 7)
    expected = sum(
        float(a[i].double() @ b[j].double() / (a[i].double().norm() * b[j].double().norm()))
        for i in range(4) for j in range(3)
    ) / 12
    assert pairwise_similarity(a, b) == pytest.approx(expected, abs=1e-12)


def test_paired_similarity_pairs_rows():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    texts = torch.tensor([[3.0, 0.0], [1.0, 0.0]])  # row 0 identical direction, row 1 orthogonal
    assert paired_similarity(images, texts) == pytest.approx(0.5)
    assert paired_similarity(images, torch.tensor([[0.0, 1.0], [1.0, 0.0]])) == pytest.approx(0.0)
    assert paired_similarity(images, torch.tensor([[-1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.0)  # -1 and +1


def test_metric_input_errors_name_the_argument():
    with pytest.raises(SingLoRAError, match="generated"):
        pairwise_similarity(torch.zeros(3), torch.zeros(1, 3))
    with pytest.raises(SingLoRAError, match="embedding sizes"):
        pairwise_similarity(torch.ones(1, 3), torch.ones(1, 4))
    with pytest.raises(SingLoRAError, match="row by row"):
        paired_similarity(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(SingLoRAError, match="one per image"):
        fidelity_scores([1, 2], [1], ["p"], clip_model="x")
    with pytest.raises(SingLoRAError, match="not a local folder"):
        fidelity_scores([1], [1], ["p"], dino_model="/nonexistent/dino")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A random ViT (DINO stand-in) and a random CLIP with processors/tokenizer, saved like hub folders."""
    from transformers import AutoTokenizer, CLIPModel, ViTModel

    from torch_singlora.diffusion.tiny import tiny_metric_models

    root = tmp_path_factory.mktemp("metric_models")
    dino, clip = tiny_metric_models(root)
    return root, ViTModel.from_pretrained(dino).eval(), CLIPModel.from_pretrained(clip).eval(), AutoTokenizer.from_pretrained(clip)


def test_fidelity_scores_with_local_models(tiny_models):
    from PIL import Image

    root, vit, clip, tokenizer = tiny_models
    images = [Image.new("RGB", (20, 20), color) for color in ((255, 0, 0), (0, 255, 0), (10, 20, 200))]
    generated, reference = images[:2], images[1:]
    prompts = ["a photo of sks dog", "a photo of dog"]
    scores = fidelity_scores(generated, reference, prompts, dino_model=root / "dino", clip_model=root / "clip")
    assert set(scores) == {"dino", "clip_i", "clip_t"}

    from transformers import CLIPImageProcessor, ViTImageProcessor

    with torch.no_grad():  # reference: the same models called directly, cosine in float64 by explicit loops
        def cos_mean(x, y):
            return sum(float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))
                       for a in x for b in y) / (len(x) * len(y))

        dino_proc = ViTImageProcessor.from_pretrained(root / "dino")
        cls = vit(pixel_values=dino_proc(images=images, return_tensors="pt").pixel_values).last_hidden_state[:, 0]
        assert scores["dino"] == pytest.approx(cos_mean(cls[:2], cls[1:]), abs=1e-6)
        clip_proc = CLIPImageProcessor.from_pretrained(root / "clip")
        out = clip.get_image_features(pixel_values=clip_proc(images=images, return_tensors="pt").pixel_values)
        image_embeds = out if isinstance(out, torch.Tensor) else out.pooler_output
        assert scores["clip_i"] == pytest.approx(cos_mean(image_embeds[:2], image_embeds[1:]), abs=1e-6)
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        out = clip.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        text_embeds = out if isinstance(out, torch.Tensor) else out.pooler_output
        expected = sum(float(torch.nn.functional.cosine_similarity(image_embeds[i].double(), text_embeds[i].double(),
                                                                   dim=0)) for i in range(2)) / 2
        assert scores["clip_t"] == pytest.approx(expected, abs=1e-6)
