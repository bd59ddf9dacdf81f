"""Encoders fine-tuned by ``lookstream train``, loaded by path from the model directory it writes.

A model directory holds ``config.json`` (the base encoder, the projection
size, how many of the base's last blocks were trained, a version digest),
``weights.safetensors`` (the whole network: base and head), and the training's
``manifest.json`` and ``metrics.json``. Select it with::

    [models]
    encoder = "finetuned"
    [models.options.finetuned]
    path = "lookstream-data/models/efficientnet-lite0-ft-v001"
    query_base_weight = {product = 1.0}   # the default; street photos take the trained weight

The network is the base encoder's trunk (EfficientNet-Lite0 today, the
offline default) followed by a linear projection to ``dim`` (128 by default,
as the seed's Swin head) and L2 normalisation; with ``base_weight`` (0.5 by
default) the base's own pooled features, as before training, go beside it in
each vector (``build_network``). It is split at ``cut``, the
first trained block: the part before it never changes, so the trainer computes
it once per image view and caches it (indexer/training/). Like the built-in
EfficientNet it takes uint8 NHWC pixels and runs in ONNX Runtime on a CPU.

A query weighs the two parts by what its photo is (``weigh_query``,
``query_base_weight``). A street photo searches with the trained mix: the head
learned street -> shop. A product photo is a catalog image a camera or a
re-encoder changed; the base's features, which training never changes, find
its product (docs/models.md, "Measured": with the trained mix, product photos
lose some JPEG and scale queries to the base encoder), so by default it
searches on them alone (weight 1.0).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from plugins import hookimpl
from plugins.builtin import efficientnet, onnx_runtime
from plugins.builtin.preprocess import resize
from plugins.models import PHOTOS, ModelContext, ModelNotAvailable

log = logging.getLogger(__name__)

FORMAT = 1
#: Base encoders the trainer can fine-tune, and the size of their pooled features.
BASES = {"efficientnet-lite0": 1280}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
#: ``query_base_weight`` where the options leave it out: product photos on the base's features alone.
QUERY_BASE_WEIGHT = {"product": 1.0}


def build_network(base: str, dim: int, trained_blocks: int, base_weight: float = 0.0):
    """A fresh network: the pretrained base (a private copy) and a projection head, split at its trained part.

    ``trained_blocks`` 0: only the head trains, and ``stem`` gives the pooled
    base features. n > 0: the last n blocks of the base, its final convolution
    and the head train; ``stem`` gives the input of the first of those blocks.

    ``base_weight`` w > 0 keeps the base's own pooled features in the
    embedding beside the head's: ``[sqrt(w) * base, sqrt(1 - w) * head]``, both
    L2-normalised, so that the cosine of two embeddings is ``w`` times the base
    encoder's cosine plus ``1 - w`` times the head's. The base's features tell
    one photo from a near copy of another by fine detail that a 128-d head
    trained on garments does not keep; the head, trained through the same sum,
    learns what the base misses (street -> shop). The trained blocks then have
    a frozen copy that gives the base's features as they were.
    """
    import copy

    import torch

    if base not in BASES:
        raise ValueError(f"cannot fine-tune encoder {base!r}; the trainer knows {', '.join(BASES)}")
    network = copy.deepcopy(efficientnet.load_network("cpu")).float()
    blocks = len(network._blocks)
    if not 0 <= trained_blocks <= blocks:
        raise ValueError(f"trained_blocks must be between 0 and {blocks}")
    cut = blocks - trained_blocks
    if not 0 <= base_weight < 1:
        raise ValueError(f"base_weight is a share of the cosine, from 0 to below 1 (got {base_weight})")

    class FinetunedNetwork(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = network
            self.head = torch.nn.Linear(BASES[base], dim)
            self.cut = cut
            self.trained_blocks = trained_blocks
            self.base_weight = base_weight
            self.dim = dim + (BASES[base] if base_weight else 0)
            # The base's own tail (the trained blocks as they were, its last convolution), never trained.
            self.original = None
            if base_weight and trained_blocks:
                self.original = torch.nn.ModuleDict(
                    {
                        "blocks": copy.deepcopy(network._blocks[cut:]),
                        "conv_head": copy.deepcopy(network._conv_head),
                        "bn1": copy.deepcopy(network._bn1),
                    }
                ).requires_grad_(False)

        def _block(self, idx: int, x, block=None):
            rate = self.base._global_params.drop_connect_rate
            block = self.base._blocks[idx] if block is None else block
            return block(x, drop_connect_rate=rate * idx / blocks if rate else rate)

        def _pooled(self, x, tail=None):
            """The last convolution and the global average; ``tail``: the original's copy of them."""
            tail = tail if tail is not None else {"conv_head": self.base._conv_head, "bn1": self.base._bn1}
            return self.base._swish(tail["bn1"](tail["conv_head"](x))).mean(dim=(2, 3))

        def _original_pooled(self, x):
            """The base encoder's pooled features of ``stem``'s output, as before any training."""
            if self.original is None:  # only the head trains: ``stem`` gives the base's features
                return x
            for idx, block in enumerate(self.original["blocks"], start=self.cut):
                x = self._block(idx, x, block)
            return self._pooled(x, self.original)

        def stem(self, pixels):
            """uint8 NHWC -> what the trained part starts from (never trained, so it can be cached)."""
            base = self.base
            x = efficientnet._normalised(base, pixels)
            x = base._swish(base._bn0(base._conv_stem(x)))
            for idx in range(self.cut):
                x = self._block(idx, x)
            return self._pooled(x) if self.trained_blocks == 0 else x

        def pooled(self, x):
            """The trained blocks on ``stem``'s output: the base's pooled features."""
            if self.trained_blocks == 0:
                return x
            for idx in range(self.cut, blocks):
                x = self._block(idx, x)
            return self._pooled(x)

        def base_features(self, x):
            """The base's own L2-normalised features of ``stem``'s output: never trained, so a trainer may keep them."""
            return torch.nn.functional.normalize(self._original_pooled(x), dim=1)

        def rest(self, x, base=None):
            """From ``stem``'s output to the L2-normalised embedding; ``base``: ``base_features(x)``, if known."""
            head = torch.nn.functional.normalize(self.head(self.pooled(x)), dim=1)
            if not self.base_weight:
                return head
            base = self.base_features(x) if base is None else base
            return torch.cat([base * self.base_weight**0.5, head * (1 - self.base_weight) ** 0.5], dim=1)

        def forward(self, pixels):
            return self.rest(self.stem(pixels))

        def trainable(self) -> list:
            """What ``lookstream train`` updates: the head, then the trained blocks and the last convolution."""
            params = list(self.head.parameters())
            if self.trained_blocks:
                for block in self.base._blocks[self.cut :]:
                    params += list(block.parameters())
                params += [*self.base._conv_head.parameters(), *self.base._bn1.parameters()]
            return params

    return FinetunedNetwork().eval()


def save(network, path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Write the weights and config.json into ``path``; the version is a digest of the weights."""
    import hashlib

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in network.state_dict().items()}
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].cpu().numpy().tobytes())
    config = {**config, "format": FORMAT, "version": digest.hexdigest()[:16]}
    save_file(state, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return config


def load(path: Path):
    """The network of a model directory, and its config."""
    from safetensors.torch import load_file

    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        state = load_file(str(path / WEIGHTS_FILE))
    except (OSError, ValueError) as e:
        raise ModelNotAvailable(
            f"no fine-tuned model at {str(path)!r} ({e}); `lookstream train` writes one (models.options.finetuned.path)"
        ) from e
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: model format {config.get('format')!r}, this lookstream reads {FORMAT}")
    network = build_network(
        config["base"], int(config["dim"]), int(config["trained_blocks"]), float(config.get("base_weight", 0.0))
    )
    network.load_state_dict(state)
    return network.eval(), config


class FinetunedEncoder:
    """A ``lookstream train`` model directory (option ``path``) as an encoder."""

    name = "finetuned"

    def __init__(self, context: ModelContext) -> None:
        path = context.options.get("path")
        if not path:
            raise ValueError("models.options.finetuned.path must name a model directory written by `lookstream train`")
        network, config = load(Path(path))
        self.dim = network.dim
        self.query_scales = query_scales(
            float(config.get("base_weight", 0.0)),
            network.dim - int(config["dim"]),
            network.dim,
            context.options.get("query_base_weight"),
        )
        self.version = f"{config['base']}-{config['version']}"
        self.size = tuple(config.get("input_size", efficientnet.INPUT_SIZE))
        import torch

        network = network.to(context.device, torch.float16 if context.device == "cuda" else torch.float32)
        self.run = onnx_runtime.runner(
            network,
            (1, *self.size, 3),
            f"finetuned-{config['version']}",
            context,
            input_dtype="uint8",
            per_image=True,
            prepare=lambda crops: resize(crops, self.size),
        )

    def encode(self, crops: list[Image.Image]) -> np.ndarray:
        if not crops:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.asarray(self.run(crops), dtype=np.float32)

    def weigh_query(self, vectors: np.ndarray, photo: str) -> np.ndarray:
        """The query vectors with their parts weighed for ``photo`` (plugins.models.Encoder)."""
        scales = self.query_scales.get(photo)
        return vectors if scales is None else vectors * scales


def query_scales(trained: float, base_dim: int, dim: int, weights: Any) -> dict[str, np.ndarray]:
    """Per photo kind, what to multiply a vector's numbers by so that its cosine weighs the base by the kind's weight.

    A stored vector is ``[sqrt(w) * base, sqrt(1 - w) * head]`` (w: the
    trained ``base_weight``). A query scaled by ``q / w`` on the base part and
    ``(1 - q) / (1 - w)`` on the head scores ``q * cos(base) + (1 - q) *
    cos(head)`` against it; the query flow then normalises it, which changes
    every score of the query by the same factor and no order.
    """
    if weights is None:
        weights = QUERY_BASE_WEIGHT if trained else {}
    if not isinstance(weights, dict) or not set(weights) <= set(PHOTOS):
        raise ValueError(f"models.options.finetuned.query_base_weight must map {' / '.join(PHOTOS)} to a weight")
    if weights and not trained:  # a config written for models with a base part; this one has none to weigh
        log.warning("query_base_weight ignored: the model was trained with base weight 0 (it has no base part)")
        return {}
    scales = {}
    for photo, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 1:
            raise ValueError(f"query_base_weight.{photo} must be a number from 0 to 1, got {weight!r}")
        scale = np.full(dim, (1 - weight) / (1 - trained), dtype=np.float32)
        scale[:base_dim] = weight / trained
        scales[photo] = scale
    return scales


@hookimpl
def lookstream_register_encoders(registry):
    registry.add(FinetunedEncoder.name, FinetunedEncoder)
