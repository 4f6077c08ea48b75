"""Brief masked-language-model training of a small local BERT: the demo's stand-in for CXR-BERT.

A randomly initialised BERT maps reports to embeddings that mostly reflect token identity noise; a
few hundred MLM steps on the corpus make its pooled outputs reflect what the reports say, which is
what the frozen-text-encoder design relies on. CXR-BERT itself was trained the same way (MLM on
PubMed + MIMIC notes), at a scale this demo does not attempt.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.common import progress
from pipeline.text.models import quiet_transformers

log = logging.getLogger(__name__)


def pretrain_mlm(model_dir: str | Path, texts: list[str], steps: int = 300, batch_size: int = 32,
                 lr: float = 5e-4, max_length: int = 128, mask_prob: float = 0.15, seed: int = 0) -> dict:
    """Train ``model_dir``'s BERT with MLM on ``texts`` and save the encoder back into ``model_dir``.

    ``model_dir`` holds a transformers BERT checkpoint and its tokenizer (``save_pretrained``).
    Returns the first and last losses (each averaged over up to 20 steps, never overlapping).
    """
    from transformers import AutoTokenizer, BertForMaskedLM, BertModel, DataCollatorForLanguageModeling


    model_dir = Path(model_dir)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    # The saved checkpoint is a bare BertModel: transformers reports the MLM head it adds as missing
    # weights (expected here, they are trained next), so quiet that load.
    with quiet_transformers():
        mlm = BertForMaskedLM.from_pretrained(model_dir)
    mlm.train()
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=mask_prob)
    unique = sorted(set(t for t in texts if t.strip()))
    enc = tok(unique, truncation=True, max_length=max_length)
    examples = [{"input_ids": ids} for ids in enc["input_ids"]]
    opt = torch.optim.AdamW(mlm.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in progress(range(steps), total=steps, desc="mlm", unit="step"):
        idx = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
        batch = collator([examples[i] for i in idx])
        loss = mlm(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    # Save only the encoder (what embed-text loads), replacing the random weights. The stage that
    # calls this owns the folder and marks it complete only after this returns.
    base: BertModel = mlm.bert
    with quiet_transformers():
        base.save_pretrained(model_dir)
    k = max(1, min(20, len(losses) // 2))  # windows that never overlap
    result = {"first_loss": sum(losses[:k]) / k, "last_loss": sum(losses[-k:]) / k, "steps": steps}
    log.info("MLM stand-in text encoder: loss %.3f -> %.3f over %d steps",
             result["first_loss"], result["last_loss"], steps)
    return result
