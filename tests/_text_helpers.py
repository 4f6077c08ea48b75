"""Shared fixtures-in-functions for the text-cache tests (importable by spawned DataLoader workers)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

WORDS = ("no acute cardiopulmonary process . the heart size is normal . there is a small left "
         "pleural effusion with adjacent atelectasis . lungs are clear without focal consolidation . "
         "stable mild cardiomegaly , pneumothorax is not seen , endotracheal tube terminates 4 cm "
         "above the carina . right lower lobe opacity may reflect pneumonia").split()


def make_reports(n: int, seed: int = 0, dup_every: int = 5, long_every: int = 0) -> list[dict]:
    """Report records like prepare's reports.jsonl; every ``dup_every``-th repeats an earlier text."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if dup_every and i and i % dup_every == 0:
            text = out[rng.randrange(i)]["text"]
        else:
            n_words = 80 if long_every and i % long_every == 1 else rng.randint(3, 30)
            text = " ".join(rng.choice(WORDS) for _ in range(n_words))
        out.append({"study_id": str(50000000 + i), "subject_id": str(10000000 + i), "text": text,
                    "sections": ["findings"], "n_words": len(text.split())})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class KeyDataset(torch.utils.data.Dataset):
    """Looks up cache rows from inside DataLoader workers (module-level so it pickles under spawn)."""

    def __init__(self, cache, keys):
        self.cache, self.keys = cache, list(keys)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return torch.from_numpy(self.cache.lookup([self.keys[i]])[0])


def reference_embeddings(model_dir: Path, texts: list[str], pooling: str = "cls", max_length: int = 512):
    """One report at a time, no padding: the ground truth for the batched, sorted, deduped path."""
    from transformers import BertModel, BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    out = []
    with torch.inference_mode():
        for t in texts:
            enc = tok(t, truncation=True, max_length=max_length, return_tensors="pt")
            h = model(**enc).last_hidden_state[0]
            out.append((h[0] if pooling == "cls" else h.mean(0)).numpy())
    return np.stack(out).astype(np.float32)
