"""Images per second of each built-in model, through the plugins' own code paths.

Models whose pretrained weights cannot ship offline (the seeds' Swin encoder
and DETR detector, CLIP) are built at their real architecture sizes with random
weights, saved with save_pretrained and loaded through the plugin: speed does
not depend on the weights' values. Usage::

    python -m benchmarks.models_throughput --device cpu --output benchmarks/results/models-cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from plugins.builtin import onnx_runtime
from plugins.manager import build_plugin_manager, registry
from plugins.models import ModelContext
from tests.support.imagegen import product_image


def build_checkpoints(root: Path) -> dict[str, Path]:
    from safetensors.torch import save_file
    from transformers import (
        AutoModelForObjectDetection,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        ConditionalDetrConfig,
        ConditionalDetrImageProcessor,
        ResNetConfig,
        SwinConfig,
        SwinModel,
        ViTImageProcessor,
    )

    paths = {name: root / name for name in ("swin", "clip", "detr")}
    swin = SwinConfig(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7, image_size=224)
    module = torch.nn.ModuleDict({"swin": SwinModel(swin), "embedding_layer": torch.nn.Linear(1024, 128)})
    paths["swin"].mkdir()
    swin.save_pretrained(paths["swin"])
    ViTImageProcessor().save_pretrained(paths["swin"])
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(paths["swin"] / "model.safetensors"))

    CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=512)).save_pretrained(paths["clip"])
    CLIPImageProcessor().save_pretrained(paths["clip"])

    labels = ["bag", "bottom", "dress", "hat", "outer", "shoes", "top"]
    detr = ConditionalDetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=ResNetConfig(out_features=["stage4"]),  # ResNet-50
        id2label=dict(enumerate(labels)),
        label2id={c: i for i, c in enumerate(labels)},
    )
    AutoModelForObjectDetection.from_config(detr).save_pretrained(paths["detr"])
    ConditionalDetrImageProcessor().save_pretrained(paths["detr"])
    return paths


#: Plugins whose network can run in ONNX Runtime (models.runtime); the others run in torch whatever it says.
EXPORTED = {"efficientnet-lite0", "imagenet-garments", "fashion-swin", "clip-vision"}


def time_model(run, images, batch: int, device: str) -> float:
    run(images[:batch])  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        run(images[i : i + batch])
    if device == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=int, default=1, help="multiply the image counts (e.g. 8 on a GPU)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    pm = build_plugin_manager()
    images = [product_image(i, (400, 500)) for i in range(64 * args.scale)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_checkpoints(Path(tmp))
        plan = [  # (role, plugin name, options, images, batch)
            ("encoder", "efficientnet-lite0", {}, 64, 32),
            ("classifier", "imagenet-garments", {}, 64, 32),
            ("encoder", "fashion-swin", {"name_or_path": str(paths["swin"])}, 16, 16),
            ("encoder", "clip-vision", {"name_or_path": str(paths["clip"])}, 32, 32),
            ("detector", "hf-object-detection", {"name_or_path": str(paths["detr"])}, 4, 4),
        ]
        # ONNX Runtime runs on the CPU here; plugins without an exported path run in torch either way.
        runtimes = ["torch", "onnxruntime"] if args.device == "cpu" and onnx_runtime.available() else ["torch"]
        for (role, name, options, count, batch), runtime in itertools.product(plan, runtimes):
            if runtime == "onnxruntime" and name not in EXPORTED:
                continue
            context = ModelContext(args.device, options=options, runtime=runtime, cache_dir=Path(tmp) / "onnx")
            model = registry(pm, role).create(name, context)
            run = {
                "encoder": lambda x, m=model: m.encode(x),
                "classifier": lambda x, m=model: m.classify(x, [], [{}] * len(x)),
                "detector": lambda x, m=model: m.detect(x),
            }[role]
            n = count * args.scale
            rate = time_model(run, images[:n], batch * args.scale, args.device)
            results.append(
                {
                    "role": role,
                    "model": name,
                    "runtime": runtime,
                    "images": n,
                    "batch": batch * args.scale,
                    "images_per_s": round(rate, 2),
                }
            )
            print(f"{role:10s} {name:22s} {runtime:12s} {rate:8.1f} images/s (batch {batch * args.scale})", flush=True)
            del model
    machine = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if args.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
