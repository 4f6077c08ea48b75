"""What zero-shot classification and retrieval share: a train-vision run's image path and text path.

M-FLAG trains an image encoder into a frozen text encoder's space: images go trunk -> projector (za),
report embeddings from the frozen encoder go through the trained text head (zt), and the alignment loss
pulls za towards zt. Zero-shot classification and retrieval score images against texts through exactly
those paths, in eval mode:

- ``load_pretrained``: the trunk, projector and text head of a finished train-vision run (its folder,
  or its ``encoder.pt`` with ``projector.pt`` and ``config.json`` beside it), with the image sizes and
  the text cache it trained with; or a random model (the null) of the same shape;
- ``embed_prompts``: prompt texts through the frozen text encoder by the embed-text stage itself (handed
  in by the eval stage as ``embed_file``; same
  tokenizer, max length, pooling and compute dtype as the training cache, cached the same way), refused
  when the model is not the one that made the training cache;
- ``image_embeddings`` / ``text_embeddings``: za and zt in eval mode.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cache import TextEmbeddingCache
from pipeline.common import MflagError, atomic_open, file_sha256, progress, read_json
from pipeline.imaging import load_for_shard
from pipeline.pretrain.augment import Augmenter
from pipeline.safeload import safe_load
from pipeline.vision.checkpoints import load_encoder
from pipeline.vision.models import MFlagVision

log = logging.getLogger(__name__)

# The attributes of a text cache that fix how a text becomes its embedding: a prompt embedded with other
# values lives in another space than the reports the run was trained on.
TEXT_PATH_ATTRS = ("config_hash", "tokenizer_hash", "pooling", "max_length")


class LanguageEvalError(MflagError):
    """A zero-shot or retrieval evaluation cannot run on these inputs (one line, names what)."""


@dataclasses.dataclass
class Pretrained:
    """A run's image and text paths in eval mode, and what it trained with."""

    vision: MFlagVision
    image_size: int                 # images are brought to this square (as prepare + the loader do)
    crop_size: int                  # ... and centre-cropped to this, the network input
    text_cache: Path | None         # the cache the run was trained on (None: random init without one)
    cache_attrs: dict
    describe: dict                  # what results.json records about the weights

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor, batch: int = 64) -> np.ndarray:
        """uint8 (N, 1, S, S) at ``image_size`` -> za (N, P) float32, eval mode, centre crop."""
        aug = Augmenter("none", device="cpu", seed=0, out_size=self.crop_size)
        out = []
        with progress(total=len(images), desc="embed images", unit="img") as bar:
            for i in range(0, len(images), batch):
                _, za = self.vision(aug(images[i:i + batch]))
                out.append(za.float().numpy())
                bar.update(min(batch, len(images) - i))
        return np.concatenate(out) if out else np.zeros((0, self.vision.proj_dim), np.float32)

    @torch.no_grad()
    def text_embeddings(self, t: np.ndarray) -> np.ndarray:
        """Frozen-encoder embeddings (M, D) -> zt (M, P) through the trained text head, eval mode."""
        return self.vision.project_text(torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32))).float().numpy()


def run_folder(init: str) -> Path:
    """The train-vision output folder behind ``init`` (the folder, or a file inside it)."""
    p = Path(init).expanduser()
    return p if p.is_dir() else p.parent


def load_pretrained(init: str, *, seed: int, image_size: int, text_cache: str | None = None) -> Pretrained:
    """The run behind ``init`` (a train-vision folder or its encoder file) or, for ``random``, a random
    trunk, projector and text head (seeded) shaped for ``text_cache``'s dimension."""
    if init == "imagenet":
        raise LanguageEvalError("init imagenet: zero-shot and retrieval need a projector and text head trained "
                                "into the text space; give a train-vision run folder (or random for the null)")
    if init == "random":
        if not text_cache:
            raise LanguageEvalError("init random: give --text-cache (the text space the random model is shaped "
                                    "for and the prompts are checked against)")
        cache = TextEmbeddingCache(text_cache)
        torch.manual_seed(seed)
        vision = MFlagVision(cache.dim, text_head="mlp", init="random").eval()
        return Pretrained(vision, image_size, image_size, cache.path, dict(cache.attrs),
                          {"init": "random", "seed": seed, "text_dim": cache.dim})
    run = run_folder(init)
    encoder = Path(init).expanduser() if Path(init).expanduser().is_file() else run / "encoder.pt"
    for need, why in ((encoder, "the trained ResNet50"), (run / "projector.pt", "the projector and text head"),
                      (run / "config.json", "the image sizes and text cache it trained with")):
        if not need.is_file():
            raise LanguageEvalError(f"{run}: no {need.name} ({why}); zero-shot and retrieval need a finished "
                                    "train-vision run folder")
    cfg = read_json(run / "config.json").get("config") or {}
    if cfg.get("text_mode", "cache") == "online" and cfg.get("unfreeze_last") not in (0, None):
        raise LanguageEvalError(f"{run}: this run trained its text encoder's last layers (unfreeze_last "
                                f"{cfg.get('unfreeze_last')}), which train-vision does not save; its text path cannot "
                                "be rebuilt for zero-shot or retrieval")
    proj = safe_load(run / "projector.pt", LanguageEvalError)
    try:
        trunk, info = load_encoder(str(encoder))
        vision = MFlagVision(int(proj["text_dim"]), proj_dim=int(proj["proj_dim"]), text_head=proj["text_head_kind"],
                             hidden=int(proj["hidden_dim"]), trunk=trunk)
        vision.projector.load_state_dict(proj["projector"], strict=True)
        vision.text_head.load_state_dict(proj["text_head"], strict=True)
    except (KeyError, TypeError, RuntimeError) as e:
        raise LanguageEvalError(f"{run / 'projector.pt'}: not a projector file of this tool ({e})") from e
    vision.eval()
    cache_path = text_cache or cfg.get("text_cache")
    attrs: dict = {}
    if cache_path:
        cache = TextEmbeddingCache(cache_path)
        if cache.dim != vision.text_dim:
            raise LanguageEvalError(f"{cache.path}: {cache.dim}-d embeddings, but {run} was trained on "
                                    f"{vision.text_dim}-d ones")
        cache_path, attrs = cache.path, dict(cache.attrs)
    describe = {"init": str(run), "encoder_sha256": info.get("sha256"),
                "projector_sha256": file_sha256(run / "projector.pt"), "text_head": proj["text_head_kind"],
                "proj_dim": int(proj["proj_dim"]), "text_dim": int(proj["text_dim"])}
    return Pretrained(vision, int(cfg.get("image_size", image_size)), int(cfg.get("crop_size", image_size)),
                      Path(cache_path) if cache_path else None, attrs, describe)


def text_model_of(pre: Pretrained, text_model: str | None, run_init: str) -> str:
    """The text model the prompts go through: the one given, else the one named by the training cache."""
    if text_model:
        return text_model
    model = pre.cache_attrs.get("model_id")
    if not model:
        raise LanguageEvalError(f"{run_init}: its text cache names no model; give --text-model (the model that "
                                "made the run's text cache)")
    return str(model)


# The embed-text stage as a function (``stages.embed_text.embed_file``), handed in by the eval stage:
# ``embed_file(reports_jsonl, out, model=, pooling=, max_length=, dtype=, device=, shard_size=) -> cache folder``.
# pipeline/ does not import stages/, and prompts must go through the stage itself (same cache, same checks).
EmbedFile = Callable[..., Path]


def embed_prompts(texts: list[str], out: Path, text_model: str, cache_attrs: dict, embed_file: EmbedFile,
                  device: str = "cpu") -> np.ndarray:
    """Embed ``texts`` with the embed-text stage (``embed_file``) into ``out`` (a cache of its own, keyed by
    each text's hash, reused when rerun) with the training cache's pooling, max length and compute dtype;
    refuse a model whose tokenizer or configuration differs from the one that made the training cache."""
    if not cache_attrs:
        raise LanguageEvalError("no text cache to check the prompts against; give --text-cache")
    keys = [hashlib.sha256(t.encode("utf-8")).hexdigest()[:24] for t in texts]
    out.mkdir(parents=True, exist_ok=True)
    src = out / "prompts.jsonl"
    rows = sorted({k: t for k, t in zip(keys, texts)}.items())
    body = "".join(json.dumps({"key": k, "text": t}, ensure_ascii=False) + "\n" for k, t in rows)
    if not src.is_file() or src.read_text(encoding="utf-8") != body:
        with atomic_open(src, "w", encoding="utf-8") as fh:
            fh.write(body)
    cache = TextEmbeddingCache(embed_file(
        src, out / "cache", model=text_model, pooling=str(cache_attrs.get("pooling", "cls")),
        max_length=int(cache_attrs.get("max_length", 512)), dtype=str(cache_attrs.get("dtype", "fp32")),
        device=device, shard_size=max(1, len(rows))))
    diffs = [f"{k}: prompts {cache.attrs.get(k)!r}, training cache {cache_attrs.get(k)!r}"
             for k in TEXT_PATH_ATTRS if cache.attrs.get(k) != cache_attrs.get(k)]
    if diffs:
        raise LanguageEvalError(f"--text-model {text_model} does not embed text as the model that made the run's "
                                f"training cache did ({'; '.join(diffs)}); pass the same model")
    return cache.lookup(keys)


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """Images -> uint8 (N, 1, size, size) as prepare writes them to shards (border crop, square resize,
    min-max scaling); a file that cannot be read is one error naming it."""
    out = np.empty((len(paths), 1, size, size), dtype=np.uint8)
    with progress(total=len(paths), desc="load images", unit="img") as bar:
        for i, p in enumerate(paths):
            try:
                out[i, 0] = load_for_shard(p, size)[0]
            except MflagError:
                raise
            except Exception as e:  # a decoder's own error type: still one line naming the file
                raise LanguageEvalError(f"{p}: cannot read image ({type(e).__name__}: {e})") from e
            bar.update(1)
    return torch.from_numpy(out)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, P) x (M, P) -> (N, M) cosine similarities, float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def jsonable(obj: Any) -> Any:
    """numpy scalars and arrays as Python numbers and lists."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
