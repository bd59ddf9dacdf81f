"""Models from transformers checkpoints: the seed projects' detector and encoder, CLIP, classifiers.

* ``hf-object-detection``: any ``AutoModelForObjectDetection`` checkpoint; the
  default is the seeds' conditional-DETR ResNet-50 fine-tuned on ModaNet +
  Fashionpedia (7 classes), kept above score 0.4 as the seeds do.
* ``fashion-swin``: the seeds' encoder, a Swin (``SwinModel`` pooler output)
  with a 128-d linear head, L2-normalised; input size from its ``SwinConfig``,
  normalisation from its image processor.
* ``clip-vision``: ``CLIPVisionModelWithProjection`` image embeddings.
* ``hf-image-classifier``: ``AutoModelForImageClassification`` with a
  model label -> category table.

Options come from ``[models.options.<name>]``; ``name_or_path`` is a local
directory or a hub id already in the local cache (see hf_loading).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from plugins import hookimpl
from plugins.builtin import onnx_runtime
from plugins.builtin.classifiers import normalise_category
from plugins.builtin.hf_loading import cached_file, option, place, pretrained
from plugins.builtin.preprocess import resize_normalise
from plugins.models import UNCATEGORIZED, Detection, ModelContext

SEED_DETECTOR = "yainage90/fashion-object-detection"
SEED_ENCODER = "yainage90/fashion-image-feature-extractor"
CLIP_DEFAULT = "openai/clip-vit-base-patch32"


def _embedding_runner(model, embed, input_size: tuple[int, int], name: str, context: ModelContext, dtype):
    """``embed(model, pixel_values)``, L2-normalised, as a callable on float32 NCHW arrays, in the context's runtime.

    With ``models.runtime`` onnxruntime (the CPU default) the vision tower and
    its head are exported once from the loaded weights and run by ONNX Runtime
    (plugins/builtin/onnx_runtime.py); the image processor stays in Python.
    """
    import torch

    class Embedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model  # a submodule: its weights are the export's, and its cache key's

        def forward(self, pixel_values):
            return torch.nn.functional.normalize(embed(self.model, pixel_values).float(), dim=1)

    return onnx_runtime.runner(Embedding().eval(), (1, 3, *input_size), name, context, torch_dtype=dtype)


class TransformersDetector:
    name = "hf-object-detection"

    def __init__(self, context: ModelContext) -> None:
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        self.name_or_path = context.options.get("name_or_path", SEED_DETECTOR)
        self.threshold = float(context.options.get("threshold", 0.4))
        #: model label -> category; labels not in the table keep their own (normalised) name
        self.labels: dict[str, str] = {k.lower(): v for k, v in context.options.get("labels", {}).items()}
        self.processor = pretrained(AutoImageProcessor, self.name_or_path, "detector")
        model = pretrained(AutoModelForObjectDetection, self.name_or_path, "detector")
        self.model, self.dtype = place(model, context)
        self.device = context.device

    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        import torch

        if not images:
            return []
        inputs = self.processor(images=images, return_tensors="pt")
        inputs = {
            k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device) for k, v in inputs.items()
        }
        with torch.inference_mode():
            outputs = self.model(**inputs)
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        results = self.processor.post_process_object_detection(
            outputs, threshold=self.threshold, target_sizes=[(im.height, im.width) for im in images]
        )
        id2label = self.model.config.id2label
        detections = []
        for result in results:
            found = []
            for score, label, box in zip(
                result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()
            ):
                raw = str(id2label.get(label, label)).lower()
                found.append(Detection(tuple(round(v) for v in box), self.labels.get(raw, raw), score))
            detections.append(found)
        return detections


class FashionSwinEncoder:
    """The seeds' encoder: SwinModel pooler -> Linear(hidden, 128) -> L2 normalisation."""

    name = "fashion-swin"

    def __init__(self, context: ModelContext) -> None:
        import torch
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor, SwinConfig, SwinModel

        name_or_path = context.options.get("name_or_path", SEED_ENCODER)
        config = pretrained(SwinConfig, name_or_path, "encoder")
        processor = pretrained(AutoImageProcessor, name_or_path, "encoder")
        state = load_file(cached_file(name_or_path, "model.safetensors", "encoder"))
        head = state["embedding_layer.weight"]
        module = torch.nn.ModuleDict(
            {
                "swin": SwinModel(config, add_pooling_layer=True),
                "embedding_layer": torch.nn.Linear(head.shape[1], head.shape[0]),
            }
        )
        module.load_state_dict(state)
        self.model, dtype = place(module, context)
        self.size = (config.image_size, config.image_size)
        self.mean, self.std = processor.image_mean, processor.image_std
        self.dim = int(head.shape[0])
        self.version = str(name_or_path)

        def embed(model, pixel_values):
            return model["embedding_layer"](model["swin"](pixel_values=pixel_values).pooler_output)

        self.run = _embedding_runner(self.model, embed, self.size, "fashion-swin", context, dtype)

    def encode(self, crops: list[Image.Image]) -> np.ndarray:
        if not crops:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.run(resize_normalise(crops, self.size, self.mean, self.std))


class ClipVisionEncoder:
    name = "clip-vision"

    def __init__(self, context: ModelContext) -> None:
        from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

        name_or_path = context.options.get("name_or_path", CLIP_DEFAULT)
        self.processor = pretrained(AutoImageProcessor, name_or_path, "encoder")
        model = pretrained(CLIPVisionModelWithProjection, name_or_path, "encoder")
        self.model, dtype = place(model, context)
        self.dim = int(model.config.projection_dim)
        self.version = str(name_or_path)
        size = model.config.image_size
        self.run = _embedding_runner(
            self.model,
            lambda model, pixel_values: model(pixel_values=pixel_values).image_embeds,
            (size, size),
            "clip-vision",
            context,
            dtype,
        )

    def encode(self, crops: list[Image.Image]) -> np.ndarray:
        if not crops:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.run(self.processor(images=crops, return_tensors="np")["pixel_values"])


class TransformersClassifier:
    """Top-1 label of an image classifier, mapped to a category by a table."""

    name = "hf-image-classifier"

    def __init__(self, context: ModelContext) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        name_or_path = option(context, "name_or_path", model=self.name)
        self.labels: dict[str, str] = {k.lower(): v for k, v in option(context, "labels", model=self.name).items()}
        self.min_score = float(context.options.get("min_score", 0.0))
        self.processor = pretrained(AutoImageProcessor, name_or_path, "classifier")
        model = pretrained(AutoModelForImageClassification, name_or_path, "classifier")
        self.model, self.dtype = place(model, context)
        self.device = context.device

    def classify(self, crops: list[Image.Image], detections: list[Detection], attrs: list[dict[str, Any]]) -> list[str]:
        import torch

        if not crops:
            return []
        pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            probabilities = self.model(pixel_values=pixels.to(self.device, self.dtype)).logits.float().softmax(-1)
        scores, indices = probabilities.max(dim=-1)
        id2label = self.model.config.id2label
        out = []
        for score, index in zip(scores.tolist(), indices.tolist()):
            category = self.labels.get(str(id2label[index]).lower())
            out.append(normalise_category(category) if category and score >= self.min_score else UNCATEGORIZED)
        return out


@hookimpl
def lookstream_register_detectors(registry):
    registry.add(TransformersDetector.name, TransformersDetector)


@hookimpl
def lookstream_register_encoders(registry):
    registry.add(FashionSwinEncoder.name, FashionSwinEncoder)
    registry.add(ClipVisionEncoder.name, ClipVisionEncoder)


@hookimpl
def lookstream_register_classifiers(registry):
    registry.add(TransformersClassifier.name, TransformersClassifier)
