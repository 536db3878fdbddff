"""The teaching loop's kernels, old path against new in one run: evaluation images/s, the memo's digest, fine-tuning steps.

Needs the built tiny suite (`byom-lab prepare`). Every ratio compares two paths measured side by side
in this process, with the same thread count:
- evaluation: open_clip's forward through `torch.func.functional_call` at batch 1000 (what byom-lab
  used before) vs byom_lab.forward (class-token-only last block, SDPA attention) at the evaluation's
  batch size; images/s on every task's test split, and whether the predicted classes are identical;
- the memo's content digest of the image tower (target ≤ 50 ms);
- one fine-tuning step (batch 32): open_clip's forward + dense LoRA update + for-loop AdamW (before)
  vs the functional forward + factored LoRA + fused AdamW (now), full and LoRA.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import byom_lab as bl  # noqa: E402
from byom_lab import forward, memo  # noqa: E402
from byom_lab.evaluation import CPU_BATCH  # noqa: E402
from byom_lab.finetune import lora_targets  # noqa: E402
from byom_lab.model import encode_images, preprocess  # noqa: E402


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.inference_mode()
def classify(suite, sd, old: bool):
    out = []
    for t in range(len(suite.tasks)):
        x, _ = suite.inputs(t, "test")
        size = 1000 if old else CPU_BATCH
        preds = []
        for i in range(0, len(x), size):
            xb = x[i:i + size]
            if old:
                feats = encode_images(suite.visual, xb, sd)
            else:
                feats = torch.nn.functional.normalize(forward.image_features(suite.visual, sd, xb), dim=-1)
            preds.append((feats @ suite.heads[t].T).argmax(1))
        out.append(torch.cat(preds))
    return out


def train_step_ms(suite, kind: str, old: bool, steps: int) -> float:
    x, y = suite.data[suite.tasks[0]]["train"]
    head, scale, pre = suite.heads[0], suite.logit_scale, suite.pretrained
    g = torch.Generator().manual_seed(0)
    if kind == "full":
        params = {k: v.clone().requires_grad_(True) for k, v in pre.items()}
        trained = list(params.values())
        weights = lambda: params  # noqa: E731
        lora = None
    else:
        params = {}
        for k in lora_targets(pre):
            d_out, d_in = pre[k].shape
            params[k] = (torch.zeros(d_out, 8, requires_grad=True),
                         (torch.randn(8, d_in, generator=g) / math.sqrt(d_in)).requires_grad_(True))
        trained = [p for ba in params.values() for p in ba]
        weights = lambda: {**pre, **{k: pre[k] + 2 * (b @ a) for k, (b, a) in params.items()}}  # noqa: E731
        lora = lambda: {k: (2 * b, a) for k, (b, a) in params.items()}  # noqa: E731
    opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.1, fused=None if old else True)

    def step():
        idx = torch.randint(0, len(y), (32,), generator=g)
        xb = preprocess(x[idx])
        if old:
            feats = encode_images(suite.visual, xb, weights())
        elif kind == "full":
            feats = torch.nn.functional.normalize(forward.image_features(suite.visual, params, xb), dim=-1)
        else:
            feats = torch.nn.functional.normalize(forward.image_features(suite.visual, pre, xb, lora()), dim=-1)
        loss = torch.nn.functional.cross_entropy(scale * feats @ head.T, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - start) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="fine-tuning steps timed per path")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    suite = bl.load_suite("tiny")
    n_images = sum(len(suite.inputs(t, "test")[1]) for t in range(len(suite.tasks)))
    sd = suite.finetuned[0]
    same = all(torch.equal(a, b) for a, b in zip(classify(suite, sd, True), classify(suite, sd, False)))
    old_s = best(lambda: classify(suite, sd, True), args.repeats)
    new_s = best(lambda: classify(suite, sd, False), args.repeats)
    print(f"threads {args.threads}; evaluation of {n_images} test images (8 tasks), best of {args.repeats}:")
    print(f"  open_clip forward, batch 1000:  {n_images / old_s:7.0f} images/s")
    print(f"  byom_lab.forward, batch {CPU_BATCH}:   {n_images / new_s:7.0f} images/s  ({old_s / new_s:.2f}x), "
          f"identical predictions: {same}")
    digest_s = best(lambda: memo.state_digest(sd), 5)
    n = sum(v.numel() for v in sd.values())
    print(f"memo digest of the image tower ({n / 1e6:.1f}M params): {1000 * digest_s:.1f} ms  "
          f"[{'PASS' if digest_s <= 0.05 else 'FAIL'}: target <= 50 ms]")
    for kind in ("full", "lora"):
        before = train_step_ms(suite, kind, True, args.steps)
        after = train_step_ms(suite, kind, False, args.steps)
        print(f"fine-tuning step ({kind}, batch 32): before {before:.1f} ms, now {after:.1f} ms ({before / after:.2f}x)")


if __name__ == "__main__":
    main()
