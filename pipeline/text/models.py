"""Frozen text encoders for the embedding cache: loading (CXR-BERT without remote code, or any
transformers encoder through the Auto classes), pooling, and a tiny BERT builder for tests/demos.

transformers is imported inside the functions so that importing this module stays cheap.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from pipeline.common import ConfigError, MflagError, fingerprint, read_text_utf8

log = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "microsoft/BiomedVLP-CXR-BERT-general"
POOLINGS = ("cls", "mean", "proj")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Files a text encoder needs from the hub (no remote code: *.py is never fetched).
HUB_PATTERNS = ["config.json", "*.safetensors", "pytorch_model.bin", "*.json", "vocab.txt",
                "*.model", "merges.txt"]


class TextModelError(MflagError):
    """A text encoder cannot be found, downloaded, or loaded as asked."""


# --------------------------------------------------------------------------- tiny BERT
def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 1000, max_length: int = 512):
    """A lower-casing WordPiece ``BertTokenizerFast`` whose vocabulary is learnt from ``texts``.

    The vocabulary is a deterministic function of the texts: the special tokens, every character seen
    (as a word start and as a ``##`` continuation, so any word can be spelled), then whole words by
    descending count (ties by spelling) up to ``vocab_size``. The ``tokenizers`` WordPiece trainer is
    not used because its tie-breaking depends on per-process hash seeds, so two runs on the same texts
    gave different vocabularies and a demo that could not be reproduced.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab_list = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    known = set(vocab_list)
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab_list) >= vocab_size:
            break
        if word not in known:
            vocab_list.append(word)
            known.add(word)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab_list)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece()
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                             model_max_length=max_length)


def random_bert(tokenizer: Any, seed: int = 0, **config: Any) -> torch.nn.Module:
    """A randomly initialised ``BertModel`` (no pooler) sized for ``tokenizer``; ``config`` overrides
    BertConfig defaults (12 layers, 768 hidden). The global RNG is left untouched."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertModel(cfg, add_pooling_layer=False)


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' progress bars and load reports around local saves and loads of the tool's
    own small models (a bar for a one-file write is noise); restored afterwards."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def build_tiny_bert(texts: Iterable[str], out_dir: str | os.PathLike, hidden: int = 64,
                    layers: int = 2, heads: int = 2, vocab_size: int = 1000, seed: int = 0,
                    max_position: int = 512) -> Path:
    """Learn a WordPiece vocabulary from ``texts`` and save it with a randomly initialised small BERT.

    The folder (``config.json``, weights, ``tokenizer.json``, ``vocab.txt``) loads through the same
    path as a real checkpoint (``load_text_model``). Deterministic for given texts and seed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_wordpiece_tokenizer(texts, vocab_size, max_position)
    tokenizer.save_pretrained(out)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    model = random_bert(tokenizer, seed, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=max_position)
    with quiet_transformers():
        model.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- locating a model
def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """True when the user asked for offline mode or the hub endpoint is unreachable within ~2 s."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False  # a direct probe says nothing behind a proxy; huggingface_hub's timeouts apply
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=2.0):
            return False
    except OSError:
        return True


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_dir(model: str) -> tuple[Path, str, str]:
    """``(local folder, model_id, revision)`` for a local directory or a hub id.

    A hub id is fetched (weights, config and tokenizer files only; never code) or, offline, taken
    from the local hub cache; an uncached id offline fails at once with advice. The revision is
    the hub commit hash, or ``sha256:...`` of the weight files of a local folder.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        snap = _snapshot_revision(path.resolve())
        return path.resolve(), str(path.resolve()), snap or "sha256:" + _weights_hash(path)
    if path.exists():
        raise TextModelError(f"--model {model}: is a file; pass a model directory or a hub id")
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or not _HUB_ID.match(model):
        raise TextModelError(f"--model {model}: no such directory (and not a hub id like 'org/name')")

    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        local = snapshot_download(model, allow_patterns=HUB_PATTERNS, local_files_only=offline)
    except Exception as e:  # huggingface_hub raises a zoo of types: not cached, offline, 404, gated
        how = "offline and not in the local hub cache" if offline else f"could not be fetched ({e})"
        if "/" not in model:  # most likely a mistyped local folder, not a hub id
            how = f"no local folder {model!r} here, and " + how
        raise TextModelError(
            f"--model {model}: {how}. Download it on a machine with network access "
            f"(`hf download {model} --local-dir DIR`, from huggingface_hub) and pass --model DIR "
            "(a local directory).") from e
    return Path(local), model, Path(local).name


def _snapshot_revision(path: Path) -> str | None:
    """The commit hash when ``path`` is a hub-cache snapshot folder (``.../snapshots/<hash>``)."""
    if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name):
        return path.name
    return None


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    return files or sorted(path.glob("pytorch_model*.bin"))


def _weights_hash(path: Path) -> str:
    files = _weight_files(path)
    if not files:
        raise TextModelError(f"{path}: no model weights (*.safetensors or pytorch_model.bin)")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------- the encoder
class ProjectionHead(torch.nn.Module):
    """CXR-BERT-specialized's ``cls_projection_head`` (same parameter names, so its weights load)."""

    def __init__(self, hidden: int, proj: int, act: str, eps: float):
        super().__init__()
        from transformers.activations import ACT2FN

        self.dense_to_hidden = torch.nn.Linear(hidden, proj)
        self.transform_act_fn = ACT2FN[act]
        self.LayerNorm = torch.nn.LayerNorm(proj, eps=eps)
        self.dense_to_output = torch.nn.Linear(proj, proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_to_output(self.LayerNorm(self.transform_act_fn(self.dense_to_hidden(x))))


@dataclass
class TextEncoder:
    """A frozen encoder with its tokenizer and the facts a cache records about it."""

    model: torch.nn.Module
    tokenizer: Any
    model_id: str
    revision: str
    config_hash: str
    tokenizer_hash: str
    hidden_size: int
    max_positions: int
    proj: torch.nn.Module | None = None
    kind: str = "bert"
    n_params: int = 0
    extra: dict = field(default_factory=dict)

    def dim(self, pooling: str) -> int:
        return self.proj.dense_to_output.out_features if pooling == "proj" else self.hidden_size

    def to(self, device: str | torch.device, dtype: torch.dtype) -> "TextEncoder":
        self.model.to(device=device, dtype=dtype)
        if self.proj is not None:
            self.proj.to(device=device, dtype=dtype)
        return self

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
        """(B, L) ids and mask -> (B, D) float32 embeddings (see :func:`pool_hidden`)."""
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        return pool_hidden(h, attention_mask, pooling, self.proj)


def pool_hidden(h: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
                proj: torch.nn.Module | None = None) -> torch.Tensor:
    """(B, L, H) last hidden states -> (B, D) float32: ``cls`` the first token, ``mean`` the mean over
    real tokens, ``proj`` the L2-normalised projection of the first token (CXR-BERT-specialized's
    own ``get_projected_text_embeddings``). embed-text and the online text mode both pool here."""
    if pooling == "cls":
        return h[:, 0].float()
    if pooling == "mean":
        m = attention_mask.unsqueeze(-1).float()  # sums in fp32: fp16 could overflow on long reports
        return (h.float() * m).sum(1) / m.sum(1).clamp_min(1)
    if pooling == "proj":
        if proj is None:
            raise TextModelError("pooling 'proj' needs the model's projection head")
        return torch.nn.functional.normalize(proj(h[:, 0]).float(), dim=-1)
    raise ValueError(f"unknown pooling {pooling!r}")


_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype",
                         "_attn_implementation_autoset", "_commit_hash", "auto_map")


def _tokenizer_hash(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = {"vocab": tokenizer.get_vocab(), "class": type(tokenizer).__name__}
    return fingerprint(state, length=32)


def load_text_model(model: str, pooling: str = "cls", device: str = "cpu",
                    dtype: torch.dtype = torch.float32) -> TextEncoder:
    """Load a frozen encoder in eval mode on ``device``/``dtype`` from a hub id or local folder.

    BERT-family checkpoints (incl. CXR-BERT, whose config names remote code) load as a plain
    ``BertModel`` from their weights: missing encoder weights fail, the MLM head is ignored, and the
    -specialized projection head is loaded for ``pooling="proj"``. Others go through AutoModel.
    """
    if pooling not in POOLINGS:
        raise TextModelError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    folder, model_id, revision = resolve_model_dir(model)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise TextModelError(f"{folder}: no config.json; not a transformers model folder")
    try:
        raw = json.loads(read_text_utf8(cfg_path))
    except json.JSONDecodeError as e:
        raise TextModelError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise TextModelError(f"{cfg_path}: expected a JSON object")
    model_type = str(raw.get("model_type", ""))
    archs = " ".join(str(a) for a in raw.get("architectures") or [])
    check_model_config(cfg_path, raw)
    if model_type in ("bert", "cxr-bert") or "CXRBert" in archs:
        enc = _load_bert(folder, raw, pooling)
    else:
        enc = _load_auto(folder, pooling)
    enc.model_id, enc.revision = model_id, revision
    enc.model.eval().requires_grad_(False)
    if enc.proj is not None:
        enc.proj.eval().requires_grad_(False)
    enc.n_params = sum(p.numel() for p in enc.model.parameters())
    return enc.to(device, dtype)


# config.json sizes that decide how much memory a model takes before any weight is read
SIZE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size", "d_model", "num_layers", "encoder_layers", "dim",
             "n_layers", "projection_size")


def check_model_config(cfg_path: Path, raw: dict) -> None:
    """Refuse, before transformers sees the folder, a config.json whose ``model_type`` is not an
    architecture transformers ships (``cxr-bert`` aside, which loads as BERT): such a folder can only be
    loaded by running its own Python files (``auto_map``), and mflag never runs code from a model folder.
    Every size in :data:`SIZE_KEYS` must be a positive whole number (``4e9`` is not); the sizes are then
    compared with the weight file's tensor shapes before anything is allocated (:func:`check_shapes`)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = raw.get("model_type")
    if model_type != "cxr-bert" and model_type not in CONFIG_MAPPING_NAMES:
        code = "; its auto_map names Python code in the folder" if raw.get("auto_map") else ""
        raise TextModelError(f"{cfg_path}: model_type {model_type!r} is not an architecture transformers knows"
                             f"{code}: mflag never runs code from a model folder; use a checkpoint of a standard "
                             "architecture (bert, roberta, ...)")
    for key in SIZE_KEYS:
        value = raw.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise TextModelError(f"{cfg_path}: {key} is {value!r}; expected a positive whole number")


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the folder's weight files, read from their headers (safetensors) or
    memory-mapped (torch zip files): no tensor data is loaded."""
    files = _weight_files(folder)
    if not files:
        raise TextModelError(f"{folder}: no model weights (*.safetensors or pytorch_model.bin)")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as g:
                    shapes.update({k: tuple(g.get_slice(k).get_shape()) for k in g.keys()})
            else:
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # a legacy (non-zip) file cannot be mapped
                    sd = torch.load(f, map_location="cpu", weights_only=True)
                shapes.update({k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)})
        except Exception as e:
            raise TextModelError(f"{f}: cannot read weights ({e})") from e
    return shapes


def check_shapes(folder: Path, expected: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]]) -> None:
    """The first tensor whose shape in the weight files differs from what config.json implies (the
    model built on the meta device: nothing allocated) is one TextModelError naming both."""
    for k, shape in have.items():
        if k in expected and tuple(expected[k]) != tuple(shape):
            raise TextModelError(f"{folder}: weight {k} has shape {tuple(shape)}, config.json implies "
                                 f"{tuple(expected[k])} (vocab_size, hidden_size, intermediate_size or layers "
                                 "disagree with the weights)")


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    files = _weight_files(folder)
    if not files:
        raise TextModelError(f"{folder}: no model weights (*.safetensors or pytorch_model.bin)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(f)))
            else:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:
            raise TextModelError(f"{f}: cannot read weights ({e})") from e
    return state


def _load_bert(folder: Path, raw: dict, pooling: str) -> TextEncoder:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    skip = set(_VOLATILE_CONFIG_KEYS) | {"model_type", "architectures"}
    config = BertConfig(**{k: v for k, v in raw.items() if k not in skip})

    def split(state: dict) -> tuple[dict, dict, list]:
        encoder_sd, proj_sd, ignored = {}, {}, []
        for key, value in state.items():
            key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            if key.startswith("cls_projection_head."):
                proj_sd[key[len("cls_projection_head."):]] = value
            elif key.startswith("cls.") or key.startswith("pooler.") or key.startswith("bert.pooler."):
                ignored.append(key)  # MLM / NSP heads and the pooler are never used for embeddings
            else:
                encoder_sd[key[5:] if key.startswith("bert.") else key] = value
        return encoder_sd, proj_sd, ignored

    # Sizes first, on the meta device and the weight headers: nothing is allocated for a config that
    # does not match its weights (a vocab_size of 4e8 would otherwise be allocated before any check).
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in BertModel(config, add_pooling_layer=False).state_dict().items()}
    have, _, _ = split(weight_shapes(folder))
    missing = sorted(k for k in expected if k not in have and not k.endswith(("position_ids", "token_type_ids")))
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise TextModelError(f"{folder}: checkpoint lacks encoder weights {', '.join(missing[:5])}{more}")
    check_shapes(folder, expected, have)
    encoder_sd, proj_sd, ignored = split(_read_state_dict(folder))
    model = BertModel(config, add_pooling_layer=False)
    # Old checkpoints (CXR-BERT's included) store the position_ids buffer; it is rebuilt anyway.
    unexpected = sorted(k for k in encoder_sd if k not in expected and not k.endswith("position_ids"))
    if unexpected:
        log.warning("%s: ignoring %d unexpected weights (%s...)", folder, len(unexpected), unexpected[0])
    model.load_state_dict({k: v for k, v in encoder_sd.items() if k in expected}, strict=False)

    proj = None
    if pooling == "proj":
        if not proj_sd:
            raise TextModelError(f"{folder}: --pooling proj needs a projection head "
                                 "(cls_projection_head.* weights, as in CXR-BERT-specialized); "
                                 "this checkpoint has none; use --pooling cls or mean")
        size = int(raw.get("projection_size") or proj_sd["dense_to_output.weight"].shape[0])
        proj = ProjectionHead(config.hidden_size, size, config.hidden_act, config.layer_norm_eps)
        try:
            proj.load_state_dict(proj_sd, strict=True)
        except RuntimeError as e:
            raise TextModelError(f"{folder}: projection head weights do not fit ({e})") from e

    try:
        tokenizer = BertTokenizerFast.from_pretrained(str(folder))
    except Exception as e:
        raise TextModelError(f"{folder}: cannot load the BERT tokenizer ({e})") from e
    cfg_dict = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return TextEncoder(model=model, tokenizer=tokenizer, model_id="", revision="",
                       config_hash=fingerprint(cfg_dict, length=32),
                       tokenizer_hash=_tokenizer_hash(tokenizer), hidden_size=config.hidden_size,
                       max_positions=config.max_position_embeddings, proj=proj,
                       kind="cxr-bert" if raw.get("model_type") == "cxr-bert" else "bert",
                       extra={"ignored_weights": len(ignored)})


def _load_auto(folder: Path, pooling: str) -> TextEncoder:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if pooling == "proj":
        raise TextModelError(f"{folder}: --pooling proj is only for CXR-BERT-style checkpoints")
    # trust_remote_code=False everywhere: a folder's own Python files never run, and nothing asks
    # "Do you wish to run the custom code?" on a terminal, where one keystroke would run them.
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        with torch.device("meta"):
            meta = AutoModel.from_config(config, trust_remote_code=False)
    except Exception as e:
        raise TextModelError(f"{folder}: cannot load with transformers Auto classes ({e})") from e
    prefix = f"{meta.base_model_prefix}." if getattr(meta, "base_model_prefix", "") else ""
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    check_shapes(folder, expected, {(k[len(prefix):] if prefix and k.startswith(prefix) else k): v
                                    for k, v in weight_shapes(folder).items()})
    del meta
    try:
        model, info = AutoModel.from_pretrained(str(folder), output_loading_info=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:
        raise TextModelError(f"{folder}: cannot load with transformers Auto classes ({e})") from e
    missing = [k for k in info.get("missing_keys", []) if "pooler" not in k and "position_ids" not in k]
    if missing:
        raise TextModelError(f"{folder}: checkpoint lacks encoder weights {', '.join(sorted(missing)[:5])}")
    if getattr(config, "is_encoder_decoder", False):
        model = model.get_encoder()
    cfg_dict = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return TextEncoder(model=model, tokenizer=tokenizer, model_id="", revision="",
                       config_hash=fingerprint(cfg_dict, length=32),
                       tokenizer_hash=_tokenizer_hash(tokenizer),
                       hidden_size=int(getattr(config, "hidden_size", getattr(config, "d_model", 0))),
                       max_positions=int(getattr(config, "max_position_embeddings", 0) or 1 << 30),
                       kind="auto")


# --------------------------------------------------------------------------- online mode
class OnlineTextEncoder(torch.nn.Module):
    """A text encoder run inside each training step (the original design, kept as the baseline and
    the freezing ablation): tokenizes report texts (padded to ``max_length`` like the original) and
    pools them to (B, D) with :func:`pool_hidden`, as embed-text does. Frozen except the last
    ``unfreeze_last`` layers (``"all"``: every layer, the embeddings and a projection head too).
    :meth:`from_pretrained` loads it with :func:`load_text_model`, the loader embed-text uses, in
    float32 whatever dtype the checkpoint was saved in."""

    def __init__(self, encoder: torch.nn.Module, tokenizer=None, max_length: int = 512, pooling: str = "cls",
                 unfreeze_last: int | str = 0, name: str = "text encoder",
                 proj: torch.nn.Module | None = None):
        super().__init__()
        self.encoder, self.tokenizer, self.proj = encoder, tokenizer, proj
        self.max_length, self.pooling = max_length, pooling
        self.encoder.requires_grad_(False)
        if proj is not None:
            proj.requires_grad_(False)
        layers = _encoder_layers(self.encoder)
        if unfreeze_last == "all":
            self.encoder.requires_grad_(True)
            if proj is not None and pooling == "proj":
                proj.requires_grad_(True)
        elif not isinstance(unfreeze_last, int) or unfreeze_last < 0:
            raise ConfigError(f"unfreeze_last: expected a number of layers or 'all', got {unfreeze_last!r}")
        elif unfreeze_last > len(layers):
            raise ConfigError(f"unfreeze_last: {name} has {len(layers)} layers, asked for {unfreeze_last}")
        else:
            for layer in layers[len(layers) - unfreeze_last:] if unfreeze_last else []:
                layer.requires_grad_(True)
        self.unfreeze_last = unfreeze_last
        self.dim = int(proj.dense_to_output.out_features if pooling == "proj" and proj is not None
                       else self.encoder.config.hidden_size)

    @classmethod
    def from_pretrained(cls, model: str, max_length: int = 512, pooling: str = "cls",
                        unfreeze_last: int | str = 0) -> "OnlineTextEncoder":
        enc = load_text_model(model, pooling, device="cpu", dtype=torch.float32)
        return cls(enc.model, enc.tokenizer, max_length, pooling, unfreeze_last, name=model, proj=enc.proj)

    def tokenize(self, texts: list[str], device) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        if torch.device(device).type == "cuda":  # pinned and asynchronous: no host stall every step
            return {k: v.pin_memory().to(device, non_blocking=True) for k, v in tok.items()}
        return {k: v.to(device) for k, v in tok.items()}

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        grad = torch.is_grad_enabled() and bool(self.unfreeze_last)
        if not self.unfreeze_last:
            self.encoder.eval()  # a frozen encoder: no dropout, as when the cache was computed
        with torch.set_grad_enabled(grad):
            mask = tokens["attention_mask"]
            hidden = self.encoder(input_ids=tokens["input_ids"], attention_mask=mask).last_hidden_state
            return pool_hidden(hidden, mask, self.pooling, self.proj)


def _encoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    for path in ("encoder.layer", "encoder.layers", "layers", "transformer.layer"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    return []


def torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
