"""The transformers plugins on tiny random models, saved and loaded the way users load theirs."""

import numpy as np
import pytest
import torch

from plugins.builtin.transformers_models import (
    ClipVisionEncoder,
    FashionSwinEncoder,
    TransformersClassifier,
    TransformersDetector,
)
from plugins.manager import build_plugin_manager, load_models
from plugins.models import ModelContext, ModelNotAvailable
from tests.support.imagegen import product_image

CATEGORIES = ["bag", "bottom", "dress", "hat", "outer", "shoes", "top"]


def context(**options) -> ModelContext:
    return ModelContext("cpu", options=options)


@pytest.fixture(scope="module")
def tiny_detr(tmp_path_factory):
    from transformers import (
        AutoModelForObjectDetection,
        ConditionalDetrConfig,
        ConditionalDetrImageProcessor,
        ResNetConfig,
    )

    torch.manual_seed(0)
    config = ConditionalDetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 8, 8, 16], depths=[1, 1, 1, 1], out_features=["stage4"]
        ),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=10,
        id2label=dict(enumerate(CATEGORIES)),
        label2id={c: i for i, c in enumerate(CATEGORIES)},
    )
    path = tmp_path_factory.mktemp("detr")
    AutoModelForObjectDetection.from_config(config).save_pretrained(path)
    ConditionalDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_swin(tmp_path_factory):
    """A checkpoint laid out like the seeds' encoder: SwinConfig, processor, swin.* + embedding_layer.*."""
    from safetensors.torch import save_file
    from transformers import SwinConfig, SwinModel, ViTImageProcessor

    torch.manual_seed(0)
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2)
    module = torch.nn.ModuleDict({"swin": SwinModel(config), "embedding_layer": torch.nn.Linear(16, 128)})
    path = tmp_path_factory.mktemp("swin")
    config.save_pretrained(path)
    ViTImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2]).save_pretrained(path)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    labels = ["T-shirt", "Sneaker", "Tabby cat"]
    config = ViTConfig(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    path = tmp_path_factory.mktemp("vit")
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_detector_returns_boxes_inside_each_image_with_mapped_labels(tiny_detr):
    detector = TransformersDetector(context(name_or_path=str(tiny_detr), threshold=0.0, labels={"outer": "coat"}))
    images = [product_image(1, (120, 80)), product_image(2, (60, 90))]
    results = detector.detect(images)
    assert len(results) == 2 and all(results)
    for image, found in zip(images, results):
        for d in found:
            x0, y0, x1, y1 = d.box
            assert -1 <= x0 <= x1 <= image.width + 1 and -1 <= y0 <= y1 <= image.height + 1
            assert d.label in {*CATEGORIES, "coat"} - {"outer"} and 0 <= d.score <= 1


def test_detector_threshold_filters(tiny_detr):
    detector = TransformersDetector(context(name_or_path=str(tiny_detr), threshold=1.01))
    assert detector.detect([product_image(1)]) == [[]]


def test_fashion_swin_encoder_loads_the_seed_layout(tiny_swin):
    encoder = FashionSwinEncoder(context(name_or_path=str(tiny_swin)))
    vectors = encoder.encode([product_image(i) for i in range(3)])
    assert encoder.dim == 128 and vectors.shape == (3, 128) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert list(encoder.mean) == [0.5, 0.4, 0.3] and encoder.size == (32, 32)
    np.testing.assert_allclose(encoder.encode([product_image(1)])[0], vectors[1], atol=1e-5)


def test_clip_vision_encoder(tiny_clip):
    encoder = ClipVisionEncoder(context(name_or_path=str(tiny_clip)))
    vectors = encoder.encode([product_image(i) for i in range(2)])
    assert vectors.shape == (2, 24)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_image_classifier_maps_labels_and_refuses_unmapped(tiny_classifier):
    table = {"t-shirt": "top", "sneaker": "shoes"}
    classifier = TransformersClassifier(context(name_or_path=str(tiny_classifier), labels=table))
    categories = classifier.classify([product_image(i) for i in range(6)], [], [{}] * 6)
    assert len(categories) == 6 and set(categories) <= {"top", "shoes", "uncategorized"}
    strict = TransformersClassifier(context(name_or_path=str(tiny_classifier), labels=table, min_score=1.01))
    assert strict.classify([product_image(0)], [], [{}]) == ["uncategorized"]


def test_classifier_needs_a_model_and_a_table():
    with pytest.raises(ValueError, match=r"models\.options\.hf-image-classifier\.name_or_path must be set"):
        TransformersClassifier(context())


@pytest.mark.parametrize("cls", [TransformersDetector, FashionSwinEncoder, ClipVisionEncoder])
def test_missing_hub_model_names_it_and_says_how_to_provide_it(cls):
    with pytest.raises(ModelNotAvailable, match=r"not on this machine.*lookstream models fetch"):
        cls(context())  # the default hub ids: not in this machine's cache, and never downloaded


def test_selected_by_name_with_options_from_the_config(tiny_detr, tiny_swin):
    models = load_models(
        build_plugin_manager(),
        "hf-object-detection",
        "fashion-swin",
        "detector-label",
        ModelContext("cpu"),
        {
            "hf-object-detection": {"name_or_path": str(tiny_detr), "threshold": 0.0},
            "fashion-swin": {"name_or_path": str(tiny_swin)},
        },
    )
    assert models.detector.threshold == 0.0 and models.encoder.dim == 128


@pytest.mark.parametrize("encoder_class", [FashionSwinEncoder, ClipVisionEncoder], ids=["fashion-swin", "clip-vision"])
def test_encoders_give_the_same_vectors_in_onnxruntime(encoder_class, tiny_swin, tiny_clip, tmp_path):
    path = str(tiny_swin if encoder_class is FashionSwinEncoder else tiny_clip)
    crops = [product_image(i) for i in range(4)]
    eager = encoder_class(ModelContext("cpu", options={"name_or_path": path})).encode(crops)
    exported_context = ModelContext("cpu", options={"name_or_path": path}, runtime="onnxruntime", cache_dir=tmp_path)
    exported = encoder_class(exported_context).encode(crops)
    assert exported.shape == eager.shape and exported.dtype == np.float32
    assert float((eager * exported).sum(axis=1).min()) >= 0.999
    assert len(list(tmp_path.glob(f"{encoder_class.name}-*.onnx"))) == 1
