"""Contrastive pretraining of the tiny CLIP on generated image-caption pairs (`byom-lab pretrain`)."""
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .. import manifest as mf
from ..model import create_tiny_clip, preprocess
from . import sources
from .text import Tokenizer, build_vocab, code_word


@dataclass
class PretrainConfig:
    """Hyperparameters of the backbone recipe."""

    steps: int = 1400
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    seed: int = 0


def caption_batch(tasks: dict, templates: list, batch_size: int, g: torch.Generator):
    """Images (uint8) and captions for one pretraining batch, drawn across the captioned families."""
    names = [n for n, s in tasks.items() if not s.parent and s.generator in sources.GENERATORS]
    fam = torch.randint(0, len(names), (batch_size,), generator=g)
    images, captions = [], []
    for i, name in enumerate(names):
        n = int((fam == i).sum())
        if n == 0:
            continue
        spec = tasks[name]
        labels = torch.randint(0, len(spec.classes), (n,), generator=g)
        images.append(sources.to_uint8(sources.GENERATORS[spec.generator](labels, g)))
        tpl = torch.randint(0, len(templates), (n,), generator=g).tolist()
        for k, t in zip(labels.tolist(), tpl):
            name_k = spec.classes[k] if k in spec.captioned else code_word(name, k)
            captions.append(templates[t].format(c=name_k, f=spec.family))
    return torch.cat(images), captions


def _param_groups(model, weight_decay):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in n or "logit_scale" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain(cfg: PretrainConfig, out_path, log_every: int = 50, snapshot_every: int = 0, device: str = "cpu"):
    """Train the tiny CLIP and save it (fp16 safetensors with vocab and recipe in the metadata)."""
    tasks, templates = mf.tiny_tasks(), mf.templates()
    vocab = build_vocab(tasks, templates)
    tok = Tokenizer(vocab)
    model = create_tiny_clip(cfg.seed).to(device)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    start, bar = time.time(), tqdm(range(cfg.steps), desc="pretrain tiny CLIP")
    for step in bar:
        images, captions = caption_batch(tasks, templates, cfg.batch_size, g)
        img = torch.nn.functional.normalize(model.encode_image(preprocess(images.to(device))), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tok(captions).to(device)), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        # captions can repeat inside a batch: treat every identical caption as a positive
        ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        cid = torch.tensor([ids[c] for c in captions])
        same = (cid[:, None] == cid[None, :]).float().to(device)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean() + torch.sum(-target * logits.T.log_softmax(1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if snapshot_every and step and step % snapshot_every == 0:
            _save(model, vocab, cfg, start, str(out_path) + f".step{step}")
        if step % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", pairs_per_s=f"{(step + 1) * cfg.batch_size / (time.time() - start):.0f}")
    _save(model, vocab, cfg, start, out_path)
    return model


def _save(model, vocab, cfg, start, out_path):
    from safetensors.torch import save_file

    from ..cache import atomic_path

    device = next(model.parameters()).device.type
    meta = {"vocab": json.dumps(vocab), "recipe": json.dumps(asdict(cfg)), "model": "byom-tiny-clip",
            "seconds": f"{time.time() - start:.0f}", "device": device}
    sd = {k: v.detach().half().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_path) as tmp:
        save_file(sd, str(tmp), metadata=meta)
