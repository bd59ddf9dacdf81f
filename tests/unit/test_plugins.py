import inspect
import re
from pathlib import Path

import numpy as np
import pytest

from plugins import hookimpl, hookspecs
from plugins.manager import DEFAULT_PLUGINS, build_plugin_manager, load_models, provided_names, registry
from plugins.models import Classifier, Detection, Detector, Encoder, ModelContext
from plugins.registry import UnknownModel
from tests.support.imagegen import product_image

CPU = ModelContext("cpu")


class ConstantEncoder:
    name, version, dim = "constant", "1", 4

    def __init__(self, context):
        self.context = context

    def encode(self, crops):
        return np.tile(np.array([1, 0, 0, 0], dtype=np.float32), (len(crops), 1))


class ThirdPartyPlugin:
    @hookimpl
    def lookstream_register_encoders(self, registry):
        registry.add(ConstantEncoder.name, ConstantEncoder)


def test_builtins_provide_the_default_names():
    table = provided_names(build_plugin_manager())
    assert table["plugins.builtin.whole_image"] == {"detector": ["whole-image"]}
    assert table["plugins.builtin.efficientnet"] == {
        "encoder": ["efficientnet-lite0"],
        "classifier": ["imagenet-garments"],
    }
    assert table["plugins.builtin.classifiers"] == {"classifier": ["detector-label", "event-attrs"]}


def test_a_registered_plugin_is_selectable_by_name():
    pm = build_plugin_manager()
    pm.register(ThirdPartyPlugin(), name="third-party")
    models = load_models(pm, "whole-image", "constant", "event-attrs", CPU, {"constant": {"scale": 2}})
    assert isinstance(models.encoder, ConstantEncoder)
    assert models.encoder.context == ModelContext("cpu", options={"scale": 2})
    assert provided_names(pm)["third-party"] == {"encoder": ["constant"]}


def test_unknown_name_lists_the_installed_ones():
    known = "clip-vision, efficientnet-lite0, fashion-swin"
    with pytest.raises(UnknownModel, match=rf"no encoder named 'nope'; installed encoders: {known}"):
        registry(build_plugin_manager(), "encoder").create("nope", CPU)


def test_two_plugins_with_one_name_are_refused():
    pm = build_plugin_manager()
    pm.register(ThirdPartyPlugin(), name="a")
    pm.register(ThirdPartyPlugin(), name="b")
    with pytest.raises(ValueError, match="two plugins register a encoder named 'constant'"):
        registry(pm, "encoder")


def test_disabled_builtin_is_not_registered():
    pm = build_plugin_manager(disabled=("plugins.builtin.whole_image",))
    assert registry(pm, "detector").names == ["hf-object-detection", "ssd-street"]


def test_every_hook_is_documented_and_implemented_by_a_builtin():
    specs = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("lookstream_")]
    docs = (Path(__file__).parents[2] / "docs" / "plugins.md").read_text()
    pm = build_plugin_manager()
    assert len(specs) == 4
    for name in specs:
        assert re.search(rf"`{name}\(", docs), f"{name} is not documented in docs/plugins.md"
        implementers = {impl.plugin_name for impl in getattr(pm.hook, name).get_hookimpls()}
        assert implementers & set(DEFAULT_PLUGINS), f"no built-in implements {name}"


def test_builtin_models_satisfy_the_protocols(default_models):
    assert isinstance(default_models.detector, Detector)
    assert isinstance(default_models.encoder, Encoder)
    assert isinstance(default_models.classifier, Classifier)


def test_efficientnet_encoder_is_deterministic_normalised_and_discriminative(default_models):
    encoder = default_models.encoder
    images = [product_image(i) for i in range(4)]
    a, b = encoder.encode(images), encoder.encode(images[:1] + images[1:])
    assert a.shape == (4, 1280) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)
    similarity = a @ a.T
    assert np.all(similarity[~np.eye(4, dtype=bool)] < 0.99)


def test_classifiers_use_attrs_or_detector_label(default_models):
    pm = build_plugin_manager()
    crops = [product_image(0)] * 3
    detections = [Detection((0, 0, 1, 1), label, 1.0) for label in ("Top", None, "bag")]
    attrs = [{"category": "Outer Wear"}, {}, {"category": 3}]
    assert registry(pm, "classifier").create("event-attrs", CPU).classify(crops, detections, attrs) == [
        "outer-wear",
        "uncategorized",
        "uncategorized",
    ]
    assert registry(pm, "classifier").create("detector-label", CPU).classify(crops, detections, attrs) == [
        "top",
        "uncategorized",
        "bag",
    ]


def test_imagenet_garment_classifier_refuses_non_garments_and_maps_garment_mass():
    from PIL import Image
    from skimage import data

    from plugins.builtin.efficientnet import IMAGENET_GARMENTS

    assert set(IMAGENET_GARMENTS.values()) == {"bag", "bottom", "dress", "hat", "outer", "shoes", "top"}
    classify = registry(build_plugin_manager(), "classifier").create("imagenet-garments", CPU).classify
    photos = [Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())]  # an espresso, a cat
    assert classify(photos, [], [{}, {}]) == ["uncategorized", "uncategorized"]
    anything = registry(build_plugin_manager(), "classifier").create(
        "imagenet-garments", ModelContext("cpu", options={"min_score": 0.0})
    )
    assert set(anything.classify(photos, [], [{}, {}])) <= set(IMAGENET_GARMENTS.values())
